"""Text tokenizers: CLIP's byte-level BPE and trainable SentencePiece, with one call interface.

Every tokenizer maps a batch of strings to an int32 array [N, C] laid out as the text tower expects:
`[SOT, tokens..., EOT, 0, 0, ...]`. Sequences longer than C are cut to C tokens and the last one is replaced by EOT,
so EOT is always present. The text tower pools at the argmax of the ids, so EOT must be the largest id of the
vocabulary and padding must be 0; both tokenizers guarantee it.

`ClipTokenizer` reproduces OpenAI CLIP / open_clip `SimpleTokenizer` + `open_clip.tokenize` token for token. Its
merges file `bpe_simple_vocab_16e6.txt.gz` ships with this package; it comes from openai/CLIP (MIT License,
Copyright (c) 2021 OpenAI), as redistributed in open_clip.

Shapes: N strings in a batch, C context length.
"""

from __future__ import annotations

import functools
import gzip
import html
import io
import os
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import ftfy
import numpy as np
import regex

DEFAULT_CONTEXT_LENGTH = 77
BPE_PATH = pathlib.Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
_NUM_MERGES = 49152 - 256 - 2  # merges kept from the file (its first line is a header)
_SOT, _EOT = "<start_of_text>", "<end_of_text>"


class Tokenizer(Protocol):
    """What the rest of clipjax needs from a tokenizer."""

    vocab_size: int
    sot_token_id: int
    eot_token_id: int
    context_length: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------------------------------
# Text cleaning (shared)
# ---------------------------------------------------------------------------------------------------------------------


def basic_clean(text: str) -> str:
    """Repairs mojibake (ftfy), unescapes HTML entities twice (`&amp;amp;` → `&`) and strips."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapses every run of (unicode) whitespace to one space."""
    return " ".join(text.split()).strip()


def pack_tokens(token_lists: Sequence[Sequence[int]], context_length: int, sot: int, eot: int) -> np.ndarray:
    """[SOT, tokens, EOT] per row, cut to `context_length` with EOT kept last, zero padded → int32 [N, C]."""
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (room for start and end tokens), got {context_length}")
    out = np.zeros((len(token_lists), context_length), dtype=np.int32)  # [N, C]
    for row, tokens in enumerate(token_lists):
        seq = [sot, *tokens, eot]
        if len(seq) > context_length:
            seq = seq[:context_length]
            seq[-1] = eot
        out[row, : len(seq)] = seq
    return out


def _as_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
    return texts


# ---------------------------------------------------------------------------------------------------------------------
# CLIP byte-level BPE
# ---------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Maps each of the 256 byte values to a printable unicode character (OpenAI's reversible table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class ClipTokenizer:
    """OpenAI CLIP's byte-level BPE tokenizer (49 408 ids; SOT 49406, EOT 49407).

    Cleaning: ftfy.fix_text, HTML unescape (twice), strip, whitespace collapse, lowercase.
    """

    def __init__(
        self,
        bpe_path: str | os.PathLike[str] = BPE_PATH,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        cache_size: int = 1 << 18,
    ) -> None:
        try:
            with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except OSError as e:
            raise ValueError(f"cannot read BPE merges file {bpe_path}: {e}") from e
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"BPE merges file {bpe_path} does not hold {_NUM_MERGES} merge pairs")

        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += [_SOT, _EOT]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.pattern = regex.compile(
            rf"{_SOT}|{_EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE
        )
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder[_SOT]
        self.eot_token_id = self.encoder[_EOT]
        self.context_length = context_length
        self.cache_size = cache_size
        self._bpe = functools.lru_cache(maxsize=cache_size)(self._bpe_uncached)

    def __getstate__(self) -> dict:  # picklable for multiprocess data loaders: the cache is rebuilt
        state = self.__dict__.copy()
        del state["_bpe"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bpe = functools.lru_cache(maxsize=self.cache_size)(self._bpe_uncached)

    def _bpe_uncached(self, token: str) -> tuple[str, ...]:
        """Applies the merges to one pre-token (already byte-mapped); returns its BPE symbols."""
        if token in (_SOT, _EOT):
            return (token,)
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def clean(self, text: str) -> str:
        return whitespace_clean(basic_clean(text)).lower()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without start/end tokens."""
        ids: list[int] = []
        for piece in self.pattern.findall(self.clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[sym] for sym in self._bpe(mapped))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. With `skip_special_tokens`, drops SOT, stops at the first EOT (what follows is padding)
        and strips; without it, decodes every id exactly as open_clip does."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            if self.eot_token_id in ids:
                ids = ids[: ids.index(self.eot_token_id)]
            ids = [i for i in ids if i != self.sot_token_id]
        for i in ids:
            if i not in self.decoder:
                raise ValueError(f"token id {i} is outside the CLIP vocabulary [0, {self.vocab_size})")
        text = "".join(self.decoder[i] for i in ids)  # special tokens are printable ASCII: they decode as themselves
        out = bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")
        return out.strip() if skip_special_tokens else out

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """int32 [N, C] token ids, identical to `open_clip.tokenize(texts, context_length)`."""
        texts = _as_list(texts)
        return pack_tokens(
            [self.encode(t) for t in texts], context_length or self.context_length, self.sot_token_id, self.eot_token_id
        )


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """The shared ClipTokenizer instance (built once per process)."""
    return ClipTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    """CLIP token ids, int32 [N, C]; a single string gives N = 1. Same ids as `open_clip.tokenize`."""
    return default_tokenizer()(texts, context_length)


# ---------------------------------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------------------------------

PAD_ID, UNK_ID, SOT_ID = 0, 1, 2  # EOT is vocab_size - 1


class SentencePieceTokenizer:
    """SentencePiece tokenizer with CLIP's layout: pad 0, unk 1, SOT 2, EOT = vocab_size - 1 (the largest id).

    Text gets the same cleaning as CLIP's (ftfy, HTML unescape, whitespace collapse); lowercasing is done by the
    model's own normaliser (`nmt_nfkc_cf` for models made by `train`).
    """

    def __init__(self, model_path: str | os.PathLike[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        import sentencepiece as spm

        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {self.model_path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(self.model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot load SentencePiece model {self.model_path}: {e}") from e
        self.vocab_size = self.sp.get_piece_size()
        self.sot_token_id = self.sp.bos_id()
        self.eot_token_id = self.sp.eos_id()
        self.pad_token_id = self.sp.pad_id()
        if self.pad_token_id != 0 or self.eot_token_id != self.vocab_size - 1 or self.sot_token_id < 0:
            raise ValueError(
                f"SentencePiece model {self.model_path} has pad_id={self.pad_token_id}, "
                f"bos_id={self.sot_token_id}, eos_id={self.eot_token_id} with vocab_size={self.vocab_size}; "
                "clipjax needs pad_id=0, a bos id, and eos_id=vocab_size-1 (make one with SentencePieceTokenizer.train)"
            )
        self.context_length = context_length

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        model_path: str | os.PathLike[str],
        vocab_size: int = 32000,
        model_type: str = "unigram",
        character_coverage: float = 0.9995,
        byte_fallback: bool = False,
        input_sentence_size: int = 2_000_000,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ) -> SentencePieceTokenizer:
        """Trains a model on `texts` (any iterable of strings), writes it to `model_path` and loads it."""
        import sentencepiece as spm

        if vocab_size < 8:
            raise ValueError(f"vocab_size must be >= 8, got {vocab_size}")
        cleaned = (whitespace_clean(basic_clean(t)) for t in texts)
        buffer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(t for t in cleaned if t),
                model_writer=buffer,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                byte_fallback=byte_fallback,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                normalization_rule_name="nmt_nfkc_cf",
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=SOT_ID,
                eos_id=vocab_size - 1,
                pad_piece="<pad>",
                unk_piece="<unk>",
                bos_piece=_SOT,
                eos_piece=_EOT,
                minloglevel=2,
            )
        except RuntimeError as e:
            if "pieces_size() - 1" in str(e) or "Vocabulary size too high" in str(e):
                raise ValueError(
                    f"SentencePiece training for {os.fspath(model_path)}: vocab_size={vocab_size} is more pieces than "
                    "the corpus supports; lower vocab_size or give more text"
                ) from e
            raise ValueError(f"SentencePiece training for {os.fspath(model_path)} failed: {e}") from e
        path = pathlib.Path(model_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
        return cls(path, context_length=context_length)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without start/end tokens."""
        return self.sp.encode(whitespace_clean(basic_clean(text)), out_type=int)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; with `skip_special_tokens`, stops at the first EOT and drops pad/SOT ids."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size}) of {self.model_path}")
        if skip_special_tokens:
            if self.eot_token_id in ids:
                ids = ids[: ids.index(self.eot_token_id)]
            ids = [i for i in ids if i not in (self.pad_token_id, self.sot_token_id)]
        return self.sp.decode(ids)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """int32 [N, C]: [SOT, tokens..., EOT, 0...], cut like the CLIP tokenizer (EOT kept last)."""
        texts = _as_list(texts)
        return pack_tokens(
            [self.encode(t) for t in texts], context_length or self.context_length, self.sot_token_id, self.eot_token_id
        )


# ---------------------------------------------------------------------------------------------------------------------
# Selection by config string
# ---------------------------------------------------------------------------------------------------------------------

_SPM_PREFIX = "sentencepiece:"


TokenizerFactory = Callable[[int, int], Tokenizer]  # (vocab_size, context_length) → tokenizer
_REGISTERED: dict[str, TokenizerFactory] = {}


def register_tokenizer(name: str, factory: TokenizerFactory) -> None:
    """Make `name` a tokenizer spec everywhere a spec is taken (configs, `--tokenizer`): `factory(vocab_size,
    context_length)` builds it for a model's text tower. For tokenizers that are not CLIP BPE or SentencePiece."""
    if name in ("clip", "") or name.startswith(_SPM_PREFIX):
        raise ValueError(f"tokenizer name {name!r} is reserved")
    _REGISTERED[name] = factory


def get_tokenizer(
    spec: str | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH, vocab_size: int | None = None
) -> Tokenizer:
    """`None` or "clip" → the CLIP BPE tokenizer; "sentencepiece:/path/model.model" → that SentencePiece model;
    a name given to `register_tokenizer` → its factory's tokenizer for `vocab_size`."""
    if spec in _REGISTERED:
        if vocab_size is None:
            raise ValueError(f"tokenizer {spec!r} needs the model's vocabulary size")
        return _REGISTERED[spec](vocab_size, context_length)
    if spec is None or spec == "clip":
        if context_length == DEFAULT_CONTEXT_LENGTH:
            return default_tokenizer()
        return ClipTokenizer(context_length=context_length)
    if spec.startswith(_SPM_PREFIX) and len(spec) > len(_SPM_PREFIX):
        return SentencePieceTokenizer(spec[len(_SPM_PREFIX) :], context_length=context_length)
    raise ValueError(f"unknown tokenizer {spec!r}; valid forms: None, 'clip', 'sentencepiece:/path/to/model.model'"
                     + (f", {', '.join(map(repr, sorted(_REGISTERED)))}" if _REGISTERED else ""))
