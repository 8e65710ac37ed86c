"""clipjax.optim: decay mask, schedule, AdamW step and clipping against numpy, frozen towers, logit-scale clamp."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipjax import optim
from clipjax.models import CLIP, get_model_config


def _tree(seed: int = 0) -> dict:
    """A small parameter tree with the Flax names of the real model (ViT tower, text tower, temperature)."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    block = {
        "attn": {"qkv_kernel": r(4, 3, 2, 2), "qkv_bias": r(3, 2, 2), "out_kernel": r(2, 2, 4), "out_bias": r(4)},
        "ln_1": {"scale": r(4), "bias": r(4)},
        "mlp": {"c_fc": {"kernel": r(4, 8), "bias": r(8)}, "c_proj": {"kernel": r(8, 4), "bias": r(4)}},
    }
    return {
        "visual": {
            "conv1": {"kernel": r(2, 2, 3, 4)},
            "class_embedding": r(4),
            "positional_embedding": r(5, 4),
            "ln_pre": {"scale": r(4), "bias": r(4)},
            "transformer": {"resblocks_0": block},
            "bn1": {"scale": r(4), "bias": r(4)},
            "proj": {"kernel": r(4, 3)},
        },
        "text": {
            "token_embedding": {"embedding": r(10, 4)},
            "positional_embedding": r(6, 4),
            "transformer": {"resblocks_0": jax.tree.map(lambda x: x + 1, block)},
            "ln_final": {"scale": r(4), "bias": r(4)},
            "text_projection": {"kernel": r(4, 3)},
        },
        "logit_scale": jnp.asarray(math.log(1 / 0.07), jnp.float32),
        "logit_bias": jnp.asarray(-10.0, jnp.float32),
    }


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)}


# ---------------------------------------------------------------- weight-decay mask


def test_decay_mask_on_model_like_tree():
    mask = _flat(optim.decay_mask(_tree()))
    decayed = sorted(k for k, v in mask.items() if v)
    block = ["['attn']['out_kernel']", "['attn']['qkv_kernel']", "['mlp']['c_fc']['kernel']",
             "['mlp']['c_proj']['kernel']"]
    assert decayed == sorted(
        ["['text']['text_projection']['kernel']", "['visual']['conv1']['kernel']", "['visual']['proj']['kernel']"]
        + [f"['{tower}']['transformer']['resblocks_0']{b}" for tower in ("text", "visual") for b in block]
    )


def _paper_rule(name: str, ndim: int) -> bool:
    """open_clip_train's exclusion rule (ndim < 2, "bn", "ln", "bias", "logit_scale") plus the paper's embeddings."""
    excluded = ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale", "embedding"))
    return not excluded


@pytest.mark.parametrize("model", ["ViT-T-demo", "RN-T-demo"])
def test_decay_mask_on_the_real_model_follows_the_paper_rule(model):
    cfg = get_model_config(model)
    images = jax.ShapeDtypeStruct((1, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, cfg.text.context_length), jnp.int32)
    params = jax.eval_shape(CLIP(cfg).init, jax.random.key(0), images, tokens)["params"]  # boxed, shapes only
    mask = jax.tree.leaves(optim.decay_mask(params))
    leaves = jax.tree.leaves_with_path(params)
    assert len(mask) == len(leaves)
    for (path, leaf), decayed in zip(leaves, mask, strict=True):
        name = jax.tree_util.keystr(path)
        assert decayed == _paper_rule(name, leaf.ndim), name


# ---------------------------------------------------------------- schedule


def test_schedule_is_linear_warmup_then_cosine():
    lr, warmup, total, end = 5e-4, 10, 110, 0.1
    schedule = optim.make_schedule(lr, warmup, total, end_lr_factor=end)

    def expected(step: int) -> float:
        if step < warmup:
            return lr * step / warmup
        t = min(step - warmup, total - warmup) / (total - warmup)
        return lr * end + (lr - lr * end) * 0.5 * (1 + math.cos(math.pi * t))

    for step in [0, 1, 5, 9, 10, 11, 35, 60, 109, 110, 150]:
        np.testing.assert_allclose(float(schedule(step)), expected(step), rtol=1e-6, atol=1e-12, err_msg=f"step {step}")


def test_schedule_rejects_bad_lengths():
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.make_schedule(1e-3, warmup_steps=100, total_steps=100)


# ---------------------------------------------------------------- AdamW against numpy


def _numpy_adamw(params, grads_seq, lrs, *, b1, b2, eps, wd, clip=None):
    """Reference AdamW: optional global-norm clipping, bias-corrected moments, decoupled decay on "kernel" leaves."""
    p = {k: v.astype(np.float64) for k, v in _flat(params).items()}
    decay = {k: k.endswith("kernel']") for k in p}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
        g = {k: x.astype(np.float64) for k, x in _flat(grads).items()}
        if clip is not None:
            norm = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
            g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + (wd * p[k] if decay[k] else 0.0))
    return p


def _run(tx, params, grads_seq):
    """Apply `tx` for each gradient tree in turn; returns the final params and optimizer state."""

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for grads in grads_seq:
        params, state = step(params, state, grads)
    return params, state


HP = dict(lr=1e-2, warmup_steps=2, total_steps=10, weight_decay=0.2, b1=0.9, b2=0.98)


def _lrs(n: int) -> list[float]:
    schedule = optim.make_schedule(HP["lr"], HP["warmup_steps"], HP["total_steps"])
    return [float(schedule(i)) for i in range(n)]


def test_adamw_steps_match_numpy():
    params = _tree(0)
    grads_seq = [_tree(s) for s in (1, 2, 3)]
    tx = optim.make_optimizer(params, **HP, eps=1e-6, grad_clip_norm=None)
    got, _ = _run(tx, params, grads_seq)
    want = _numpy_adamw(params, grads_seq, _lrs(3), b1=0.9, b2=0.98, eps=1e-6, wd=0.2)
    for k, x in _flat(got).items():
        np.testing.assert_allclose(x, want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_global_norm_clipping_matches_numpy():
    """Gradients of very different norms (only some above the threshold); a large eps makes Adam scale-sensitive."""
    params = _tree(0)
    grads_seq = [jax.tree.map(lambda x, s=s: x * s, _tree(i)) for i, s in ((1, 30.0), (2, 0.05), (3, 4.0))]
    kw = dict(b1=0.9, b2=0.98, eps=1.0, wd=0.2)
    tx = optim.make_optimizer(params, **HP, eps=1.0, grad_clip_norm=1.0)
    got, _ = _run(tx, params, grads_seq)
    want = _numpy_adamw(params, grads_seq, _lrs(3), **kw, clip=1.0)
    unclipped = _numpy_adamw(params, grads_seq, _lrs(3), **kw)
    assert max(np.max(np.abs(want[k] - unclipped[k])) for k in want) > 1e-3  # clipping matters for this data
    for k, x in _flat(got).items():
        np.testing.assert_allclose(x, want[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------- frozen towers (LiT)


def test_frozen_tower_is_unchanged_and_has_no_state():
    params = _tree(0)
    grads_seq = [_tree(s) for s in (1, 2, 3)]
    for g in grads_seq:  # huge image-tower gradients must neither move it nor enter the clipping norm
        g["visual"] = jax.tree.map(lambda x: x * 1e6, g["visual"])
    tx = optim.make_optimizer(params, **HP, frozen=("visual",))
    got, state = _run(tx, params, grads_seq)

    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), got["visual"], params["visual"]))
    adam_states = [
        s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(adam_states) == 1
    for moments in (adam_states[0].mu, adam_states[0].nu):
        assert jax.tree.leaves(moments["visual"]) == []
        assert jax.tree.structure(moments["text"]) == jax.tree.structure(params["text"])

    # The trainable part moves exactly as if the image tower did not exist.
    rest = lambda tree: {k: v for k, v in tree.items() if k != "visual"}  # noqa: E731
    want, _ = _run(optim.make_optimizer(rest(params), **HP), rest(params), [rest(g) for g in grads_seq])
    for k, x in _flat(want).items():
        np.testing.assert_array_equal(_flat(rest(got))[k], x, err_msg=k)


def test_frozen_prefix_can_name_a_submodule():
    params = _tree(0)
    tx = optim.make_optimizer(params, **HP, frozen=("text/token_embedding",))
    got, _ = _run(tx, params, [_tree(1), _tree(2)])
    before, after = params["text"], got["text"]
    np.testing.assert_array_equal(after["token_embedding"]["embedding"], before["token_embedding"]["embedding"])
    assert not np.array_equal(after["positional_embedding"], before["positional_embedding"])


def test_frozen_prefix_errors():
    with pytest.raises(ValueError, match="'visul' matches no parameter.*logit_scale, text, visual"):
        optim.make_optimizer(_tree(), **HP, frozen=("visul",))
    with pytest.raises(TypeError, match="sequence of path prefixes"):
        optim.make_optimizer(_tree(), **HP, frozen="visual")


# ---------------------------------------------------------------- logit-scale clamp


@pytest.mark.parametrize("value, expected", [(-1.0, 0.0), (2.0, 2.0), (5.0, math.log(100.0))])
def test_clamp_logit_scale(value, expected):
    params = {"logit_scale": jnp.float32(value), "text": {"w": jnp.ones(2)}}
    out = optim.clamp_logit_scale(params)
    np.testing.assert_allclose(out["logit_scale"], expected, rtol=1e-7)
    assert out["text"] is params["text"]


def test_clamp_logit_scale_keeps_boxes_and_ignores_missing_key():
    boxed = {"logit_scale": nn.LogicallyPartitioned(jnp.float32(7.0), names=())}
    out = optim.clamp_logit_scale(boxed, max_value=3.0)
    assert isinstance(out["logit_scale"], nn.LogicallyPartitioned)
    np.testing.assert_allclose(out["logit_scale"].value, 3.0)
    no_scale = {"text": {"w": jnp.ones(2)}}
    assert optim.clamp_logit_scale(no_scale) is no_scale
