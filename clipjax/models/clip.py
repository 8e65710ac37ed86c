"""The two-tower CLIP model: image tower, text tower, learnable temperature (and bias for SigLIP).

`encode_image` / `encode_text` return unnormalised embeddings [B, E] in float32 (as open_clip's normalize=False);
`__call__` returns L2-normalised embeddings and the raw parameters the losses take.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models.config import CLIPConfig
from clipjax.models.layers import logical
from clipjax.models.resnet import ModifiedResNet
from clipjax.models.text import TextTransformer
from clipjax.models.vit import VisionTransformer


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CLIP(nn.Module):
    config: CLIPConfig

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        if c.vision.is_resnet:
            self.visual = ModifiedResNet(c.vision, c.embed_dim, dtype)
        else:
            self.visual = VisionTransformer(c.vision, c.embed_dim, c.quick_gelu, dtype, c.remat, c.scan_layers)
        self.text = TextTransformer(c.text, c.embed_dim, c.quick_gelu, dtype, c.remat, c.scan_layers)
        self.logit_scale = self.param("logit_scale", logical(nn.initializers.constant(c.init_logit_scale)), ())
        if c.init_logit_bias is not None:
            self.logit_bias = self.param("logit_bias", logical(nn.initializers.constant(c.init_logit_bias)), ())

    def encode_image(self, images: jax.Array, train: bool = False, patch_dropout: float = 0.0) -> jax.Array:
        """`patch_dropout` (ViT, training only): the fraction of patch tokens dropped per image (FLIP); its random
        choice comes from the "dropout" PRNG stream."""
        if patch_dropout:
            if self.config.vision.is_resnet:
                raise ValueError("patch dropout needs a ViT image tower")
            return self.visual(images, train=train, patch_dropout=patch_dropout).astype(jnp.float32)
        return self.visual(images, train=train).astype(jnp.float32)  # [B, E]

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        return self.text(tokens).astype(jnp.float32)  # [B, E]

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False,
                 patch_dropout: float = 0.0) -> dict[str, jax.Array]:
        out = {
            "image_embeds": l2_normalize(self.encode_image(images, train, patch_dropout)),  # [B, E]
            "text_embeds": l2_normalize(self.encode_text(tokens)),  # [B, E]
            "logit_scale": self.logit_scale,
        }
        if self.config.init_logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out
