"""ViT image tower as in OpenAI CLIP: patch conv (no bias) → [class] + positions → ln_pre → blocks → ln_post → proj.

Letters: B batch, G patches per side, L = G·G + 1 tokens, D width, E embed dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models.config import VisionConfig
from clipjax.models.layers import LayerNorm, Transformer, constrain, logical, openai_block_stds


class VisionTransformer(nn.Module):
    cfg: VisionConfig
    embed_dim: int
    quick_gelu: bool = False
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        c = self.cfg
        p, d = c.patch_size, c.width
        if images.shape[1] != c.image_size or images.shape[2] != c.image_size:
            raise ValueError(f"image tower expects [B, {c.image_size}, {c.image_size}, 3] images, got {images.shape}")
        scale = d ** -0.5
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                    kernel_init=logical(nn.initializers.lecun_normal(), None, None, None, "embed"),
                    name="conv1")(constrain(images.astype(self.dtype), "batch", None, None, None))  # [B, G, G, D]
        b = x.shape[0]
        x = x.reshape(b, -1, d)  # [B, G·G, D]
        cls = self.param("class_embedding", logical(nn.initializers.normal(scale), "embed"), (d,))
        pos = self.param("positional_embedding", logical(nn.initializers.normal(scale), None, "embed"),
                         (x.shape[1] + 1, d))
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)  # [B, L, D]
        x = constrain(x, "batch", "length", "act_embed")
        x = LayerNorm(name="ln_pre")(x)
        x = Transformer(c.layers, c.heads, c.mlp_ratio, self.quick_gelu, causal=False, dtype=self.dtype,
                        remat=self.remat, scan=self.scan, stds=openai_block_stds(d, c.layers),
                        name="transformer")(x)  # [B, L, D]
        x = constrain(LayerNorm(name="ln_post")(x[:, 0]), "batch", "act_embed")  # [B, D]
        x = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                     kernel_init=logical(nn.initializers.normal(scale), "embed", "joint"), name="proj")(x)  # [B, E]
        return constrain(x, "batch", None)
