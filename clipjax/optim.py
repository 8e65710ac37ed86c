"""Optimizer for CLIP training: AdamW with a weight-decay mask, warmup + cosine schedule, clipping, frozen towers.

Parameters are Flax Linen nested dicts, e.g. ``{"visual": {...}, "text": {...}, "logit_scale": ()}``.

Weight-decay rule: decay ONLY leaves named ``"kernel"`` or ``"<something>_kernel"``: the weight matrices of Dense and
Conv layers, including the image and text projections (bias-free Dense layers), and the attention weights that the
model stores as raw parameters (``"qkv_kernel"``, ``"out_kernel"``). Everything else is left undecayed: biases,
LayerNorm/BatchNorm scales, embeddings (``"embedding"``, ``"class_embedding"``, ``"positional_embedding"``),
``"logit_scale"`` and ``"logit_bias"``: the CLIP paper's "not on gains, biases, embeddings, logit_scale". (open_clip's
trainer excludes tensors with fewer than 2 dims, norms, biases and logit_scale, so it does decay the 2-D token and
positional embeddings; otherwise the two rules pick the same leaves.)
Parameters may be boxed (Flax logical partitioning): only dict keys count in a leaf's path.

Frozen parameters (LiT locks the image tower with ``frozen=("visual",)``) get zero updates from
``optax.set_to_zero`` and carry no optimizer state: ``optax.multi_transform`` hands AdamW only the trainable leaves,
and gradient clipping measures the global norm of those leaves only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

Params = Mapping[str, Any]

_DECAYED_NAME = "kernel"  # and names ending in "_kernel"
TRAINABLE, FROZEN = "trainable", "frozen"


def _path_names(path: tuple) -> tuple[str, ...]:
    """Dict keys along a pytree path (other entries, e.g. attribute keys of boxed values, are skipped)."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def decay_mask(params: Params) -> Any:
    """Pytree of bools like `params`: True where weight decay applies (leaves named "kernel" or "*_kernel")."""

    def decayed(path: tuple, _) -> bool:
        names = _path_names(path)
        return bool(names) and (names[-1] == _DECAYED_NAME or names[-1].endswith("_" + _DECAYED_NAME))

    return jax.tree.map_with_path(decayed, params)


def _is_frozen(names: tuple[str, ...], frozen: tuple[tuple[str, ...], ...]) -> bool:
    return any(names[: len(prefix)] == prefix for prefix in frozen)


def _split_prefixes(frozen: Iterable[str]) -> tuple[tuple[str, ...], ...]:
    """("visual", "text/token_embedding") → (("visual",), ("text", "token_embedding"))."""
    if isinstance(frozen, str):
        raise TypeError(f"frozen must be a sequence of path prefixes, e.g. ({frozen!r},), not the string {frozen!r}")
    return tuple(tuple(p.split("/")) for p in frozen)


def is_frozen(path: str, frozen: Iterable[str] = ()) -> bool:
    """Whether every parameter under the "/"-joined `path` (e.g. "visual") is frozen by the prefixes `frozen`."""
    return _is_frozen(tuple(path.split("/")), _split_prefixes(frozen))


def param_labels(params: Params, frozen: Iterable[str] = ()) -> Any:
    """Pytree of "trainable"/"frozen" labels like `params`; a leaf is frozen when its path starts with a prefix.

    Prefixes are "/"-joined dict keys: "visual" freezes the whole image tower, "text/token_embedding" one module.
    """
    prefixes = _split_prefixes(frozen)
    return jax.tree.map_with_path(
        lambda path, _: FROZEN if _is_frozen(_path_names(path), prefixes) else TRAINABLE, params
    )


def make_schedule(lr: float, warmup_steps: int, total_steps: int, end_lr_factor: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to `lr·end_lr_factor` at `total_steps`."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,  # optax counts the warmup inside decay_steps
        end_value=lr * end_lr_factor,
    )


def make_optimizer(
    params: Params,
    *,
    lr: float,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float = 0.2,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-6,
    grad_clip_norm: float | None = 1.0,
    frozen: Iterable[str] = (),
    end_lr_factor: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay on "kernel" leaves) on the warmup+cosine schedule, after global-norm clipping.

    `params` is only inspected to check that every prefix in `frozen` names at least one parameter.
    """
    prefixes = _split_prefixes(frozen)
    _check_prefixes(params, prefixes)
    steps = [] if grad_clip_norm is None else [optax.clip_by_global_norm(grad_clip_norm)]
    adamw = optax.adamw(
        make_schedule(lr, warmup_steps, total_steps, end_lr_factor),
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=decay_mask,
    )
    trainable = optax.chain(*steps, adamw)
    if not prefixes:
        return trainable
    frozen_paths = tuple("/".join(prefix) for prefix in prefixes)
    return optax.multi_transform(
        {TRAINABLE: trainable, FROZEN: optax.set_to_zero()},
        lambda tree: param_labels(tree, frozen_paths),
    )


def _check_prefixes(params: Params, prefixes: tuple[tuple[str, ...], ...]) -> None:
    paths = [_path_names(path) for path, _ in jax.tree.leaves_with_path(params)]
    for prefix in prefixes:
        if not any(_is_frozen(names, (prefix,)) for names in paths):
            top = ", ".join(sorted({names[0] for names in paths if names}))
            raise ValueError(f"frozen prefix {'/'.join(prefix)!r} matches no parameter; top-level names: {top}")


def clamp_logit_scale(params: Params, max_value: float = math.log(100.0)) -> Params:
    """`params` with the top-level "logit_scale" clipped to [0, max_value] (ln 100: logits scaled by at most 100).

    A boxed value (Flax logical partitioning) keeps its box. Without a "logit_scale" key `params` is returned as is.
    """
    if "logit_scale" not in params:
        return params
    clipped = jax.tree.map(lambda x: jnp.clip(x, 0.0, max_value), params["logit_scale"])
    return {**params, "logit_scale": clipped}
