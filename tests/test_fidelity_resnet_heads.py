"""ModifiedResNet attention-pool heads = width * 32 // head_width, as open_clip builds it.

The fixture (tests/fixtures/openclip_rn_head_width, made by make_fidelity_fixtures.py with the real open_clip) is a
ResNet with head_width 16: 4 * 32 // 16 = 8 heads, where OpenAI's fixed 64-wide heads would give 2. Its weights load
either way (the head count changes no tensor shape), so only the values tell the two rules apart.
Relative error = max |ours − theirs| / max |theirs|.
"""

import json

import numpy as np
import pytest

import clipjax
from clipjax.interop.openai import infer_config
from clipjax.models import get_model_config

TOL = 1e-5


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def fixture(request):
    d = request.config.rootpath / "tests" / "fixtures" / "openclip_rn_head_width"
    with np.load(d / "io.npz") as z:
        io = {k: z[k] for k in z.files}
    return d, io


def test_config_reads_head_width(fixture):
    d, _ = fixture
    cfg = get_model_config(str(d / "open_clip_config.json"))
    assert cfg.vision.is_resnet and cfg.vision.head_width == 16
    assert cfg.vision.heads == 8  # not 4 * 32 // 64 = 2


def test_features_match_open_clip(fixture):
    d, io = fixture
    model = clipjax.load(d / "model.safetensors", d / "open_clip_config.json")
    image = model.encode_image(io["images"])  # [B, E]
    text = model.encode_text(io["tokens"])  # [B, E]
    assert rel_err(image, io["image_features_f64"]) <= TOL
    assert rel_err(image, io["image_features"]) <= 2 * TOL  # two float32 conv stacks; f64 is the strict check
    assert rel_err(text, io["text_features_f64"]) <= TOL
    assert model.logit_scale == pytest.approx(float(io["logit_scale"]), abs=1e-7)


def test_sixty_four_wide_heads_give_other_numbers(fixture):
    """The fixture separates the rules: the same weights with 2 heads are far from open_clip's features."""
    d, io = fixture
    cfg = json.loads((d / "open_clip_config.json").read_text())
    cfg["vision_cfg"]["head_width"] = 64
    model = clipjax.load(d / "model.safetensors", cfg)
    assert model.config.vision.heads == 2
    assert rel_err(model.encode_image(io["images"]), io["image_features_f64"]) > 0.05


def test_export_keeps_head_width(fixture):
    d, _ = fixture
    cfg = get_model_config(str(d / "open_clip_config.json"))
    exported = cfg.to_open_clip()
    assert exported["vision_cfg"]["head_width"] == 16
    assert get_model_config(exported) == cfg


def test_openai_resnets_keep_sixty_four_wide_heads(fixtures_dir):
    """OpenAI's checkpoints carry no head width: openai/CLIP's build_model uses width * 32 // 64."""
    from clipjax.interop.load import read_state_dict

    cfg = infer_config(read_state_dict(fixtures_dir / "openclip_rn" / "openai_state.pt"))
    assert cfg.vision.head_width == 64 and cfg.vision.heads == 8 * 32 // 64
    for name in ("RN50", "RN50x4", "RN50x64"):
        v = get_model_config(name).vision
        assert v.heads == v.width * 32 // 64


def test_head_width_must_divide_the_channels():
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 4, "head_width": 48},
           "text_cfg": {"width": 32, "heads": 2}}
    with pytest.raises(ValueError, match="head_width=48 must divide.*128"):
        get_model_config(cfg)
