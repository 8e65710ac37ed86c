"""clipjax: CLIP in JAX/Flax — pretrain, evaluate, fine-tune and export, from a laptop CPU to a pod."""

from clipjax import models
from clipjax.interop.load import Pretrained, load
from clipjax.models import CLIP, CLIPConfig, get_model_config, list_models

__version__ = "0.1.0"


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
