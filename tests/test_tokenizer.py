"""Tokenizers: CLIP BPE against open_clip.tokenize goldens; SentencePiece trained here on a generated corpus.

Goldens come from tests/fixtures/make_text_image_fixtures.py (real open_clip).
"""

import json
import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm

from clipjax.data.tokenizer import (
    ClipTokenizer,
    SentencePieceTokenizer,
    default_tokenizer,
    get_tokenizer,
    tokenize,
)


@pytest.fixture(scope="module")
def golden(request):
    root = request.config.rootpath / "tests" / "fixtures" / "tokenizer"
    strings = json.loads((root / "strings.json").read_text(encoding="utf-8"))
    ids = np.load(root / "ids.npz")
    return strings, {77: ids["ids77"].astype(np.int32), 32: ids["ids32"].astype(np.int32)}


@pytest.mark.parametrize("context_length", [77, 32])
def test_clip_tokenize_matches_open_clip(golden, context_length):
    strings, ids = golden
    assert len(strings) >= 1000
    got = tokenize(strings, context_length=context_length)
    assert got.dtype == np.int32 and got.shape == (len(strings), context_length)
    bad = [i for i in range(len(strings)) if not np.array_equal(got[i], ids[context_length][i])]
    first = bad[0] if bad else 0
    assert not bad, f"{len(bad)} strings differ, first {strings[first]!r}: {got[first]} vs {ids[context_length][first]}"


def test_golden_set_covers_truncation_and_empty(golden):
    strings, ids = golden
    assert (ids[77][:, -1] == 49407).sum() >= 20  # truncated rows end with EOT
    assert (ids[32][:, -1] == 49407).sum() >= 100
    assert "" in strings
    empty = strings.index("")
    assert list(ids[77][empty, :3]) == [49406, 49407, 0]


def test_clip_layout_and_attributes():
    tok = default_tokenizer()
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id, tok.context_length) == (49408, 49406, 49407, 77)
    out = tokenize("a photo of a cat")
    assert out.shape == (1, 77) and out.dtype == np.int32
    n = len(tok.encode("a photo of a cat"))
    assert out[0, 0] == 49406 and out[0, n + 1] == 49407 and not out[0, n + 2 :].any()
    assert int(np.argmax(out[0])) == n + 1  # the text tower pools here
    assert np.array_equal(tok(["a photo of a cat"]), out)
    assert tok("x", context_length=5).shape == (1, 5)


def test_clip_truncation_keeps_eot_last():
    out = tokenize("word " * 200, context_length=10)
    assert out[0, 0] == 49406 and out[0, -1] == 49407 and (out[0, 1:-1] != 0).all()


def test_clip_decode_round_trip():
    tok = default_tokenizer()
    text = "a photo of a café, it's 3 dogs! 😀"
    ids = tok(text)[0]
    assert tok.decode(ids) == "a photo of a café , it 's 3 dogs ! 😀"
    assert tok.decode(tok.encode("hello world")) == "hello world"
    raw = tok.decode(ids, skip_special_tokens=False)
    assert raw.startswith("<start_of_text>a photo") and "<end_of_text>" in raw


def test_clip_tokenizer_instance_matches_module_function(golden):
    strings, ids = golden
    tok = ClipTokenizer(context_length=32)
    assert np.array_equal(tok(strings[:50]), ids[32][:50])


def test_tokenizers_pickle(spm_model):
    clip = pickle.loads(pickle.dumps(default_tokenizer()))
    assert np.array_equal(clip(["a cat", "ünïcode 😀"]), tokenize(["a cat", "ünïcode 😀"]))
    spm_tok, _ = spm_model
    again = pickle.loads(pickle.dumps(spm_tok))
    assert np.array_equal(again(["a red cat"]), spm_tok(["a red cat"]))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a", context_length=1)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tokenize(["a", 3])
    with pytest.raises(ValueError, match="outside"):
        default_tokenizer().decode([49408])


def test_get_tokenizer_specs(tmp_path):
    assert isinstance(get_tokenizer(None), ClipTokenizer)
    assert get_tokenizer("clip") is default_tokenizer()
    assert get_tokenizer("clip", context_length=16).context_length == 16
    with pytest.raises(ValueError, match=r"'bert'.*sentencepiece:"):
        get_tokenizer("bert")
    with pytest.raises(ValueError, match="sentencepiece:"):
        get_tokenizer("sentencepiece:")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        get_tokenizer(f"sentencepiece:{tmp_path}/nope.model")


# ---------------------------------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------------------------------

ADJ = "red blue green small large old young happy shiny wooden fluffy tall tiny golden striped spotted".split()
NOUN = "cat dog car house tree bird boat person child mountain river city flower bicycle guitar robot".split()
PLACE = ["on the beach", "in a park", "at night", "under a cloudy sky", "next to a building", "in the snow"]


SYLLABLES = "ka lo mi nu re sa ti vo ze ban dor fil gum hex jor kip lum nar pov qui rus tev wix yol".split()


def captions(n: int, seed: int = 0) -> list[str]:
    """Captions from a small grammar, with made-up names so the corpus has a few hundred distinct words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        place, number = rng.choice(PLACE), rng.randint(0, 99)
        out.append(f"A {rng.choice(ADJ)} {rng.choice(NOUN)} named {name} {place}, photo {number}.")
    return out


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "captions.model"
    tok = SentencePieceTokenizer.train(iter(captions(3000)), path, vocab_size=256)
    return tok, path


def test_sentencepiece_special_ids(spm_model):
    tok, _ = spm_model
    assert tok.vocab_size == 256
    assert (tok.pad_token_id, tok.sot_token_id, tok.eot_token_id) == (0, 2, 255)
    ids = tok(captions(200, seed=1) + ["ünseen wörds ✨ &amp;"])  # [N, 77]
    assert ids.max() == tok.eot_token_id
    # the EOT is the unique maximum of every row, so argmax pooling lands on it
    for row in ids:
        eot_at = int(np.argmax(row))
        assert row[eot_at] == tok.eot_token_id and (row == tok.eot_token_id).sum() == 1
        assert row[0] == tok.sot_token_id and not row[eot_at + 1 :].any() and (row[1:eot_at] > 0).all()


def test_sentencepiece_save_load_same_ids(spm_model):
    tok, path = spm_model
    texts = captions(50, seed=2)
    again = get_tokenizer(f"sentencepiece:{path}")
    assert isinstance(again, SentencePieceTokenizer)
    assert np.array_equal(again(texts), tok(texts))
    assert again(texts).dtype == np.int32


def test_sentencepiece_truncation_and_decode(spm_model):
    tok, _ = spm_model
    long = " ".join(captions(20, seed=3))
    ids = tok(long, context_length=8)
    assert ids.shape == (1, 8) and ids[0, 0] == 2 and ids[0, -1] == 255 and (ids[0] != 0).all()
    full = tok.encode(long)
    assert list(ids[0, 1:-1]) == full[:6]
    assert tok.decode(tok("A Red Cat on the beach.")[0]) == "a red cat on the beach."


def test_sentencepiece_rejects_foreign_layout(tmp_path):
    path = tmp_path / "plain.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions(500)), model_prefix=str(tmp_path / "plain"), vocab_size=200, minloglevel=2
    )
    with pytest.raises(ValueError, match="plain.model.*eos_id=vocab_size-1"):
        SentencePieceTokenizer(path)


def test_sentencepiece_vocab_too_large(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=5000"):
        SentencePieceTokenizer.train(captions(100), tmp_path / "big.model", vocab_size=5000)
