"""Export to Hugging Face transformers and open_clip.

Default suite (no torch): importing the committed fixtures and exporting them again reproduces the source tensors
exactly (read back from the original safetensors files) and an equivalent config; workdirs of models trained with
clipjax export and read back to the same embeddings; the HF tokenizer files encode clipjax's BPE.
Parity (torch, transformers, open_clip): the exported directories load in the real packages and give our embeddings;
transformers' tokenizer built from the exported files gives clipjax's ids.
"""

import dataclasses
import json
import pathlib
import re
import shutil
import unicodedata

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors import safe_open

import clipjax
from clipjax import export
from clipjax.checkpoint import Checkpointer
from clipjax.interop.hf import config_from_hf
from clipjax.models import CLIP, CLIPConfig, TextConfig, VisionConfig
from clipjax.train import TrainState

TOL = 1e-5
ROOT = pathlib.Path(__file__).resolve().parents[1]
# A tiny model with CLIP's BPE vocabulary, so that the HF directory gets tokenizer files.
BPE_VIT = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=1, width=64, patch_size=8, head_width=32),
                     text=TextConfig(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
                     quick_gelu=True)
BPE_RN = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=(1, 1, 1, 1), width=8, patch_size=None),
                    text=TextConfig(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))


def rel_err(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def read_safetensors(path):
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same_tensors(original, exported):
    assert sorted(exported) == sorted(original)
    for k in original:
        a, b = original[k], exported[k]
        assert (b.dtype, b.shape) == (a.dtype, a.shape), k
        np.testing.assert_array_equal(b, a, err_msg=k)


def assert_same_variables(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _fixture(fixtures_dir, name, *files):
    for f in files:
        assert (fixtures_dir / name / f).is_file(), f"missing fixture {name}/{f}: run tests/fixtures/make_fixtures.py"
    return fixtures_dir / name


# ============================================================================================ round trips

# Keys of a transformers CLIPConfig that define the model (weights layout, activations, pooling).
HF_MODEL_KEYS = ("projection_dim", "logit_scale_init_value", "model_type")
HF_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id", "projection_dim")
HF_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "num_channels", "hidden_act", "layer_norm_eps", "projection_dim")


def test_hf_fixture_round_trip_is_exact(fixtures_dir, tmp_path):
    src = _fixture(fixtures_dir, "hf_clip", "config.json", "model.safetensors")
    out = export.export_hf(clipjax.load(src), tmp_path / "hf")
    original, _ = read_safetensors(src / "model.safetensors")
    exported, meta = read_safetensors(out / "model.safetensors")
    assert_same_tensors(original, exported)
    assert meta == {"format": "pt"}  # transformers refuses safetensors files without it
    a = json.loads((src / "config.json").read_text())
    b = json.loads((out / "config.json").read_text())
    assert b["architectures"] == ["CLIPModel"]
    for k in HF_MODEL_KEYS:
        assert b[k] == a[k], k
    for k in HF_TEXT_KEYS:
        assert b["text_config"][k] == a["text_config"][k], k
    for k in HF_VISION_KEYS:
        assert b["vision_config"][k] == a["vision_config"][k], k
    assert config_from_hf(b) == config_from_hf(a)
    # the fixture's vocabulary is not CLIP's BPE: no tokenizer files, only the image processor's
    assert not (out / "vocab.json").exists()
    proc = json.loads((out / "preprocessor_config.json").read_text())
    assert proc["crop_size"] == {"height": 32, "width": 32} and proc["size"] == {"shortest_edge": 32}


@pytest.mark.parametrize("name", ["openclip_vit", "openclip_rn"])
def test_open_clip_fixture_round_trip_is_exact(fixtures_dir, tmp_path, name):
    src = _fixture(fixtures_dir, name, "model.safetensors", "open_clip_config.json")
    model = clipjax.load(src / "model.safetensors", src / "open_clip_config.json")
    out = export.export_open_clip(model, tmp_path / "oc", name="tiny")
    original, _ = read_safetensors(src / "model.safetensors")
    exported, _ = read_safetensors(out / "model.safetensors")
    assert_same_tensors(original, exported)  # ResNet: BatchNorm running stats and int64 num_batches_tracked too
    if name == "openclip_rn":
        n_bn = sum(k.endswith(".running_mean") for k in original)
        assert n_bn > 0 and sum(k.endswith("num_batches_tracked") for k in exported) == n_bn
    want = CLIPConfig.from_open_clip(src / "open_clip_config.json")
    assert CLIPConfig.from_open_clip(out / "tiny.json") == want
    again = clipjax.load(out / "model.safetensors", out / "tiny.json")
    for x, y in zip(jax.tree.leaves(again.variables), jax.tree.leaves(model.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_hf_fixture_exports_to_open_clip_with_same_embeddings(fixtures_dir, tmp_path):
    """HF pools at the first EOT (id 999 here), open_clip at argmax: the same position, as EOT is the largest id."""
    src = _fixture(fixtures_dir, "hf_clip", "io.npz")
    model = clipjax.load(src)
    out = export.export_open_clip(model, tmp_path, name="from-hf")
    again = clipjax.load(out / "model.safetensors", out / "from-hf.json")
    assert again.config.text.eot_token_id is None and model.config.text.eot_token_id == 999
    assert_same_variables(again.variables, model.variables)
    io = np.load(src / "io.npz")
    np.testing.assert_array_equal(np.asarray(again.encode_text(io["tokens"])),
                                  np.asarray(model.encode_text(io["tokens"])))


# ============================================================================================ trained workdirs

def make_workdir(path, cfg):
    """A workdir as `clipjax.train.train` writes it: config.json + an orbax checkpoint of its `TrainState`, holding
    weights and BatchNorm statistics drawn at random (nothing is compiled: shapes come from `jax.eval_shape`)."""
    s, length = cfg.vision.image_size, cfg.text.context_length
    shapes = nn.meta.unbox(jax.eval_shape(CLIP(cfg).init, jax.random.key(0), jnp.zeros((1, s, s, 3)),
                                          jnp.zeros((1, length), jnp.int32)))
    rng = np.random.default_rng(0)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if "var" in name:  # BatchNorm variances
            value = rng.uniform(0.5, 1.5, x.shape)
        elif "scale" in name:  # norm gains; the temperature
            value = (np.log(1 / 0.07) if "logit" in name else 1.0) + rng.normal(0, 0.1, x.shape)
        else:
            value = rng.normal(0, 0.05, x.shape)
        return np.asarray(value, np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    params = variables["params"]
    state = TrainState(step=np.int32(7), params=params, opt_state=optax.adamw(1e-3).init(params),
                       batch_stats=variables.get("batch_stats", {}), rng=np.asarray(jax.random.PRNGKey(0)),
                       nonfinite_streak=np.int32(0), nonfinite_total=np.int32(0))
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"config": {}, "model_config": cfg.to_dict()}))
    ckpt = Checkpointer(path / "checkpoints", async_save=False)
    ckpt.save(7, state, force=True)
    ckpt.close()
    return path, variables


@pytest.fixture(scope="module")
def vit_workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("vit") / "workdir", BPE_VIT)


def test_trained_workdir_exports_through_the_cli(vit_workdir, tmp_path):
    workdir, variables = vit_workdir
    assert export.main(["--model", str(workdir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    exported = clipjax.load(tmp_path / "hf")
    assert exported.config == BPE_VIT.replace(text=dataclasses.replace(BPE_VIT.text, eot_token_id=None))
    assert_same_variables(exported.variables, variables)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt",
            "tokenizer_config.json", "special_tokens_map.json"} <= files
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == 16 and tok_cfg["tokenizer_class"] == "CLIPTokenizer"
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["text_config"]["eos_token_id"] == 2  # transformers' argmax pooling, as clipjax's
    assert hf_cfg["text_config"]["hidden_act"] == hf_cfg["vision_config"]["hidden_act"] == "quick_gelu"
    # the same model in open_clip format (from the Pretrained: the workdir path is the same `clipjax.load`)
    out = export.export_open_clip(exported, tmp_path / "oc", name="tiny-bpe")
    again = clipjax.load(out / "model.safetensors", out / "tiny-bpe.json")
    assert again.config == exported.config
    assert_same_variables(again.variables, variables)


def test_resnet_exports_to_open_clip_only(fixtures_dir, tmp_path, capsys):
    src = _fixture(fixtures_dir, "openclip_rn", "model.safetensors", "open_clip_config.json")
    args = ["--model", str(src / "model.safetensors"), "--config", str(src / "open_clip_config.json")]
    code = export.main([*args, "--format", "hf", "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "needs a ViT image tower" in err and "ModifiedResNet" in err and "use --format open_clip" in err
    assert not (tmp_path / "hf").exists()
    assert export.main([*args, "--format", "open_clip", "--out", str(tmp_path / "oc"), "--name", "rn"]) == 0
    original, _ = read_safetensors(src / "model.safetensors")
    exported, _ = read_safetensors(tmp_path / "oc" / "model.safetensors")
    assert_same_tensors(original, exported)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert export.main(["--model", str(tmp_path / "nothing"), "--format", "hf", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such file" in err


@pytest.mark.parametrize("name", ["a/b", "../up", ".hidden", ""])
def test_an_open_clip_name_that_is_not_a_file_stem_is_refused_before_anything_is_written(name, tmp_path, capsys):
    args = ["--model", str(tmp_path / "nothing"), "--format", "open_clip", "--out", str(tmp_path / "o"), "--name", name]
    assert export.main(args) == 2
    assert f"open_clip model name {name!r}: use letters, digits" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_readme_example_on_the_demo_model_explains_hf_needs_a_vit(tmp_path, capsys):
    """`python -m clipjax.export --model runs/demo --format hf --out exported/`: the demo model has a ModifiedResNet
    image tower; the error says so in one line and points at open_clip, which works."""
    workdir, variables = make_workdir(tmp_path / "demo", BPE_RN)
    assert export.main(["--model", str(workdir), "--format", "hf", "--out", str(tmp_path / "exported")]) == 2
    line = _error_line(capsys)
    assert str(workdir) in line and "needs a ViT image tower" in line and "--format open_clip" in line
    assert not (tmp_path / "exported").exists()
    assert export.main(["--model", str(workdir), "--format", "open_clip", "--out", str(tmp_path / "exported")]) == 0
    again = clipjax.load(tmp_path / "exported" / "model.safetensors", tmp_path / "exported" / "clipjax-model.json")
    assert_same_variables(again.variables, variables)


def test_export_never_overwrites_without_force(fixtures_dir, tmp_path, capsys):
    hf = _fixture(fixtures_dir, "hf_clip", "config.json", "model.safetensors")
    args = ["--model", str(hf), "--format", "hf"]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "config.json").write_text('{"mine": true}')
    assert export.main([*args, "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert f"--out {out} is not empty" in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert (out / "config.json").read_text() == '{"mine": true}'
    assert export.main([*args, "--out", str(out), "--force"]) == 0  # replaces the exported files only
    assert (out / "notes.txt").read_text() == "keep me" and clipjax.load(out).config == clipjax.load(hf).config
    assert not list(out.glob(".*.tmp"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export.main([*args, "--out", str(empty)]) == 0  # an empty directory needs no --force


def test_export_refuses_files_workdirs_and_its_own_source(fixtures_dir, vit_workdir, tmp_path, capsys):
    hf = _fixture(fixtures_dir, "hf_clip", "config.json", "model.safetensors")
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a directory")
    assert export.main(["--model", str(hf), "--format", "hf", "--out", str(a_file)]) == 2
    assert f"--out {a_file} is an existing file" in _error_line(capsys) and a_file.read_text() == "not a directory"
    workdir, _ = vit_workdir
    before = (workdir / "config.json").read_text()
    for target in (workdir, _metrics_only_workdir(tmp_path / "run")):
        assert export.main(["--model", str(hf), "--format", "hf", "--out", str(target), "--force"]) == 2
        assert "is a clipjax training workdir" in _error_line(capsys)
    assert (workdir / "config.json").read_text() == before and not (workdir / "model.safetensors").exists()
    copy = tmp_path / "hf_copy"
    shutil.copytree(hf, copy)
    assert export.main(["--model", str(copy), "--format", "hf", "--out", str(copy), "--force"]) == 2
    assert "holds the model being exported" in _error_line(capsys)


def _metrics_only_workdir(path: pathlib.Path) -> pathlib.Path:
    """A training workdir before its first checkpoint: config.json + metrics.jsonl."""
    path.mkdir()
    (path / "config.json").write_text('{"config": {}}')
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    return path


def test_forced_export_removes_a_previous_export_s_stale_tokenizer(fixtures_dir, vit_workdir, tmp_path):
    """A CLIP-BPE model writes tokenizer files; a forced export of a model with another vocabulary into the same
    directory removes them (they would describe the wrong vocabulary)."""
    out = tmp_path / "hf"
    assert export.main(["--model", str(vit_workdir[0]), "--format", "hf", "--out", str(out)]) == 0
    assert (out / "vocab.json").is_file()
    hf = _fixture(fixtures_dir, "hf_clip", "config.json", "model.safetensors")  # a 1000-id vocabulary
    assert export.main(["--model", str(hf), "--format", "hf", "--out", str(out), "--force"]) == 0
    assert not any((out / name).exists() for name in ("vocab.json", "merges.txt", "tokenizer_config.json"))


def test_usage_errors_are_one_line_and_help_exits_0(capsys):
    with pytest.raises(SystemExit) as usage:
        export.main(["--model", "x", "--format", "onnx", "--out", "y"])
    assert usage.value.code == 2 and "invalid choice: 'onnx'" in _error_line(capsys)
    with pytest.raises(SystemExit) as helped:
        export.main(["--help"])
    assert helped.value.code == 0 and "--force" in capsys.readouterr().out


# ============================================================================================ tokenizer files

def test_hf_tokenizer_files_encode_clipjax_bpe():
    from clipjax.data.tokenizer import ClipTokenizer
    from clipjax.interop.export_hf import tokenizer_files

    files = tokenizer_files(77)
    vocab = json.loads(files["vocab.json"])
    lines = files["merges.txt"].splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    # every merge result is in the vocabulary, in merge order after the 512 byte tokens (as CLIPTokenizer expects)
    for rank, line in enumerate(lines[1:]):
        a, b = line.split(" ")
        assert vocab[a + b] == 512 + rank
    tok = ClipTokenizer()
    hf_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    for token, i in tok.encoder.items():
        assert vocab.get(hf_names.get(token, token)) == i
    special = json.loads(files["special_tokens_map.json"])
    assert special["pad_token"] == special["eos_token"] == "<|endoftext|>"


# ============================================================================================ parity (torch)

def _images_and_tokens(cfg, n=3):
    s = cfg.vision.image_size
    images = np.random.default_rng(1).standard_normal((n, s, s, 3)).astype(np.float32)
    return images, np.asarray(clipjax.tokenize(["a photo of a dog", "a red circle!", "x"][:n], cfg.text.context_length))


def _torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def _hf_features(torch, model, images, tokens):
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
        tok = torch.from_numpy(np.asarray(tokens, np.int64))
        txt = model.get_text_features(input_ids=tok, attention_mask=(tok != 0).long())
    if not isinstance(img, torch.Tensor):  # transformers >= 5 returns an output object
        img, txt = img.pooler_output, txt.pooler_output
    return img.numpy(), txt.numpy()


@pytest.mark.parity
@pytest.mark.parametrize("name", ["hf_clip", "openclip_vit"])
def test_hf_export_loads_in_transformers(fixtures_dir, tmp_path, name):
    torch = _torch()
    transformers = pytest.importorskip("transformers")
    src = _fixture(fixtures_dir, name, "io.npz")
    model = clipjax.load(src) if name == "hf_clip" else clipjax.load(src / "model.safetensors",
                                                                     src / "open_clip_config.json")
    out = export.export_hf(model, tmp_path / "hf")
    hf, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    io = np.load(src / "io.npz")
    img, txt = _hf_features(torch, hf.eval(), io["images"], io["tokens"])
    assert rel_err(img, model.encode_image(io["images"])) <= TOL
    assert rel_err(txt, model.encode_text(io["tokens"])) <= TOL
    assert rel_err(img, io["image_features_f64"]) <= TOL and rel_err(txt, io["text_features_f64"]) <= TOL
    assert float(hf.logit_scale.detach()) == model.logit_scale


@pytest.mark.parity
def test_trained_workdir_in_transformers_with_its_processor(vit_workdir, tmp_path):
    """An exported clipjax-trained model loads in transformers, and CLIPProcessor works offline from its files."""
    torch = _torch()
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    out = tmp_path / "hf"
    assert export.main(["--model", str(vit_workdir[0]), "--format", "hf", "--out", str(out)]) == 0
    ours = clipjax.Pretrained(BPE_VIT, jax.tree.map(jnp.asarray, vit_workdir[1]))
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    proc = transformers.CLIPProcessor.from_pretrained(out, local_files_only=True)
    texts = ["a photo of a dog", "A RED circle, next to two squares!", "x"]
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 50, 3), dtype=np.uint8)) for i in range(3)]
    inputs = proc(text=texts, images=pil, return_tensors="pt", padding=True)
    assert tuple(inputs["pixel_values"].shape) == (3, 3, 32, 32)
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=inputs["pixel_values"])
        txt = hf.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img = getattr(img, "pooler_output", img).numpy()
    txt = getattr(txt, "pooler_output", txt).numpy()
    # the same pixels and our own tokenization through clipjax
    assert rel_err(img, ours.encode_image(inputs["pixel_values"].numpy().transpose(0, 2, 3, 1))) <= TOL
    assert rel_err(txt, ours.encode_text(ours.tokenize(texts))) <= TOL
    # transformers' image processor: bicubic resize + center crop + OpenAI normalisation, like clipjax.preprocess
    # up to resampling differences between PIL and torchvision
    pix = inputs["pixel_values"].numpy().transpose(0, 2, 3, 1)
    for i, im in enumerate(pil):
        assert np.abs(pix[i] - ours.preprocess(im)).mean() < 0.02


@pytest.mark.parity
def test_hf_tokenizer_ids_equal_clipjax(fixtures_dir, tmp_path):
    """transformers' CLIPTokenizer from the exported files gives clipjax.tokenize's ids (up to its padding)."""
    transformers = pytest.importorskip("transformers")
    from clipjax.data.tokenizer import basic_clean
    from clipjax.interop.export_hf import tokenizer_files

    strings_file = fixtures_dir / "tokenizer" / "strings.json"
    assert strings_file.is_file(), f"missing fixture {strings_file}"
    for name, text in tokenizer_files(77).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    tok = transformers.CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    strings = json.loads(strings_file.read_text())
    # Documented differences (clipjax/interop/export_hf.py): literal special-token strings and the Greek final
    # sigma (Python lowercases it contextually); and transformers does not run ftfy / HTML unescaping.
    special = re.compile(r"<\|?(start|end)_?of_?text\|?>", re.IGNORECASE)
    strings = [s for s in strings if not special.search(s) and "Σ" not in s]
    plain = [s for s in strings if basic_clean(s) == unicodedata.normalize("NFC", s).strip()]
    assert len(plain) >= 300 and len(strings) >= 1000
    cleaned = [c for c in map(basic_clean, strings) if basic_clean(c) == c]  # e.g. not "&amp;amp;amp;"
    assert len(cleaned) >= 1000
    for texts in (plain, cleaned):
        ours = clipjax.tokenize(texts)  # [N, 77]
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
        for i, row in enumerate(ours):
            n = list(row).index(49407) + 1
            np.testing.assert_array_equal(ids[i, :n], row[:n], err_msg=repr(texts[i]))
            assert (ids[i, n:] == 49407).all()  # transformers pads with <|endoftext|>, clipjax with 0


@pytest.mark.parity
@pytest.mark.parametrize("name", ["openclip_vit", "openclip_rn", "hf_clip"])
def test_open_clip_export_loads_in_open_clip(fixtures_dir, tmp_path, name):
    torch = _torch()
    open_clip = pytest.importorskip("open_clip")
    src = _fixture(fixtures_dir, name, "io.npz")
    model = clipjax.load(src) if name == "hf_clip" else clipjax.load(src / "model.safetensors",
                                                                     src / "open_clip_config.json")
    model_name = f"clipjax-test-{name}"
    out = export.export_open_clip(model, tmp_path, name=model_name)
    open_clip.add_model_config(str(out / f"{model_name}.json"))
    oc = open_clip.create_model(model_name, pretrained=str(out / "model.safetensors")).eval()
    io = np.load(src / "io.npz")
    with torch.no_grad():
        img = oc.encode_image(torch.from_numpy(io["images"].transpose(0, 3, 1, 2))).numpy()
        txt = oc.encode_text(torch.from_numpy(io["tokens"].astype(np.int64))).numpy()
    tol = 2e-5 if name == "openclip_rn" else TOL  # two float32 conv stacks (see test_parity.py)
    assert rel_err(img, model.encode_image(io["images"])) <= tol
    assert rel_err(txt, model.encode_text(io["tokens"])) <= TOL
    assert rel_err(img, io["image_features_f64"]) <= TOL


@pytest.mark.parity
def test_trained_resnet_workdir_in_open_clip(tmp_path):
    torch = _torch()
    open_clip = pytest.importorskip("open_clip")
    workdir, variables = make_workdir(tmp_path / "workdir", BPE_RN)
    assert export.main(["--model", str(workdir), "--format", "open_clip", "--out", str(tmp_path / "oc"),
                        "--name", "clipjax-test-rn-bpe"]) == 0
    open_clip.add_model_config(str(tmp_path / "oc" / "clipjax-test-rn-bpe.json"))
    oc = open_clip.create_model("clipjax-test-rn-bpe", pretrained=str(tmp_path / "oc" / "model.safetensors")).eval()
    ours = clipjax.Pretrained(BPE_RN, jax.tree.map(jnp.asarray, variables))
    images, tokens = _images_and_tokens(BPE_RN)
    with torch.no_grad():
        img = oc.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
        txt = oc.encode_text(open_clip.tokenize(["a photo of a dog", "a red circle!", "x"], 16)).numpy()
    assert rel_err(img, ours.encode_image(images)) <= 2e-5
    assert rel_err(txt, ours.encode_text(tokens)) <= TOL
