"""Named model sizes: OpenAI's nine CLIP models under open_clip's names, plus small ones for CPUs and tests.

Entries are open_clip model-config dicts, so any open_clip JSON works the same way. As in open_clip, `NAME` uses
GELU and `NAME-quickgelu` uses QuickGELU — OpenAI's released weights need the latter; the importers choose it for you.
"""

from __future__ import annotations

import difflib
import json
import os
import pathlib
from typing import Any

from clipjax.models.config import CLIPConfig


def _text(width: int, heads: int, layers: int = 12, context: int = 77, vocab: int = 49408) -> dict[str, Any]:
    return {"context_length": context, "vocab_size": vocab, "width": width, "heads": heads, "layers": layers}


def _rn(embed: int, image: int, layers: list[int], width: int, text: dict) -> dict[str, Any]:
    return {"embed_dim": embed, "vision_cfg": {"image_size": image, "layers": layers, "width": width,
                                               "patch_size": None}, "text_cfg": text}


def _vit(embed: int, image: int, layers: int, width: int, patch: int, text: dict) -> dict[str, Any]:
    return {"embed_dim": embed, "vision_cfg": {"image_size": image, "layers": layers, "width": width,
                                               "patch_size": patch}, "text_cfg": text}


_BASE: dict[str, dict[str, Any]] = {
    # Radford et al. 2021, Table 19/20 (sizes as in openai/CLIP and open_clip's model_configs)
    "RN50": _rn(1024, 224, [3, 4, 6, 3], 64, _text(512, 8)),
    "RN101": _rn(512, 224, [3, 4, 23, 3], 64, _text(512, 8)),
    "RN50x4": _rn(640, 288, [4, 6, 10, 6], 80, _text(640, 10)),
    "RN50x16": _rn(768, 384, [6, 8, 18, 8], 96, _text(768, 12)),
    "RN50x64": _rn(1024, 448, [3, 15, 36, 10], 128, _text(1024, 16)),
    "ViT-B-32": _vit(512, 224, 12, 768, 32, _text(512, 8)),
    "ViT-B-16": _vit(512, 224, 12, 768, 16, _text(512, 8)),
    "ViT-L-14": _vit(768, 224, 24, 1024, 14, _text(768, 12)),
    "ViT-L-14-336": _vit(768, 336, 24, 1024, 14, _text(768, 12)),
    # Small models for laptops, CPUs and tests (not OpenAI sizes)
    "ViT-S-16-small": _vit(256, 64, 6, 256, 8, _text(256, 4, layers=6, context=32)),
    "ViT-T-demo": _vit(128, 64, 4, 192, 8, _text(128, 2, layers=4, context=32)),
    "RN-T-demo": _rn(128, 64, [1, 1, 1, 1], 32, _text(128, 2, layers=4, context=32)),
}

MODEL_CONFIGS: dict[str, dict[str, Any]] = {}
for _name, _cfg in _BASE.items():
    MODEL_CONFIGS[_name] = _cfg
    MODEL_CONFIGS[f"{_name}-quickgelu"] = {**_cfg, "quick_gelu": True}

_ALIASES = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-L/14@336px": "ViT-L-14-336"}

# OpenAI's checkpoints were trained with QuickGELU: their names here resolve to the -quickgelu variants.
OPENAI_NAMES = {"RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"}


def list_models() -> list[str]:
    """All named model configs."""
    return sorted(MODEL_CONFIGS)


def add_model_config(path: str | os.PathLike) -> None:
    """Register open_clip-style JSON model configs (a file, or every *.json in a folder) by file stem."""
    p = pathlib.Path(path)
    for f in sorted(p.glob("*.json")) if p.is_dir() else [p]:
        with open(f) as fh:
            MODEL_CONFIGS[f.stem] = json.load(fh)


def get_model_config(spec: str | os.PathLike | dict[str, Any] | CLIPConfig) -> CLIPConfig:
    """A CLIPConfig from a registered name, an open_clip config dict, or the path of an open_clip JSON file."""
    if isinstance(spec, CLIPConfig):
        return spec
    if isinstance(spec, dict):
        return CLIPConfig.from_dict(spec) if "vision" in spec else CLIPConfig.from_open_clip(spec)
    name = _ALIASES.get(str(spec), str(spec))
    if name in MODEL_CONFIGS:
        return CLIPConfig.from_open_clip(MODEL_CONFIGS[name])
    if os.path.isfile(spec):
        return CLIPConfig.from_open_clip(spec)
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.6)
    raise ValueError(f"unknown model {spec!r}: not a registered name nor a JSON file"
                     + (f" (did you mean {close}?)" if close else "; see clipjax.list_models()"))
