"""The committed golden fixtures (tests/fixtures, made by make_fixtures.py, make_param_counts.py and
make_fidelity_fixtures.py): every file is
present, the io.npz and losses.npz arrays have the documented shapes and dtypes, and the stored numbers agree with
each other — logits with features and logit_scale, float32 features with their float64 reference, logit_scale with
the weight file, the fp16 OpenAI-style files with the fp32 safetensors value for value, losses and gradients with
an independent numpy computation. Needs no torch (the .pt files are read with clipjax's torch-free reader); a
missing fixture fails.

Shapes: B batch, S image side, L context length, E embed dim, D loss feature dim.
"""
import json
import pathlib
import zipfile

import numpy as np
import pytest
from safetensors.numpy import load_file

from clipjax.interop.torch_pickle import load_torch_file

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
BATCH, CONTEXT_LENGTH, EMBED_DIM = 4, 16, 32
SOT_ID, EOT_ID = 998, 999
IMAGE_SIDE = {"openclip_vit": 32, "openclip_rn": 64, "hf_clip": 32, "openclip_rn_head_width": 64}
FILES = {
    "openclip_vit": ("open_clip_config.json", "model.safetensors", "openai_jit.pt", "io.npz"),
    "openclip_rn": ("open_clip_config.json", "model.safetensors", "openai_state.pt", "io.npz"),
    "hf_clip": ("config.json", "model.safetensors", "io.npz"),
}
# make_fidelity_fixtures.py: one more model in the same io.npz layout, and the transparency goldens
FIDELITY_FILES = {
    "openclip_rn_head_width": ("open_clip_config.json", "model.safetensors", "io.npz"),
    "preprocess_alpha": ("expected.npz", "meta.json"),
}
MODELS = [*FILES, "openclip_rn_head_width"]
FIDELITY_MAX_BYTES = 1_000_000  # per directory
OPENAI_FILES = ("openclip_vit/openai_jit.pt", "openclip_rn/openai_state.pt")  # float16, as OpenAI ships weights
TOP_LEVEL = ("README.md", "make_fixtures.py", "make_param_counts.py", "versions.json", "losses.npz",
             "param_counts.json")
MAX_BYTES = 8_500_000  # everything make_fixtures.py writes; the weight files dominate


def load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    assert path.is_file(), f"missing fixture {path}; regenerate with tests/fixtures/make_fixtures.py"
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize(
    "relpath", [f"{d}/{f}" for d, files in {**FILES, **FIDELITY_FILES}.items() for f in files]
    + list(TOP_LEVEL) + ["make_fidelity_fixtures.py"]
)
def test_fixture_file_exists(relpath):
    path = FIXTURES / relpath
    assert path.is_file() and path.stat().st_size > 0, f"missing or empty fixture {path}"


@pytest.mark.parametrize("name", MODELS)
def test_io_shapes_and_dtypes(name):
    io = load_npz(FIXTURES / name / "io.npz")
    side = IMAGE_SIDE[name]
    expected = {
        "images": ((BATCH, side, side, 3), np.float32),  # NHWC
        "tokens": ((BATCH, CONTEXT_LENGTH), np.int32),
        "image_features": ((BATCH, EMBED_DIM), np.float32),
        "text_features": ((BATCH, EMBED_DIM), np.float32),
        "logit_scale": ((), np.float32),
        "logits_per_image": ((BATCH, BATCH), np.float32),
        "image_features_f64": ((BATCH, EMBED_DIM), np.float64),  # the same model run in float64
        "text_features_f64": ((BATCH, EMBED_DIM), np.float64),
    }
    assert sorted(io) == sorted(expected), f"{name}/io.npz keys {sorted(io)}"
    for key, (shape, dtype) in expected.items():
        assert io[key].shape == shape and io[key].dtype == dtype, f"{name}/io.npz {key}: {io[key].shape} {io[key].dtype}"
        if dtype != np.int32:
            assert np.all(np.isfinite(io[key])), f"{name}/io.npz {key} has non-finite values"


@pytest.mark.parametrize("name", MODELS)
def test_token_layout(name):
    tokens = load_npz(FIXTURES / name / "io.npz")["tokens"]  # [B, L]
    assert np.all(tokens[:, 0] == SOT_ID)
    assert np.all((tokens >= 0) & (tokens <= EOT_ID))
    eot = tokens.argmax(axis=-1)  # [B] argmax pooling position
    assert np.all(tokens[np.arange(BATCH), eot] == EOT_ID)
    assert np.all((tokens == EOT_ID).sum(axis=-1) == 1)
    positions = np.arange(CONTEXT_LENGTH)[None]  # [1, L]
    assert np.all((tokens != 0) == (positions <= eot[:, None])), "ids must be non-zero up to EOT and zero after"
    assert (eot == CONTEXT_LENGTH - 1).any(), "one row must fill the whole context"
    assert len(set(eot.tolist())) == BATCH, "rows must have different lengths"


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_features(name):
    io = load_npz(FIXTURES / name / "io.npz")
    image = l2_normalize(io["image_features"].astype(np.float64))  # [B, E]
    text = l2_normalize(io["text_features"].astype(np.float64))  # [B, E]
    logits = np.exp(io["logit_scale"].astype(np.float64)) * image @ text.T  # [B, B]
    np.testing.assert_allclose(io["logits_per_image"], logits, rtol=1e-5, atol=1e-5)
    assert np.abs(logits - logits.mean(axis=0)).max() > 0.1, "logits barely depend on the image"


@pytest.mark.parametrize("name", MODELS)
def test_float32_features_near_float64_reference(name):
    io = load_npz(FIXTURES / name / "io.npz")
    for key in ("image_features", "text_features"):
        wide = io[f"{key}_f64"]  # [B, E]
        err = np.abs(io[key] - wide).max() / np.abs(wide).max()
        assert 0 < err <= 1e-5, f"{name}: float32 {key} vs float64 relative error {err:.2e}"


@pytest.mark.parametrize("name", MODELS)
def test_weights_agree_with_io_and_config(name):
    weights = load_file(str(FIXTURES / name / "model.safetensors"))
    io = load_npz(FIXTURES / name / "io.npz")
    assert weights["logit_scale"].reshape(()) == io["logit_scale"]
    assert all(v.dtype == np.float32 for k, v in weights.items() if "num_batches_tracked" not in k)
    if name == "hf_clip":
        config = json.loads((FIXTURES / name / "config.json").read_text())
        assert config["projection_dim"] == EMBED_DIM
        assert weights["visual_projection.weight"].shape == (EMBED_DIM, config["vision_config"]["hidden_size"])
        assert weights["text_model.embeddings.position_embedding.weight"].shape[0] == CONTEXT_LENGTH
        assert config["text_config"]["eos_token_id"] == EOT_ID
    else:
        config = json.loads((FIXTURES / name / "open_clip_config.json").read_text())
        assert config["embed_dim"] == EMBED_DIM
        assert weights["text_projection"].shape == (config["text_cfg"]["width"], EMBED_DIM)
        assert weights["positional_embedding"].shape[0] == config["text_cfg"]["context_length"] == CONTEXT_LENGTH
        assert weights["token_embedding.weight"].shape[0] == config["text_cfg"]["vocab_size"] == EOT_ID + 1


@pytest.mark.parametrize("relpath", OPENAI_FILES)
def test_torch_archives_are_zip(relpath):
    path = FIXTURES / relpath
    assert zipfile.is_zipfile(path), f"{path} is not a torch zip archive"
    names = zipfile.ZipFile(path).namelist()
    assert any(n.endswith("/data.pkl") for n in names), f"{path} has no data.pkl"
    if relpath.endswith("jit.pt"):
        assert any("/code/" in n for n in names), f"{path} has no TorchScript code"
        assert not any(n.endswith(".debug_pkl") for n in names), f"{path} carries machine-specific debug records"


@pytest.mark.parametrize("relpath", OPENAI_FILES)
def test_half_precision_files_hold_the_safetensors_values(relpath):
    """The weights were rounded to float16 values before io.npz was made, so the fp16 OpenAI-style file and the
    fp32 model.safetensors hold the same numbers and both reproduce io.npz."""
    half = load_torch_file(FIXTURES / relpath)
    full = load_file(str(FIXTURES / relpath.split("/")[0] / "model.safetensors"))
    openai_ints = {"input_resolution", "context_length", "vocab_size"} if relpath.endswith("jit.pt") else set()
    assert set(half) == set(full) | openai_ints, f"{relpath}: keys differ from model.safetensors"
    for key, value in full.items():
        if value.dtype.kind == "f":
            assert half[key].dtype == np.float16, f"{relpath} {key}: {half[key].dtype}, expected float16"
            np.testing.assert_array_equal(half[key].astype(np.float32), value, err_msg=f"{relpath} {key}")
        else:
            np.testing.assert_array_equal(half[key], value, err_msg=f"{relpath} {key}")
    if openai_ints:
        io = load_npz(FIXTURES / "openclip_vit" / "io.npz")
        assert int(half["input_resolution"]) == io["images"].shape[1]
        assert int(half["context_length"]) == io["tokens"].shape[1] == CONTEXT_LENGTH
        assert int(half["vocab_size"]) == EOT_ID + 1


def test_total_size():
    paths = [FIXTURES / d / f for d, files in FILES.items() for f in files]
    paths += [FIXTURES / f for f in TOP_LEVEL]
    total = sum(p.stat().st_size for p in paths if p.is_file())
    assert total <= MAX_BYTES, f"model fixtures take {total / 1e6:.2f} MB, more than {MAX_BYTES / 1e6:.1f} MB"


@pytest.mark.parametrize("name", FIDELITY_FILES)
def test_fidelity_fixture_size(name):
    total = sum(p.stat().st_size for p in (FIXTURES / name).rglob("*") if p.is_file())
    assert total <= FIDELITY_MAX_BYTES, f"{name} takes {total / 1e6:.2f} MB, more than {FIDELITY_MAX_BYTES / 1e6} MB"


def test_preprocess_alpha_goldens_are_complete():
    root = FIXTURES / "preprocess_alpha"
    meta = json.loads((root / "meta.json").read_text())
    expected = load_npz(root / "expected.npz")
    other = json.loads((FIXTURES / "preprocess" / "meta.json").read_text())
    assert meta["versions"] == other["versions"], "preprocessing goldens made with different package versions"
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(meta["images"])
    for name, info in meta["images"].items():
        w, h = info["size"]
        assert expected[f"{name}:rgb"].shape == (h, w, 3) and expected[f"{name}:rgb"].dtype == np.uint8, name
        for s in info["image_sizes"]:
            for key in (f"{name}@{s}", f"{name}@{s}:imagefolder"):
                assert expected[key].shape == (s, s, 3) and expected[key].dtype == np.uint8, key
    assert len(expected) == sum(1 + 2 * len(info["image_sizes"]) for info in meta["images"].values())


def test_losses_match_numpy():
    z = load_npz(FIXTURES / "losses.npz")
    image, text = z["image_features"].astype(np.float64), z["text_features"].astype(np.float64)  # [B, D]
    n = image.shape[0]
    assert image.shape == text.shape == (8, 16)
    assert all(v.dtype == np.float32 for v in z.values())
    np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(z["logit_scale_raw"], np.log(1 / 0.07), rtol=1e-6)
    np.testing.assert_allclose(z["siglip_logit_scale_raw"], np.log(10.0), rtol=1e-6)
    assert z["logit_bias"] == -10.0
    eye = np.eye(n)
    sims = image @ text.T  # [B, B]

    # Softmax CLIP loss: mean of the image->text and text->image cross-entropies with targets on the diagonal.
    scale = np.exp(float(z["logit_scale_raw"]))
    logits = scale * sims  # [B, B]
    p_rows = np.exp(logits - logits.max(1, keepdims=True))
    p_rows /= p_rows.sum(1, keepdims=True)  # softmax over texts
    p_cols = np.exp(logits - logits.max(0, keepdims=True))
    p_cols /= p_cols.sum(0, keepdims=True)  # softmax over images
    loss = -0.5 * (np.log(np.diag(p_rows)).mean() + np.log(np.diag(p_cols)).mean())
    grad = 0.5 * ((p_rows - eye) + (p_cols - eye)) / n  # dL/dlogits [B, B]
    np.testing.assert_allclose(z["clip_loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(z["clip_grad_image"], scale * grad @ text, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(z["clip_grad_text"], scale * grad.T @ image, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(z["clip_grad_logit_scale_raw"], (grad * logits).sum(), rtol=1e-4)

    # Sigmoid loss: -sum log sigmoid(label * logit) / B, label +1 on the diagonal and -1 elsewhere.
    scale, bias = np.exp(float(z["siglip_logit_scale_raw"])), float(z["logit_bias"])
    logits = scale * sims + bias  # [B, B]
    labels = 2 * eye - 1
    loss = np.logaddexp(0.0, -labels * logits).sum() / n
    grad = -labels / (1 + np.exp(labels * logits)) / n  # dL/dlogits [B, B]
    np.testing.assert_allclose(z["siglip_loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(z["siglip_grad_image"], scale * grad @ text, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(z["siglip_grad_text"], scale * grad.T @ image, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(z["siglip_grad_logit_scale_raw"], (grad * scale * sims).sum(), rtol=1e-4)
    np.testing.assert_allclose(z["siglip_grad_logit_bias"], grad.sum(), rtol=1e-4)
