"""Model configuration: small frozen dataclasses, convertible to and from open_clip's model-config dicts.

A ResNet image tower is recognised, as in open_clip, by `layers` being a list of four stage depths (and no patch
size); a ViT by an integer `layers` and a `patch_size`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

# open_clip config keys we understand, and the values of the ones we accept but do not implement (the OpenAI
# architecture). Any other value for these keys is refused with a clear message instead of silently ignored.
_VISION_DEFAULTS_REQUIRED = {
    "ls_init_value": None,
    "patch_dropout": 0.0,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pool_type": "tok",
    "final_ln_after_pool": False,
    "output_tokens": False,
    "global_average_pool": False,
    "attn_pooler_queries": None,
    "attn_pooler_heads": None,
    "timm_model_name": None,
    "pos_embed_type": "learnable",
}
_TEXT_DEFAULTS_REQUIRED = {
    "ls_init_value": None,
    "embed_cls": False,
    "pad_id": 0,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "output_tokens": False,
    "hf_model_name": None,
    "attn_pooler_heads": None,
}
_IGNORED_KEYS = {"hf_tokenizer_name", "tokenizer_kwargs", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type",
                 "act_kwargs", "norm_kwargs", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
                 "timm_drop", "timm_drop_path", "image_mean", "image_std", "image_interpolation",
                 "image_resize_mode", "mlp_ratio", "width", "layers", "heads", "head_width", "patch_size",
                 "image_size", "context_length", "vocab_size"}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Image tower. `layers` int → ViT; tuple of 4 ints → ModifiedResNet."""

    image_size: int = 224
    layers: int | tuple[int, ...] = 12
    width: int = 768
    patch_size: int | None = 32
    head_width: int = 64
    mlp_ratio: float = 4.0

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, (tuple, list))

    @property
    def heads(self) -> int:
        if self.is_resnet:  # attention pool over width*32 channels, as OpenAI's ModifiedResNet
            return self.width * 32 // 64
        return self.width // self.head_width


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Causal text tower. `eot_token_id` None pools at argmax(token ids) (OpenAI); an int pools at its first match."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    eot_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP model plus its numerics and memory options (which do not change the weights)."""

    embed_dim: int = 512
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set (e.g. -10) for SigLIP: adds a learnable `logit_bias`
    dtype: str = "float32"  # computation dtype; parameters stay float32
    remat: str = "none"  # "none" | "full" | "dots": rematerialisation of each residual block
    scan_layers: bool = False  # stack transformer layers and run them with a scan (faster compile, same math)

    def replace(self, **kw: Any) -> "CLIPConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        d = dict(d)
        vision = dict(d.pop("vision", {}))
        if isinstance(vision.get("layers"), list):
            vision["layers"] = tuple(vision["layers"])
        text = dict(d.pop("text", {}))
        _check_keys(d, {f.name for f in dataclasses.fields(cls)}, "CLIPConfig")
        _check_keys(vision, {f.name for f in dataclasses.fields(VisionConfig)}, "CLIPConfig.vision")
        _check_keys(text, {f.name for f in dataclasses.fields(TextConfig)}, "CLIPConfig.text")
        return cls(vision=VisionConfig(**vision), text=TextConfig(**text), **d)

    # ---- open_clip model-config dicts ----------------------------------------------------------------------------

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any] | str | os.PathLike) -> "CLIPConfig":
        """Build from an open_clip model-config dict or the path of its JSON file."""
        source = "open_clip config"
        if not isinstance(cfg, dict):
            source = os.fspath(cfg)
            with open(cfg) as f:
                cfg = json.load(f)
        v, t = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
        _refuse_unsupported(v, _VISION_DEFAULTS_REQUIRED, f"{source}: vision_cfg")
        _refuse_unsupported(t, _TEXT_DEFAULTS_REQUIRED, f"{source}: text_cfg")
        layers = v.get("layers", 12)
        is_resnet = isinstance(layers, (list, tuple))
        vision = VisionConfig(
            image_size=_int_size(v.get("image_size", 224), source),
            layers=tuple(layers) if is_resnet else int(layers),
            width=int(v.get("width", 64 if is_resnet else 768)),
            patch_size=None if is_resnet else int(v.get("patch_size", 16)),
            head_width=int(v.get("head_width", 64)),
            mlp_ratio=float(v.get("mlp_ratio", 4.0)),
        )
        text = TextConfig(
            context_length=int(t.get("context_length", 77)),
            vocab_size=int(t.get("vocab_size", 49408)),
            width=int(t.get("width", 512)),
            heads=int(t.get("heads", 8)),
            layers=int(t.get("layers", 12)),
            mlp_ratio=float(t.get("mlp_ratio", 4.0)),
        )
        bias = cfg.get("init_logit_bias")
        return cls(embed_dim=int(cfg["embed_dim"]), vision=vision, text=text,
                   quick_gelu=bool(cfg.get("quick_gelu", False)),
                   init_logit_bias=None if bias is None else float(bias))

    def to_open_clip(self) -> dict[str, Any]:
        """The open_clip model-config dict of this architecture (for export)."""
        v = self.vision
        vision_cfg: dict[str, Any] = {"image_size": v.image_size, "layers": list(v.layers) if v.is_resnet else v.layers,
                                      "width": v.width}
        if not v.is_resnet:
            vision_cfg.update(patch_size=v.patch_size, head_width=v.head_width, mlp_ratio=v.mlp_ratio)
        t = self.text
        text_cfg = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                    "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio}
        out: dict[str, Any] = {"embed_dim": self.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
        if self.quick_gelu:
            out["quick_gelu"] = True
        if self.init_logit_bias is not None:
            out["init_logit_bias"] = self.init_logit_bias
        return out


def _int_size(size: Any, source: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{source}: vision_cfg.image_size={size!r}: only square images are supported")
        size = size[0]
    return int(size)


def _refuse_unsupported(cfg: dict[str, Any], required: dict[str, Any], where: str) -> None:
    for key, value in cfg.items():
        if key in required:
            ok = value == required[key] or (value is None and required[key] in (False, 0.0))
            if not ok:
                raise ValueError(f"{where}: option {key}={value!r} is not supported by clipjax "
                                 f"(only {required[key]!r}, the OpenAI architecture)")
        elif key not in _IGNORED_KEYS:
            raise ValueError(f"{where}: unknown option {key!r}")


def _check_keys(d: dict[str, Any], valid: set[str], where: str) -> None:
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
