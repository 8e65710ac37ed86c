"""Contrastive losses for image-text training: softmax (CLIP) and sigmoid (SigLIP); dense, sharded and tiled.

Every function is a pure function of arrays. Features are L2-normalised embeddings, row i of the image features
paired with row i of the text features. ``logit_scale`` is the raw log-temperature parameter: logits are
``exp(logit_scale) * img @ txt.T`` (plus ``logit_bias`` for SigLIP).

Sharded forms run inside ``jax.shard_map`` over the batch mesh axes named by ``axis_name`` (a str or a tuple of axis
names; None means the whole batch is local). Except for ``clip_loss_sharded(..., local_loss=True)`` they return the
loss of the GLOBAL batch, the same scalar on every shard (so ``out_specs=P()`` fits), and differentiating that
result through ``shard_map`` gives the single-device gradient of the full-batch loss. To make that hold, each shard
sums only the loss terms of its own rows and the total is one ``psum``: the transpose of ``psum`` hands each shard
the cotangent once, and the transpose of ``all_gather`` (a reduce-scatter) returns to each shard the gradient that
all shards' terms put on its features, and every shard does 1/P of the work (tests use shard_map's default
``check_vma=True``).

The tiled loss never holds more than one [R, C] tile of logits: a ``jax.custom_vjp`` computes the row and column
log-sum-exps online over tiles (running max + running sum, as in flash attention / Inf-CL) and its backward pass
recomputes each tile. Memory is linear in the batch.

Letters in shape comments:
  B  rows held by this shard (local batch)     N  columns = global batch, B * P
  P  shards along ``axis_name``                D  embedding width
  R, C  row / column tile sizes                I, J  number of row / column tiles
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

AxisName = str | tuple[str, ...] | None  # mesh axis name(s) of the batch; None = not sharded
LossFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None, AxisName], jax.Array]


# ---------------------------------------------------------------- single device, dense (the reference forms)


def clip_loss(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """Softmax contrastive loss (open_clip ClipLoss): mean of the image→text and text→image cross-entropies with
    labels = arange(N), on features [N, D]."""
    logits = jnp.exp(logit_scale) * image_features @ text_features.T  # [N, N]
    labels = jnp.arange(logits.shape[0])  # [N]
    per_image = _cross_entropy(logits, labels)  # [N]
    per_text = _cross_entropy(logits.T, labels)  # [N]
    return (jnp.mean(per_image) + jnp.mean(per_text)) / 2


def siglip_loss(
    image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array
) -> jax.Array:
    """Sigmoid loss (open_clip SigLipLoss): -sum log_sigmoid(labels * logits) / N, labels +1 on the diagonal and -1
    elsewhere, on features [N, D]."""
    n = image_features.shape[0]
    logits = jnp.exp(logit_scale) * image_features @ text_features.T + logit_bias  # [N, N]
    labels = 2 * jnp.eye(n, dtype=logits.dtype) - 1  # [N, N]
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-row softmax cross-entropy with integer labels."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # [B, N]
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]  # [B]


# ---------------------------------------------------------------- collectives that are no-ops without an axis


def _psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _all_gather(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, axis=0, tiled=True)  # [B, ...] -> [N, ...]


def _axis_size(axis_name: AxisName) -> int:
    return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _axis_index(axis_name: AxisName) -> jax.Array:
    return jnp.zeros((), jnp.int32) if axis_name is None else jax.lax.axis_index(axis_name)


def _logsumexp_across(shift: jax.Array, logsum: jax.Array, axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    """Combine per-shard log-sum-exps, each given as shift + logsum, into the log-sum-exp over all shards."""
    if axis_name is None:
        return shift, logsum
    new_shift = jax.lax.pmax(shift, axis_name)  # [N], same on every shard
    return new_shift, jnp.log(jax.lax.psum(jnp.exp((shift - new_shift) + logsum), axis_name))  # [N] ×2


# ---------------------------------------------------------------- global-batch softmax loss from log-sum-exps

class _LogitStats(NamedTuple):
    """What the softmax loss needs from logits = rows @ cols.T [B, N] (computed densely or tile by tile).

    Each log-sum-exp is split as shift + logsum, shift = the max, logsum = log Σ exp(x - shift): subtracting a
    positive logit from the shift first (both near the logit scale, up to 100) is exact, which keeps the loss as
    accurate as the dense cross-entropy. The shift is a constant for differentiation; logsum carries the softmax.
    """

    row_shift: jax.Array  # [B]
    row_logsum: jax.Array  # [B]
    col_shift: jax.Array  # [N], over this shard's rows only
    col_logsum: jax.Array  # [N]
    positives: jax.Array  # [B], logits[i, targets[i]]


_StatsFn = Callable[[jax.Array, jax.Array, jax.Array], _LogitStats]  # (rows [B, D], cols [N, D], targets [B])


def _dense_stats(rows: jax.Array, cols: jax.Array, targets: jax.Array) -> _LogitStats:
    logits = rows @ cols.T  # [B, N]
    row_shift = jax.lax.stop_gradient(jnp.max(logits, axis=1))  # [B]
    col_shift = jax.lax.stop_gradient(jnp.max(logits, axis=0))  # [N]
    return _LogitStats(
        row_shift=row_shift,
        row_logsum=jnp.log(jnp.sum(jnp.exp(logits - row_shift[:, None]), axis=1)),  # [B]
        col_shift=col_shift,
        col_logsum=jnp.log(jnp.sum(jnp.exp(logits - col_shift[None, :]), axis=0)),  # [N]
        positives=jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0],  # [B]
    )


def _global_clip_loss(
    img_local: jax.Array, txt_local: jax.Array, logit_scale: jax.Array, axis_name: AxisName, stats_fn: _StatsFn
) -> jax.Array:
    """CLIP loss of the global batch from local image rows scored against all-gathered text columns.

    The image→text term of a row needs only its row's log-sum-exp. The text→image term of text j needs the
    log-sum-exp over ALL images: each shard has it over its own rows, and the shards' values are combined with a
    max-shifted psum. Both directions thus come from one [B, N] score matrix per shard; each shard then sums the
    terms of its own B images and B texts.
    """
    b = img_local.shape[0]
    offset = _axis_index(axis_name) * b  # this shard's pairs are columns offset .. offset + B - 1
    txt_all = _all_gather(txt_local, axis_name)  # [N, D]
    rows = jnp.exp(logit_scale) * img_local  # [B, D]
    stats = stats_fn(rows, txt_all, offset + jnp.arange(b))
    row_shift, col_shift = jax.lax.stop_gradient((stats.row_shift, stats.col_shift))  # [B], [N]
    col_shift, col_logsum = _logsumexp_across(col_shift, stats.col_logsum, axis_name)  # [N] ×2, all images
    own_col_shift = jax.lax.dynamic_slice_in_dim(col_shift, offset, b)  # [B], this shard's texts
    own_col_logsum = jax.lax.dynamic_slice_in_dim(col_logsum, offset, b)  # [B]
    per_image = (row_shift - stats.positives) + stats.row_logsum  # [B]
    per_text = (own_col_shift - stats.positives) + own_col_logsum  # [B]
    return _psum(jnp.sum(per_image) + jnp.sum(per_text), axis_name) / (2 * txt_all.shape[0])


def clip_loss_sharded(
    img_local: jax.Array,
    txt_local: jax.Array,
    logit_scale: jax.Array,
    axis_name: AxisName,
    local_loss: bool = False,
) -> jax.Array:
    """Softmax CLIP loss over the global batch N = B·P, inside shard_map; equals `clip_loss` on the full batch.

    Each shard scores its B local images against the N all-gathered texts. With ``local_loss=True`` this is
    open_clip's local-loss variant instead: the shard's own loss (local images vs all texts and local texts vs all
    images, labels offset by the shard index, mean over its B rows). That value differs per shard (use
    ``out_specs=P(axis_name)``); its mean over shards is the global loss, with the same gradient.
    """
    if local_loss:
        return _clip_local_loss(img_local, txt_local, logit_scale, axis_name)
    return _global_clip_loss(img_local, txt_local, logit_scale, axis_name, _dense_stats)


def _clip_local_loss(
    img_local: jax.Array, txt_local: jax.Array, logit_scale: jax.Array, axis_name: AxisName
) -> jax.Array:
    """open_clip ClipLoss(local_loss=True, gather_with_grad=True) on this shard."""
    scale = jnp.exp(logit_scale)
    b = img_local.shape[0]
    img_all = _all_gather(img_local, axis_name)  # [N, D]
    txt_all = _all_gather(txt_local, axis_name)  # [N, D]
    labels = _axis_index(axis_name) * b + jnp.arange(b)  # [B], positions of the local pairs among the N columns
    per_image = _cross_entropy(scale * img_local @ txt_all.T, labels)  # [B]
    per_text = _cross_entropy(scale * txt_local @ img_all.T, labels)  # [B]
    return (jnp.mean(per_image) + jnp.mean(per_text)) / 2


def siglip_loss_sharded(
    img_local: jax.Array,
    txt_local: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    axis_name: AxisName,
) -> jax.Array:
    """Sigmoid loss over the global batch, inside shard_map; equals `siglip_loss` on the full batch.

    Texts travel around the ring of shards with P-1 `ppermute` shifts (open_clip's "shift" exchange): at every step
    a shard scores its images against one [B, D] text block, so no shard ever holds more than [B, B] logits.
    """
    scale = jnp.exp(logit_scale)
    b = img_local.shape[0]
    n_shards = _axis_size(axis_name)

    def block_sum(txt_block: jax.Array, labels: jax.Array) -> jax.Array:
        logits = scale * img_local @ txt_block.T + logit_bias  # [B, B]
        return -jnp.sum(jax.nn.log_sigmoid(labels * logits))

    total = block_sum(txt_local, 2 * jnp.eye(b, dtype=img_local.dtype) - 1)  # own block: positives on the diagonal
    if n_shards > 1:
        ring = [(i, (i + 1) % n_shards) for i in range(n_shards)]

        def shift(carry: tuple[jax.Array, jax.Array], _) -> tuple[tuple[jax.Array, jax.Array], None]:
            txt_block, acc = carry
            txt_block = jax.lax.ppermute(txt_block, axis_name, ring)  # [B, D] from the left neighbour
            return (txt_block, acc + block_sum(txt_block, -1.0)), None  # other shards' texts: negatives only

        (_, total), _ = jax.lax.scan(shift, (txt_local, total), None, length=n_shards - 1)
    return _psum(total, axis_name) / (b * n_shards)


# ---------------------------------------------------------------- tiled (memory-linear) softmax loss


def clip_loss_tiled(
    image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array, block_size: int = 1024
) -> jax.Array:
    """`clip_loss` computed over [block_size, block_size] tiles of logits: memory O(N·D + block_size²)."""
    return clip_loss_tiled_sharded(image_features, text_features, logit_scale, None, block_size)


def clip_loss_tiled_sharded(
    img_local: jax.Array,
    txt_local: jax.Array,
    logit_scale: jax.Array,
    axis_name: AxisName,
    block_size: int = 1024,
) -> jax.Array:
    """Global-batch CLIP loss inside shard_map with tiled logits; equals `clip_loss` on the full batch.

    Each shard all-gathers the texts ([N, D]: only N·D) and scores its B images against them tile by tile; the
    text→image log-sum-exps are combined across shards with a psum of max-shifted sums.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    stats_fn = functools.partial(_tiled_stats, block_size=block_size)
    return _global_clip_loss(img_local, txt_local, logit_scale, axis_name, stats_fn)


def _tiled_stats(rows: jax.Array, cols: jax.Array, targets: jax.Array, block_size: int) -> _LogitStats:
    """`_dense_stats` without materialising [B, N]: computed in (at least) float32, tile by tile."""
    dtype = jnp.promote_types(rows.dtype, jnp.float32)
    return _tiled_stats_vjp(rows.astype(dtype), cols.astype(dtype), targets, block_size)


class _Tiles:
    """A [M, D] array cut into [T, S, D] tiles of S rows, zero-padded; `valid` [T, S] marks the real rows."""

    def __init__(self, x: jax.Array, block_size: int):
        self.count = x.shape[0]
        self.size = min(block_size, self.count)
        n_tiles = -(-self.count // self.size)
        self.pad = n_tiles * self.size - self.count
        self.x = jnp.pad(x, ((0, self.pad), (0, 0))).reshape(n_tiles, self.size, x.shape[1])  # [T, S, D]
        self.valid = None if self.pad == 0 else (jnp.arange(n_tiles * self.size) < self.count).reshape(n_tiles, -1)

    def split(self, v: jax.Array, fill: int | float = 0) -> jax.Array:
        """A per-row vector [M] → [T, S], padded with `fill`."""
        return jnp.pad(v, (0, self.pad), constant_values=fill).reshape(self.x.shape[:2])

    def join(self, t: jax.Array) -> jax.Array:
        """Tiles [T, S, ...] → [M, ...] without the padding."""
        return t.reshape(-1, *t.shape[2:])[: self.count]


def _masked(logits: jax.Array, valid: jax.Array | None, axis: int) -> jax.Array:
    """Set logits of padded rows (axis 0) or columns (axis 1) to -inf."""
    if valid is None:
        return logits
    return jnp.where(jnp.expand_dims(valid, 1 - axis), logits, -jnp.inf)


def _online_lse(
    run_max: jax.Array, run_sum: jax.Array, logits: jax.Array, axis: int
) -> tuple[jax.Array, jax.Array]:
    """Fold one tile into a running (max, sum of exp(x - max)) along `axis` of the tile."""
    new_max = jnp.maximum(run_max, jnp.max(logits, axis=axis))  # [R] or [C]
    tile_sum = jnp.sum(jnp.exp(logits - jnp.expand_dims(new_max, axis)), axis=axis)  # [R] or [C]
    return new_max, run_sum * jnp.exp(run_max - new_max) + tile_sum


def _tile_inputs(rows, cols, targets, block_size):
    """Row tiles with each row's target column (-1 on padding), column tiles with their column indices."""
    rt, ct = _Tiles(rows, block_size), _Tiles(cols, block_size)
    row_targets = rt.split(targets, fill=-1)  # [I, R]
    col_ids = ct.split(jnp.arange(ct.count), fill=-1)  # [J, C]; padding never matches a target of a real row
    return rt, ct, row_targets, col_ids


def _tiled_stats_forward(rows, cols, targets, block_size):
    """One pass over the tiles: running (max, sum) along rows and columns, positives picked from their tile."""
    rt, ct, row_targets, col_ids = _tile_inputs(rows, cols, targets, block_size)

    def row_tile_step(col_stats, row_in):
        row_tile, row_valid, target = row_in  # [R, D], [R], [R]

        def col_tile_step(row_stats, col_in):
            col_tile, col_valid, col_id, col_max, col_sum = col_in  # [C, D], [C], [C], [C], [C]
            row_max, row_sum, positive = row_stats  # [R] ×3
            logits = row_tile @ col_tile.T  # [R, C]
            row_max, row_sum = _online_lse(row_max, row_sum, _masked(logits, col_valid, axis=1), axis=1)
            positive = positive + jnp.sum(jnp.where(target[:, None] == col_id, logits, 0), axis=1)  # [R]
            col_stats = _online_lse(col_max, col_sum, _masked(logits, row_valid, axis=0), axis=0)  # [C] ×2
            return (row_max, row_sum, positive), col_stats

        # Initial carries are built with *_like from the data so that inside shard_map they vary over the same
        # mesh axes as the values computed in the loop (rows and cols must vary over the same axes).
        zeros = jnp.zeros_like(row_tile[:, 0])  # [R]
        init = (jnp.full_like(zeros, -jnp.inf), zeros, zeros)
        xs = (ct.x, ct.valid, col_ids, *col_stats)
        (row_max, row_sum, positive), col_stats = jax.lax.scan(col_tile_step, init, xs)
        return col_stats, (row_max, jnp.log(row_sum), positive)  # [J, C] ×2, [R] ×3

    col_init = (jnp.full_like(ct.x[..., 0], -jnp.inf), jnp.zeros_like(ct.x[..., 0]))  # [J, C] ×2
    (col_max, col_sum), (row_max, row_logsum, positive) = jax.lax.scan(
        row_tile_step, col_init, (rt.x, rt.valid, row_targets)
    )  # [J, C] ×2, [I, R] ×3
    tiled = _LogitStats(row_max, row_logsum, col_max, jnp.log(col_sum), positive)  # padded, in tiles
    rows_cols_rows = (rt.join, rt.join, ct.join, ct.join, rt.join)
    return _LogitStats(*(join(t) for join, t in zip(rows_cols_rows, tiled, strict=True))), tiled


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_stats_vjp(rows, cols, targets, block_size):
    return _tiled_stats_forward(rows, cols, targets, block_size)[0]


def _tiled_stats_fwd(rows, cols, targets, block_size):
    stats, tiled = _tiled_stats_forward(rows, cols, targets, block_size)
    return stats, (rows, cols, targets, tiled)


def _tiled_stats_bwd(block_size, residuals, g: _LogitStats):
    """d logits = g_row_logsum·softmax over the row + g_col_logsum·softmax over the column + g_positive at the
    targets (shifts are constants), rebuilt tile by tile and contracted with the features right away."""
    rows, cols, targets, tiled = residuals
    rt, ct, row_targets, col_ids = _tile_inputs(rows, cols, targets, block_size)

    def row_tile_step(d_cols, row_in):
        row_tile, row_valid, target, row_max, row_logsum, row_g, positive_g = row_in  # [R, D], [R] ×6

        def col_tile_step(d_row, col_in):
            col_tile, col_valid, col_id, col_max, col_logsum, col_g, d_col = col_in  # [C, D], [C] ×5, [C, D]
            logits = row_tile @ col_tile.T  # [R, C]
            row_logits = _masked(logits, col_valid, axis=1) - row_max[:, None]  # [R, C], <= 0 and exact near 0
            col_logits = _masked(logits, row_valid, axis=0) - col_max[None, :]  # [R, C]
            d_logits = (
                row_g[:, None] * jnp.exp(row_logits - row_logsum[:, None])
                + col_g[None, :] * jnp.exp(col_logits - col_logsum[None, :])
                + jnp.where(target[:, None] == col_id, positive_g[:, None], 0)
            )  # [R, C]
            return d_row + d_logits @ col_tile, d_col + d_logits.T @ row_tile  # [R, D], [C, D]

        xs = (ct.x, ct.valid, col_ids, tiled.col_shift, tiled.col_logsum, ct.split(g.col_logsum), d_cols)
        d_row, d_cols = jax.lax.scan(col_tile_step, jnp.zeros_like(row_tile), xs)
        return d_cols, d_row

    xs = (rt.x, rt.valid, row_targets, tiled.row_shift, tiled.row_logsum, rt.split(g.row_logsum), rt.split(g.positives))
    d_cols, d_rows = jax.lax.scan(row_tile_step, jnp.zeros_like(ct.x), xs)  # [J, C, D], [I, R, D]
    return rt.join(d_rows), ct.join(d_cols), None


_tiled_stats_vjp.defvjp(_tiled_stats_fwd, _tiled_stats_bwd)


# ---------------------------------------------------------------- registry


def _clip(img_local, txt_local, logit_scale, logit_bias, axis_name):
    del logit_bias  # the softmax loss has no bias
    return clip_loss_sharded(img_local, txt_local, logit_scale, axis_name)


def _clip_tiled(img_local, txt_local, logit_scale, logit_bias, axis_name):
    del logit_bias
    return clip_loss_tiled_sharded(img_local, txt_local, logit_scale, axis_name)


# Config name → (img_local [B, D], txt_local [B, D], logit_scale, logit_bias or None, axis_name) → global loss.
LOSSES: dict[str, LossFn] = {
    "clip": _clip,
    "siglip": siglip_loss_sharded,
    "clip_tiled": _clip_tiled,
}


def get_loss(name: str) -> LossFn:
    """The sharded loss registered under `name`."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]
