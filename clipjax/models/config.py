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

# open_clip config keys. Each key of a `vision_cfg` / `text_cfg` is either read (_READ_KEYS), accepted only at a
# value that gives the numbers of the architecture clipjax implements (_*_DEFAULTS_REQUIRED, _SUPPORTED_VALUES), or
# ignored because it cannot change the model's outputs (_IGNORED_KEYS). Anything else is refused with a clear message.
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
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
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
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
_READ_KEYS = {"mlp_ratio", "width", "layers", "heads", "head_width", "patch_size", "image_size", "context_length",
              "vocab_size"}
# Keys open_clip only reads for a tower clipjax refuses anyway (hf_model_name, timm_model_name must be unset) or
# for the text pooling it does not use (eos_id: pool_type "eos" only).
_IGNORED_KEYS = {"hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "timm_model_pretrained", "timm_pool",
                 "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path", "eos_id"}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # as clipjax.data.preprocess, which applies them
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Top level of an open_clip model config: read, accepted at one value, or without effect on the outputs.
_TOP_READ_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias"}
_TOP_DEFAULTS_REQUIRED = {"nonscalar_logit_scale": False}
_TOP_IGNORED_KEYS = {"custom_text", "cast_dtype", "output_dict"}  # module layout and torch dtypes


def _same_floats(value: Any, want: tuple[float, ...]) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == len(want)
            and all(isinstance(v, (int, float)) and abs(v - w) <= 1e-7 for v, w in zip(value, want)))


def _default_norm(value: Any) -> bool:
    return not value or (isinstance(value, dict) and set(value) == {"eps"} and value["eps"] == 1e-5)


# key -> (accepts(value), what is supported). Values these keys hold change the outputs or the preprocessing
# clipjax applies (`preprocess` uses OpenAI's mean/std, bicubic, shortest-side resize), so others are refused.
_SUPPORTED_VALUES = {
    "image_mean": (lambda v: v is None or _same_floats(v, OPENAI_MEAN), f"None or OpenAI's {OPENAI_MEAN}"),
    "image_std": (lambda v: v is None or _same_floats(v, OPENAI_STD), f"None or OpenAI's {OPENAI_STD}"),
    "image_interpolation": (lambda v: v in (None, "bicubic"), "None or 'bicubic'"),
    "image_resize_mode": (lambda v: v in (None, "shortest"), "None or 'shortest'"),
    "norm_kwargs": (_default_norm, "None, {} or {'eps': 1e-05}"),
    "act_kwargs": (lambda v: v in (None, {}), "None or {}"),
    "hf_tokenizer_name": (lambda v: v is None, "None: clipjax tokenizes with OpenAI's BPE"),
    "tokenizer_mode": (lambda v: v is None, "None: clipjax tokenizes with OpenAI's BPE"),
    "tokenizer_kwargs": (lambda v: v in (None, {}), "None or {}: clipjax tokenizes with OpenAI's BPE as is"),
    "block_type": (lambda v: v in (None, "default"), "None or 'default'"),
}


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

    def __post_init__(self) -> None:
        channels = self.width * 32 if self.is_resnet else self.width
        if self.head_width <= 0 or channels % self.head_width:
            what = "attention-pool channels (width*32)" if self.is_resnet else "width"
            raise ValueError(f"vision head_width={self.head_width} must divide the {what}, {channels}")

    @property
    def heads(self) -> int:
        """Attention heads: width // head_width (ViT); width*32 // head_width for the ResNet's attention pool, as
        open_clip builds ModifiedResNet (OpenAI's ResNets have head_width 64)."""
        if self.is_resnet:
            return self.width * 32 // self.head_width
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


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


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

    def __post_init__(self) -> None:
        name = self.dtype if isinstance(self.dtype, str) else getattr(self.dtype, "__name__", str(self.dtype))
        if name not in COMPUTE_DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: valid compute dtypes are {list(COMPUTE_DTYPES)}")

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
        _refuse_unsupported(cfg, _TOP_DEFAULTS_REQUIRED, source, _TOP_READ_KEYS | _TOP_IGNORED_KEYS)
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
                   init_logit_scale=float(cfg.get("init_logit_scale", math.log(1 / 0.07))),
                   init_logit_bias=None if bias is None else float(bias))

    def to_open_clip(self) -> dict[str, Any]:
        """The open_clip model-config dict of this architecture (for export)."""
        v = self.vision
        vision_cfg: dict[str, Any] = {"image_size": v.image_size, "layers": list(v.layers) if v.is_resnet else v.layers,
                                      "width": v.width, "head_width": v.head_width}
        if not v.is_resnet:
            vision_cfg.update(patch_size=v.patch_size, mlp_ratio=v.mlp_ratio)
        t = self.text
        text_cfg = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                    "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio}
        out: dict[str, Any] = {"embed_dim": self.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
        if self.quick_gelu:
            out["quick_gelu"] = True
        if self.init_logit_scale != math.log(1 / 0.07):
            out["init_logit_scale"] = self.init_logit_scale
        if self.init_logit_bias is not None:
            out["init_logit_bias"] = self.init_logit_bias
        return out


def _int_size(size: Any, source: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{source}: vision_cfg.image_size={size!r}: only square images are supported")
        size = size[0]
    return int(size)


def _refuse_unsupported(cfg: dict[str, Any], required: dict[str, Any], where: str,
                        known: set[str] = _READ_KEYS | _IGNORED_KEYS) -> None:
    """Raises a one-line ValueError naming the first key whose value clipjax would not reproduce."""
    for key, value in cfg.items():
        if key in required:
            ok = value == required[key] or (value is None and required[key] in (False, 0.0))
            if not ok:
                raise ValueError(f"{where}: option {key}={value!r} is not supported by clipjax "
                                 f"(only {required[key]!r}, the OpenAI architecture)")
        elif key in _SUPPORTED_VALUES:
            accepts, supported = _SUPPORTED_VALUES[key]
            if not accepts(value):
                raise ValueError(f"{where}: option {key}={value!r} is not supported by clipjax "
                                 f"(only {supported}); it would change the outputs")
        elif key not in known:
            raise ValueError(f"{where}: unknown option {key!r}")


def _check_keys(d: dict[str, Any], valid: set[str], where: str) -> None:
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
