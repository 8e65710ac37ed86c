"""Building blocks shared by the towers: fp32 LayerNorm, activations, fused-QKV attention, MLP, residual stack.

Parameters carry *logical* axis names only (embed, mlp, heads, kv, vocab, ...); `clipjax.sharding` maps them to mesh
axes in one rule table. Activations get logical constraints (`batch`, `length`, `act_embed`, `act_mlp`, `act_heads`)
that shard them when the model is traced inside `clipjax.sharding.with_activation_sharding(fn, mesh)` and are no-ops
otherwise.

Letters: B batch, L tokens, D width, H heads, K head width, F MLP width.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax import sharding as shd

Dtype = jnp.dtype

LN_EPS = 1e-5


def logical(init: Callable, *names: str | None) -> Callable:
    """Wrap an initializer so the created parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Logical sharding constraint on an activation (no-op outside `clipjax.sharding.with_activation_sharding`)."""
    return shd.constrain_activation(x, names)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    # torch.nn.GELU's exact form x·Φ(x) written with erf as torch does: on XLA:CPU one fused pass, faster than
    # jax.nn.gelu's erfc form (experiments/RESULTS.md).
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


def activation(quick: bool) -> Callable[[jax.Array], jax.Array]:
    return quick_gelu if quick else gelu


class LayerNorm(nn.Module):
    """LayerNorm over the last axis computed in float32 (eps 1e-5), result cast back to the input dtype."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", logical(nn.initializers.ones, "norm"), (d,))
        bias = self.param("bias", logical(nn.initializers.zeros, "norm"), (d,))
        y = x.astype(jnp.float32)
        mean = y.mean(-1, keepdims=True)
        var = jnp.square(y - mean).mean(-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + LN_EPS) * scale + bias
        return y.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (kernel [D, 3, H, K])."""

    heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    qkv_std: float | None = None  # None → xavier-uniform as torch's nn.MultiheadAttention
    out_std: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        k = d // self.heads
        qkv_init = nn.initializers.normal(self.qkv_std) if self.qkv_std else _xavier_qkv(d)
        out_init = nn.initializers.normal(self.out_std) if self.out_std else nn.initializers.lecun_normal()
        w_qkv = self.param("qkv_kernel", logical(qkv_init, "embed", None, "heads", "kv"), (d, 3, self.heads, k))
        b_qkv = self.param("qkv_bias", logical(nn.initializers.zeros, None, "heads", "kv"), (3, self.heads, k))
        w_out = self.param("out_kernel", logical(out_init, "heads", "kv", "embed"), (self.heads, k, d))
        b_out = self.param("out_bias", logical(nn.initializers.zeros, "embed"), (d,))
        qkv = jnp.einsum("bld,dthk->tblhk", x, w_qkv.astype(self.dtype)) + b_qkv.astype(self.dtype)[:, None, None]
        qkv = constrain(qkv, None, "batch", "length", "act_heads", None)  # [3, B, L, H, K], heads split
        q, kk, v = qkv[0], qkv[1], qkv[2]  # [B, L, H, K] each
        o = jax.nn.dot_product_attention(q, kk, v, is_causal=self.causal)  # [B, L, H, K]
        o = constrain(o, "batch", "length", "act_heads", None)
        return jnp.einsum("blhk,hkd->bld", o, w_out.astype(self.dtype)) + b_out.astype(self.dtype)  # [B, L, D]


def _xavier_qkv(d: int) -> Callable:
    # torch initialises in_proj_weight [3D, D] with xavier_uniform over fan_in=D, fan_out=3D
    limit = (6.0 / (d + 3 * d)) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


class MLP(nn.Module):
    ratio: float = 4.0
    quick_gelu: bool = False
    dtype: Dtype = jnp.float32
    fc_std: float | None = None
    proj_std: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        f = int(d * self.ratio)
        fc_init = nn.initializers.normal(self.fc_std) if self.fc_std else nn.initializers.lecun_normal()
        pr_init = nn.initializers.normal(self.proj_std) if self.proj_std else nn.initializers.lecun_normal()
        h = nn.Dense(f, dtype=self.dtype, kernel_init=logical(fc_init, "embed", "mlp"),
                     bias_init=logical(nn.initializers.zeros, "mlp"), name="c_fc")(x)  # [B, L, F]
        h = constrain(h, "batch", "length", "act_mlp")  # the hidden width F split, as the kernels' `mlp` axis
        h = constrain(activation(self.quick_gelu)(h), "batch", "length", "act_mlp")
        return nn.Dense(d, dtype=self.dtype, kernel_init=logical(pr_init, "mlp", "embed"),
                        bias_init=logical(nn.initializers.zeros, "embed"), name="c_proj")(h)  # [B, L, D]


class ResidualBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    heads: int
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    causal: bool = False
    dtype: Dtype = jnp.float32
    stds: tuple[float, float, float, float] | None = None  # (qkv, out, fc, proj) normal stds; None → torch defaults

    @nn.compact
    def __call__(self, x: jax.Array, _=None):
        qkv_std, out_std, fc_std, proj_std = self.stds or (None,) * 4
        x = x + Attention(self.heads, self.causal, self.dtype, qkv_std, out_std, name="attn")(LayerNorm(name="ln_1")(x))
        x = x + MLP(self.mlp_ratio, self.quick_gelu, self.dtype, fc_std, proj_std, name="mlp")(LayerNorm(name="ln_2")(x))
        x = constrain(x, "batch", "length", "act_embed")
        return x, None  # (carry, output) so the block can be scanned


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    """`layers` residual blocks, unrolled (params `resblocks_i`) or scanned (params `resblocks`, leading layer axis).

    With unrolled parameters, `loop` picks how the layers run: "unroll" (one block after the other in the program),
    "scan" (the per-layer parameters are stacked on the fly and one block runs under `jax.lax.scan`: the same
    parameters, names and results, a program L times smaller) or "auto" (`clipjax.cpu.scan_unrolled_layers`:
    scan on CPU for deep stacks, where XLA otherwise fuses the residual-stream gradient of all layers into
    quadratic-cost kernels; see experiments/RESULTS.md).
    """

    layers: int
    heads: int
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    causal: bool = False
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan: bool = False
    stds: tuple[float, float, float, float] | None = None
    loop: str = "auto"  # "auto" | "unroll" | "scan" (unrolled parameters only)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.remat != "none" and self.remat not in _REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: valid values are 'none', {sorted(_REMAT_POLICIES)}")
        if self.loop not in ("auto", "unroll", "scan"):
            raise ValueError(f"loop={self.loop!r}: valid values are 'auto', 'unroll', 'scan'")
        kw = dict(heads=self.heads, mlp_ratio=self.mlp_ratio, quick_gelu=self.quick_gelu, causal=self.causal,
                  dtype=self.dtype, stds=self.stds)
        block = ResidualBlock
        if self.remat != "none":
            block = nn.remat(block, policy=_REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
        if self.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(**kw, name="resblocks")(x, None)
            return x
        if self._scan_unrolled():
            return self._scan_over_unrolled(x, kw)
        for i in range(self.layers):
            x, _ = block(**kw, name=f"resblocks_{i}")(x)
        return x

    def _scan_unrolled(self) -> bool:
        if self.is_initializing() or self.layers < 2:
            return False  # init creates the per-layer parameters one block at a time
        if self.loop == "auto":
            from clipjax.cpu import scan_unrolled_layers

            return scan_unrolled_layers(self.layers)
        return self.loop == "scan"

    def _scan_over_unrolled(self, x: jax.Array, kw: dict) -> jax.Array:
        names = [f"resblocks_{i}" for i in range(self.layers)]
        params = nn.meta.unbox(self.variables["params"])
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"Transformer parameters lack {missing} (has {sorted(params)})")
        stacked = jax.tree.map(lambda *ws: jnp.stack(ws), *[params[n] for n in names])  # [layers, ...] leaves
        template = ResidualBlock(**kw, parent=None)

        def body(h, layer_params):
            h, _ = template.apply({"params": layer_params}, h)
            return h, None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
        x, _ = jax.lax.scan(body, x, stacked)  # x: [B, L, D]
        return x


def stack_layers(tree: dict, prefix: str = "resblocks") -> dict:
    """Unrolled layout {resblocks_0: t0, resblocks_1: t1, ...} → scanned {resblocks: stacked} (recursively)."""
    out = {}
    idx = sorted(int(k.rsplit("_", 1)[1]) for k in tree if k.startswith(prefix + "_"))
    if idx:
        layers = [tree[f"{prefix}_{i}"] for i in idx]
        out[prefix] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    for k, v in tree.items():
        if not k.startswith(prefix + "_"):
            out[k] = stack_layers(v, prefix) if isinstance(v, dict) else v
    return out


def unstack_layers(tree: dict, prefix: str = "resblocks") -> dict:
    """Inverse of `stack_layers`."""
    out = {}
    for k, v in tree.items():
        if k == prefix and isinstance(v, dict):
            n = jax.tree.leaves(v)[0].shape[0]
            for i in range(n):
                out[f"{prefix}_{i}"] = jax.tree.map(lambda a, i=i: a[i], v)
        else:
            out[k] = unstack_layers(v, prefix) if isinstance(v, dict) else v
    return out


def openai_block_stds(width: int, layers: int) -> tuple[float, float, float, float]:
    """OpenAI's normal-init stds for (qkv, out, fc, proj) of a residual stack (CLIP.initialize_parameters)."""
    attn_std = width ** -0.5
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    return attn_std, proj_std, fc_std, proj_std
