"""OpenAI checkpoints: infer the architecture from the tensors, as openai/CLIP's `build_model` does."""

from __future__ import annotations

import math

import numpy as np

from clipjax.models.config import CLIPConfig, TextConfig, VisionConfig


def _count(state: dict[str, np.ndarray], prefix: str, suffix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix) and k.endswith(suffix)})


def infer_config(state: dict[str, np.ndarray], source: str = "checkpoint") -> CLIPConfig:
    """CLIPConfig of an OpenAI-layout state dict (QuickGELU, as all of OpenAI's models were trained)."""
    try:
        if "visual.proj" in state:  # ViT
            width = state["visual.conv1.weight"].shape[0]
            patch = state["visual.conv1.weight"].shape[-1]
            grid = round(math.sqrt(state["visual.positional_embedding"].shape[0] - 1))
            vision = VisionConfig(image_size=patch * grid, layers=_count(state, "visual.transformer.resblocks.",
                                                                          ".attn.in_proj_weight"),
                                  width=width, patch_size=patch, head_width=64,
                                  mlp_ratio=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width)
        else:  # ModifiedResNet
            layers = tuple(_count(state, f"visual.layer{b}.", ".conv1.weight") for b in (1, 2, 3, 4))
            width = state["visual.layer1.0.conv1.weight"].shape[0]
            out_width = round(math.sqrt(state["visual.attnpool.positional_embedding"].shape[0] - 1))
            # openai/CLIP's build_model: attention-pool heads = width * 32 // 64, i.e. head_width 64
            vision = VisionConfig(image_size=out_width * 32, layers=layers, width=width, patch_size=None,
                                  head_width=64)
        text_width = state["ln_final.weight"].shape[0]
        text = TextConfig(context_length=state["positional_embedding"].shape[0],
                          vocab_size=state["token_embedding.weight"].shape[0], width=text_width,
                          heads=text_width // 64,
                          layers=_count(state, "transformer.resblocks.", ".attn.in_proj_weight"),
                          mlp_ratio=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width)
        embed_dim = state["text_projection"].shape[1]
    except KeyError as e:
        raise ValueError(f"{source}: not an OpenAI/open_clip CLIP state dict (no tensor {e.args[0]!r}); "
                         f"pass config= for other layouts") from None
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, quick_gelu=True)
