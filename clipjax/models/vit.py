"""ViT image tower as in OpenAI CLIP: patch conv (no bias) → [class] + positions → ln_pre → blocks → ln_post → proj.

Images smaller than the configured size (a multiple of the patch size) take the position embeddings resized on the
fly (`resize_positions`, antialiased bicubic as open_clip's `resize_pos_embed`), so parameters keep their full-size
shapes; in training, `patch_dropout` keeps a random subset of the patch tokens of each image (FLIP; the class token is
always kept), as open_clip's PatchDropout. At the configured size and without dropout the tower is unchanged.

Letters: B batch, G patches per side, L = G·G + 1 tokens, D width, E embed dim.
"""

from __future__ import annotations

import functools

import numpy as np

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
    def __call__(self, images: jax.Array, train: bool = False, patch_dropout: float = 0.0) -> jax.Array:
        c = self.cfg
        p, d = c.patch_size, c.width
        side = images.shape[1]
        if images.shape[2] != side or side > c.image_size or side % p:
            raise ValueError(f"image tower expects [B, {c.image_size}, {c.image_size}, 3] images (or smaller squares, "
                             f"a multiple of the patch size {p}), got {images.shape}")
        scale = d ** -0.5
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                    kernel_init=logical(nn.initializers.lecun_normal(), None, None, None, "embed"),
                    name="conv1")(constrain(images.astype(self.dtype), "batch", None, None, None))  # [B, G, G, D]
        b = x.shape[0]
        x = x.reshape(b, -1, d)  # [B, G·G, D]
        cls = self.param("class_embedding", logical(nn.initializers.normal(scale), "embed"), (d,))
        full = c.image_size // p
        pos = self.param("positional_embedding", logical(nn.initializers.normal(scale), None, "embed"),
                         (full * full + 1, d))
        if side != c.image_size:
            pos = resize_positions(pos, full, side // p)  # [G·G + 1, D]
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)  # [B, L, D]
        if train and patch_dropout:
            x = drop_patches(x, patch_dropout, self.make_rng("dropout"))  # [B, 1 + K, D]
        x = constrain(x, "batch", "length", "act_embed")
        x = LayerNorm(name="ln_pre")(x)
        x = Transformer(c.layers, c.heads, c.mlp_ratio, self.quick_gelu, causal=False, dtype=self.dtype,
                        remat=self.remat, scan=self.scan, stds=openai_block_stds(d, c.layers),
                        name="transformer")(x)  # [B, L, D]
        x = constrain(LayerNorm(name="ln_post")(x[:, 0]), "batch", "act_embed")  # [B, D]
        x = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                     kernel_init=logical(nn.initializers.normal(scale), "embed", "joint"), name="proj")(x)  # [B, E]
        return constrain(x, "batch", None)


def drop_patches(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """[B, 1 + N, D] → [B, 1 + K, D]: the class token and K = max(1, int(N·(1 − rate))) patch tokens of each image,
    those with the K largest of N normal draws, as open_clip's PatchDropout (positions are already added, so the
    order of the kept tokens does not matter)."""
    n = x.shape[1] - 1
    keep = max(1, int(n * (1.0 - rate)))
    scores = jax.random.normal(key, (x.shape[0], n))  # [B, N]
    _, idx = jax.lax.top_k(scores, keep)  # [B, K]
    patches = jnp.take_along_axis(x[:, 1:], idx[:, :, None], axis=1)  # [B, K, D]
    return jnp.concatenate([x[:, :1], patches], axis=1)


def resize_positions(pos: jax.Array, full: int, grid: int) -> jax.Array:
    """Position embeddings [1 + F·F, D] of an F×F patch grid → [1 + G·G, D] for a G×G grid: the class position kept,
    the grid resized with antialiased bicubic interpolation (PIL's and torch's `antialias=True` bicubic, as open_clip's
    `resize_pos_embed`), computed in float32."""
    w = jnp.asarray(_bicubic_matrix(full, grid))  # [G, F]
    g = pos[1:].astype(jnp.float32).reshape(full, full, -1)  # [F, F, D]
    g = jnp.einsum("if,fhd,jh->ijd", w, g, w)  # [G, G, D]
    return jnp.concatenate([pos[:1].astype(jnp.float32), g.reshape(grid * grid, -1)]).astype(pos.dtype)


@functools.lru_cache(maxsize=32)
def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] weights of a 1-D antialiased bicubic resize (cubic a = −0.5, support widened by the scale when
    downsampling, each row normalised), as PIL's resampling computes them."""
    scale = size_in / size_out
    support = 2.0 * max(scale, 1.0)
    w = np.zeros((size_out, size_in), np.float64)
    for i in range(size_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), size_in)
        x = (np.arange(lo, hi) - center + 0.5) / max(scale, 1.0)
        w[i, lo:hi] = _cubic(x)
        w[i] /= w[i].sum()
    return w.astype(np.float32)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))
