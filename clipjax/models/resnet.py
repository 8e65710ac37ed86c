"""OpenAI's ModifiedResNet image tower: 3-conv stem, anti-aliased (avg-pool) bottlenecks, attention pooling.

BatchNorm keeps running statistics in the `batch_stats` collection: `train=False` uses them, `train=True` updates them.
Letters: B batch, S spatial side, C channels, H heads, K head width, E embed dim.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models.config import VisionConfig
from clipjax.models.layers import constrain, logical

PAD1 = ((1, 1), (1, 1))  # torch padding=1 (symmetric, also for stride 2)


def _conv(features: int, k: int, dtype, name: str, stride: int = 1) -> nn.Conv:
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=PAD1 if k == 3 else "VALID", use_bias=False,
                   dtype=dtype, kernel_init=logical(nn.initializers.kaiming_normal(), None, None, "conv_in", "conv_out"),
                   name=name)


def _bn(train: bool, dtype, name: str, zero: bool = False) -> nn.BatchNorm:
    # torch momentum 0.1 ↔ flax momentum 0.9; eps 1e-5
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        scale_init=logical(nn.initializers.zeros if zero else nn.initializers.ones, "norm"),
                        bias_init=logical(nn.initializers.zeros, "norm"), name=name)


def _avg_pool(x: jax.Array, s: int) -> jax.Array:
    return nn.avg_pool(x, (s, s), strides=(s, s)) if s > 1 else x


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        relu = jax.nn.relu
        out = relu(_bn(train, self.dtype, "bn1")(_conv(self.planes, 1, self.dtype, "conv1")(x)))
        out = relu(_bn(train, self.dtype, "bn2")(_conv(self.planes, 3, self.dtype, "conv2")(out)))
        out = _avg_pool(out, self.stride)
        out = _bn(train, self.dtype, "bn3", zero=True)(_conv(self.planes * 4, 1, self.dtype, "conv3")(out))
        identity = x
        if self.stride > 1 or x.shape[-1] != self.planes * 4:
            identity = _conv(self.planes * 4, 1, self.dtype, "downsample_conv")(_avg_pool(x, self.stride))
            identity = _bn(train, self.dtype, "downsample_bn")(identity)
        return relu(out + identity)


class AttentionPool(nn.Module):
    """Prepend the mean token, add positions, attend with the mean token as the only query, project to E."""

    heads: int
    output_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, s, _, c = x.shape
        k = c // self.heads
        x = x.reshape(b, s * s, c)  # [B, S·S, C] (row-major, as torch's flatten)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)  # [B, S·S+1, C]
        pos = self.param("positional_embedding", logical(nn.initializers.normal(c ** -0.5), None, "embed"),
                         (s * s + 1, c))
        x = x + pos.astype(self.dtype)
        std = nn.initializers.normal(c ** -0.5)
        proj = functools.partial(nn.DenseGeneral, (self.heads, k), dtype=self.dtype,
                                 kernel_init=logical(std, "embed", "heads", "kv"),
                                 bias_init=logical(nn.initializers.zeros, "heads", "kv"))
        heads = ("batch", "length", "act_heads", None)  # heads split, as the projections' `heads` axis
        q = constrain(proj(name="q_proj")(x[:, :1]), *heads)  # [B, 1, H, K]
        kk = constrain(proj(name="k_proj")(x), *heads)  # [B, S·S+1, H, K]
        v = constrain(proj(name="v_proj")(x), *heads)
        o = jax.nn.dot_product_attention(q, kk, v).reshape(b, c)  # [B, C]
        return nn.Dense(self.output_dim, dtype=self.dtype, kernel_init=logical(std, "embed", "joint"),
                        bias_init=logical(nn.initializers.zeros, "joint"), name="c_proj")(o)  # [B, E]


class ModifiedResNet(nn.Module):
    cfg: VisionConfig
    embed_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        c = self.cfg
        if images.shape[1] != c.image_size or images.shape[2] != c.image_size:
            raise ValueError(f"image tower expects [B, {c.image_size}, {c.image_size}, 3] images, got {images.shape}")
        w, relu = c.width, jax.nn.relu
        x = constrain(images.astype(self.dtype), "batch", None, None, None)  # [B, S, S, 3]
        x = relu(_bn(train, self.dtype, "bn1")(_conv(w // 2, 3, self.dtype, "conv1", stride=2)(x)))
        x = relu(_bn(train, self.dtype, "bn2")(_conv(w // 2, 3, self.dtype, "conv2")(x)))
        x = relu(_bn(train, self.dtype, "bn3")(_conv(w, 3, self.dtype, "conv3")(x)))
        x = _avg_pool(x, 2)  # [B, S/4, S/4, w]
        for stage, depth in enumerate(c.layers):
            planes = w * 2 ** stage
            for i in range(depth):
                stride = 2 if (stage > 0 and i == 0) else 1
                x = Bottleneck(planes, stride, self.dtype, name=f"layer{stage + 1}_{i}")(x, train)
            x = constrain(x, "batch", None, None, None)  # [B, S', S', C]: the batch stays split between stages
        # [B, S/32, S/32, 32·w]
        return AttentionPool(c.heads, self.embed_dim, self.dtype, name="attnpool")(x)
