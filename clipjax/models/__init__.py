"""CLIP models in Flax Linen."""

from clipjax.models.clip import CLIP, l2_normalize
from clipjax.models.config import CLIPConfig, TextConfig, VisionConfig
from clipjax.models.specs import add_model_config, get_model_config, list_models

__all__ = ["CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "add_model_config", "get_model_config",
           "l2_normalize", "list_models"]
