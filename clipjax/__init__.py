"""clipjax: CLIP in JAX/Flax — pretrain, evaluate, fine-tune and export, from a laptop CPU to a pod."""

import importlib

__version__ = "0.1.0"

# The models and loaders are imported on first use, so that tools that need no JAX (ingest, decode workers, Beam
# workers) do not load it: `clipjax.CLIP` etc. work as before.
_LAZY = {"CLIP": "clipjax.models", "CLIPConfig": "clipjax.models", "get_model_config": "clipjax.models",
         "list_models": "clipjax.models", "Pretrained": "clipjax.interop.load", "load": "clipjax.interop.load"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name == "models":
        value = importlib.import_module("clipjax.models")
    else:
        raise AttributeError(f"module 'clipjax' has no attribute {name!r}")
    globals()[name] = value
    return value


def tokenize(texts, context_length: int = 77):
    """CLIP BPE token ids, int32 [N, context_length] (identical to open_clip.tokenize)."""
    from clipjax.data.tokenizer import tokenize as _tokenize

    return _tokenize(texts, context_length=context_length)


def preprocess(image, image_size: int = 224):
    """open_clip's eval transform: RGB, bicubic shortest-side resize, center crop, normalise → float32 [H, W, 3]."""
    from clipjax.data.preprocess import preprocess as _preprocess

    return _preprocess(image, image_size=image_size)


__all__ = ["CLIP", "CLIPConfig", "Pretrained", "get_model_config", "list_models", "load", "models", "preprocess",
           "tokenize"]
