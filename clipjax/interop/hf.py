"""Hugging Face `CLIPModel` configs ↔ CLIPConfig (defaults follow transformers' CLIPTextConfig/CLIPVisionConfig)."""

from __future__ import annotations

import math
from typing import Any

from clipjax.models.config import CLIPConfig, TextConfig, VisionConfig

_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, eos_token_id=2, bos_token_id=1, pad_token_id=1)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)
_ACTS = {"quick_gelu": True, "gelu": False}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> CLIPConfig:
    t = {**_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    v = {**_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    acts = {t["hidden_act"], v["hidden_act"]}
    if not acts <= set(_ACTS) or len(acts) != 1:
        raise ValueError(f"{source}: hidden_act {sorted(acts)} not supported (need one of {sorted(_ACTS)} for both "
                         f"towers)")
    for name, cfg in (("text_config", t), ("vision_config", v)):
        if abs(cfg["layer_norm_eps"] - 1e-5) > 1e-12:
            raise ValueError(f"{source}: {name}.layer_norm_eps={cfg['layer_norm_eps']} is not supported (1e-5 only)")
    if v["num_channels"] != 3:
        raise ValueError(f"{source}: vision_config.num_channels={v['num_channels']} is not supported (3 only)")
    # transformers pools at argmax(ids) when eos_token_id == 2 (legacy configs) and at the first eos id otherwise
    eot = None if t["eos_token_id"] == 2 else int(t["eos_token_id"])
    text = TextConfig(context_length=t["max_position_embeddings"], vocab_size=t["vocab_size"],
                      width=t["hidden_size"], heads=t["num_attention_heads"], layers=t["num_hidden_layers"],
                      mlp_ratio=t["intermediate_size"] / t["hidden_size"], eot_token_id=eot)
    vision = VisionConfig(image_size=v["image_size"], layers=v["num_hidden_layers"], width=v["hidden_size"],
                          patch_size=v["patch_size"], head_width=v["hidden_size"] // v["num_attention_heads"],
                          mlp_ratio=v["intermediate_size"] / v["hidden_size"])
    return CLIPConfig(embed_dim=hf.get("projection_dim", 512), vision=vision, text=text,
                      quick_gelu=_ACTS[t["hidden_act"]],
                      init_logit_scale=float(hf.get("logit_scale_init_value", math.log(1 / 0.07))))


def config_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
    """A transformers CLIPConfig dict for a ViT CLIPConfig."""
    if cfg.vision.is_resnet:
        raise ValueError("Hugging Face's CLIPModel needs a ViT image tower and cannot represent a ModifiedResNet; "
                         "export ResNet models in open_clip format")
    t, v = cfg.text, cfg.vision
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    eos = 2 if t.eot_token_id is None else t.eot_token_id
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale, "initializer_factor": 1.0, "dtype": "float32",
        "text_config": {"model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
                        "intermediate_size": int(t.width * t.mlp_ratio), "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
                        "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim,
                        **({"bos_token_id": 49406} if t.vocab_size == 49408 else {}),
                        "eos_token_id": eos, "pad_token_id": 1},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.width,
                          "intermediate_size": int(v.width * v.mlp_ratio), "num_hidden_layers": v.layers,
                          "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
                          "num_channels": 3, "hidden_act": act, "layer_norm_eps": 1e-5,
                          "projection_dim": cfg.embed_dim},
    }
