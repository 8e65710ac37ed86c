"""open_clip config keys that would change the numbers are refused (one-line ValueError naming key and value);
keys at their supported values, and keys without effect on the outputs, are accepted."""

import math

import pytest

from clipjax.data import preprocess
from clipjax.models import get_model_config
from clipjax.models.config import OPENAI_MEAN, OPENAI_STD, CLIPConfig


def base() -> dict:
    return {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2}}


def with_key(tower: str | None, key: str, value) -> dict:
    cfg = base()
    (cfg if tower is None else cfg[tower])[key] = value
    return cfg


REFUSED = [
    ("vision_cfg", "image_mean", [0.5, 0.5, 0.5]),
    ("vision_cfg", "image_std", (0.5, 0.5, 0.5)),
    ("vision_cfg", "image_mean", [0.48145466, 0.4578275]),
    ("vision_cfg", "image_interpolation", "bilinear"),
    ("vision_cfg", "image_resize_mode", "squash"),
    ("vision_cfg", "image_resize_mode", "longest"),
    ("vision_cfg", "norm_kwargs", {"eps": 1e-6}),
    ("text_cfg", "norm_kwargs", {"eps": 1e-5, "elementwise_affine": False}),
    ("vision_cfg", "act_kwargs", {"approximate": "tanh"}),
    ("text_cfg", "act_kwargs", {"approximate": "tanh"}),
    ("text_cfg", "hf_tokenizer_name", "timm/ViT-B-16-SigLIP"),
    ("text_cfg", "tokenizer_kwargs", {"clean": "canonicalize"}),
    ("text_cfg", "tokenizer_mode", "clips"),
    ("text_cfg", "hf_model_name", "roberta-base"),
    ("vision_cfg", "timm_model_name", "vit_base_patch16_224"),
    ("vision_cfg", "block_type", "custom"),
    ("vision_cfg", "qk_norm", True),
    ("text_cfg", "scale_fc", True),
    (None, "nonscalar_logit_scale", True),
]


@pytest.mark.parametrize("tower,key,value", REFUSED)
def test_refused_with_key_and_value_named(tower, key, value):
    with pytest.raises(ValueError) as info:
        get_model_config(with_key(tower, key, value))
    message = str(info.value)
    assert f"{key}={value!r}" in message and "not supported" in message
    assert len(message.splitlines()) == 1


ACCEPTED = [
    ("vision_cfg", "image_mean", list(OPENAI_MEAN)),
    ("vision_cfg", "image_std", OPENAI_STD),
    ("vision_cfg", "image_mean", None),
    ("vision_cfg", "image_interpolation", "bicubic"),
    ("vision_cfg", "image_resize_mode", "shortest"),
    ("vision_cfg", "norm_kwargs", {"eps": 1e-5}),
    ("vision_cfg", "norm_kwargs", {}),
    ("text_cfg", "norm_kwargs", None),
    ("vision_cfg", "act_kwargs", {}),
    ("text_cfg", "act_kwargs", None),
    ("text_cfg", "tokenizer_kwargs", {}),
    ("text_cfg", "hf_tokenizer_name", None),
    ("vision_cfg", "block_type", "default"),
    ("text_cfg", "eos_id", 2),  # read by open_clip only for pool_type "eos"
    ("vision_cfg", "timm_pool", "avg"),  # read by open_clip only with timm_model_name
    ("vision_cfg", "timm_drop_path", 0.1),
    ("text_cfg", "hf_proj_type", "mlp"),  # read by open_clip only with hf_model_name
    (None, "custom_text", True),  # module layout only
    (None, "nonscalar_logit_scale", False),
]


@pytest.mark.parametrize("tower,key,value", ACCEPTED)
def test_supported_values_accepted(tower, key, value):
    assert get_model_config(with_key(tower, key, value)) == get_model_config(base())


def test_unknown_keys_still_refused():
    with pytest.raises(ValueError, match="unknown option 'multimodal_cfg'"):
        get_model_config(with_key(None, "multimodal_cfg", {"width": 32}))
    with pytest.raises(ValueError, match="unknown option 'frobnicate'"):
        get_model_config(with_key("text_cfg", "frobnicate", 1))


def test_init_logit_scale_is_read_and_exported():
    cfg = get_model_config(with_key(None, "init_logit_scale", math.log(10)))
    assert cfg.init_logit_scale == pytest.approx(math.log(10))
    assert CLIPConfig.from_open_clip(cfg.to_open_clip()) == cfg
    assert "init_logit_scale" not in get_model_config(base()).to_open_clip()


def test_openai_mean_std_are_the_ones_preprocess_applies():
    assert OPENAI_MEAN == preprocess.OPENAI_MEAN and OPENAI_STD == preprocess.OPENAI_STD
