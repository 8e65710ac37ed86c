"""`python -m clipjax.evaluate` end to end on the Hugging Face fixture model (vocabulary 1000, so prompts go through
the folded CLIP tokenizer) over an ImageFolder read in place: the JSON summary has CLIP_benchmark's schema and
its numbers equal a NumPy computation from the model's own encoders."""

import json
import pathlib

import numpy as np
import pytest

from clipjax.data.preprocess import preprocess
from clipjax.evaluate.__main__ import main, run
from folded_tokenizer import FoldedTokenizer
from clipjax.interop.load import load

HF = pathlib.Path(__file__).parent / "fixtures" / "hf_clip"
from conftest import COLOURS, colour_folder  # noqa: E402


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return colour_folder(tmp_path_factory.mktemp("imagefolder"), COLOURS)


def _reference(folder):
    """Image and prompt features straight from the loaded model, and each image's label."""
    model = load(HF)
    paths = sorted(folder.glob("*/*.png"))
    labels = np.array([sorted(COLOURS).index(p.parent.name) for p in paths])
    img = np.asarray(model.encode_image(np.stack([preprocess(p, 32) for p in paths])))
    tok = FoldedTokenizer(1000, 16)
    prompts = [f"a photo of a {n.replace('_', ' ')}." for n in sorted(COLOURS)]
    txt = np.asarray(model.encode_text(tok(prompts)))
    return _unit(img), _unit(txt), labels


def test_cli_zeroshot_on_hf_fixture(folder, tmp_path, capsys):
    out = tmp_path / "res.json"
    result = run(["--model", str(HF), "--task", "zeroshot", "--data", str(folder), "--templates", "single",
                   "--tokenizer", "folded", "--batch-size", "4", "--out", str(out), "--cache-dir", str(tmp_path)])
    written = json.loads(out.read_text())
    assert written == json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(written)
    assert written["task"] == "zeroshot_classification" and written["language"] == "en"
    assert written["dataset"] == str(folder) and written["pretrained"] == str(HF)
    m = written["metrics"]
    assert m["num_examples"] == 6 and m["num_classes"] == 3 and "acc5" not in m
    assert set(m["per_class_recall"]) == {"blue sky", "green leaf", "red ball"}

    img, txt, labels = _reference(folder)
    pred = (img @ txt.T).argmax(1)
    assert m["acc1"] == pytest.approx(np.mean(pred == labels))
    # the cached classifier gives the same answer on a second run
    again = run(["--model", str(HF), "--task", "zeroshot", "--data", str(folder), "--templates", "single",
                  "--tokenizer", "folded", "--batch-size", "4", "--cache-dir", str(tmp_path)])
    assert again["metrics"]["acc1"] == m["acc1"]
    assert list(tmp_path.glob("classifier-*.npy"))


def test_cached_classifier_is_not_reused_for_the_same_weights_read_with_another_config(folder, tmp_path):
    """The same file evaluated with and without QuickGELU shares no cached classifier: each run equals its run
    without a cache (a reused classifier was a silent wrong score)."""
    cfg = load(HF).config
    quick_json, gelu = tmp_path / "quick.json", tmp_path / "gelu.json"  # open_clip configs: only the activation differs
    quick_json.write_text(json.dumps(cfg.replace(quick_gelu=True).to_open_clip()))
    gelu.write_text(json.dumps(cfg.replace(quick_gelu=False).to_open_clip()))
    common = ["--model", str(HF), "--task", "zeroshot", "--data", str(folder), "--templates", "single",
              "--tokenizer", "folded", "--batch-size", "4"]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    quick = run([*common, *cache, "--config", str(quick_json)])["metrics"]
    plain = run([*common, *cache, "--config", str(gelu)])["metrics"]
    a, b = (np.load(f) for f in (tmp_path / "cache").glob("classifier-*.npy"))  # exactly two
    assert not np.allclose(a, b, atol=1e-4)  # the activation changes the prompt features
    uncached = run([*common, "--cache-dir", "", "--config", str(gelu)])["metrics"]
    assert plain["per_class_recall"] == uncached["per_class_recall"] and plain["acc1"] == uncached["acc1"]
    again = run([*common, *cache, "--config", str(quick_json)])["metrics"]  # the first config: its own classifier
    assert again["per_class_recall"] == quick["per_class_recall"] and again["acc1"] == quick["acc1"]


def test_cli_retrieval_on_hf_fixture(folder):
    result = run(["--model", str(HF), "--task", "retrieval", "--data", str(folder), "--tokenizer", "folded",
                   "--batch-size", "4"])
    m = result["metrics"]
    assert result["task"] == "zeroshot_retrieval" and m["num_images"] == 6 and m["num_texts"] == 6
    img, txt, labels = _reference(folder)  # one caption per image: "a photo of a {class}."
    cap = txt[labels]  # [6, E] the caption of each image
    s = cap @ img.T  # [texts, images]
    t2i = np.mean([np.argsort(-s[t], kind="stable")[0] == t for t in range(6)])
    assert m["image_retrieval_recall@1"] == pytest.approx(t2i)
    assert m["image_retrieval_recall@10"] == 1.0 and m["text_retrieval_recall@10"] == 1.0


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_errors(folder, tmp_path, capsys):
    """Bad input: one `error:` line on stderr and status 2 (usage errors included); --help exits 0."""
    assert main(["--model", str(HF), "--task", "zeroshot", "--data", str(folder)]) == 2
    assert "vocabulary has 1000 ids" in _error_line(capsys)
    names = tmp_path / "names.txt"
    names.write_text("one\ntwo\n")
    assert main(["--model", str(HF), "--task", "zeroshot", "--data", str(folder), "--tokenizer", "folded",
                 "--classnames", str(names)]) == 2
    assert "2 class names given for 3 class folders" in _error_line(capsys)
    assert main(["--model", str(HF), "--task", "zeroshot", "--data", str(folder), "--tokenizer", "folded",
                 "--templates", "imagenett"]) == 2
    assert "unknown templates 'imagenett'" in _error_line(capsys)
    assert main(["--model", str(tmp_path / "missing"), "--task", "zeroshot", "--data", str(folder)]) == 2
    assert str(tmp_path / "missing") in _error_line(capsys)
    with pytest.raises(SystemExit) as usage:
        main(["--model", str(HF), "--task", "zero-shot", "--data", str(folder)])
    assert usage.value.code == 2 and "invalid choice: 'zero-shot'" in _error_line(capsys)
    with pytest.raises(SystemExit) as helped:
        main(["--help"])
    assert helped.value.code == 0 and "--split" in capsys.readouterr().out
