"""clipjax.losses: parity with open_clip (stored fixture), sharded ≡ single device, tiled ≡ dense (values, grads)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from clipjax import losses

RTOL, ATOL = 1e-5, 1e-6
MESHES = [((1,), ("data",)), ((2,), ("data",)), ((4,), ("data",)), ((8,), ("data",)), ((2, 4), ("data", "fsdp"))]


def _features(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image features [n, d] and text features correlated with their pair."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, d))
    txt = img + rng.standard_normal((n, d))
    norm = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    return norm(img), norm(txt)


SCALE = np.float32(np.log(1 / 0.07))  # raw logit_scale
BIAS = np.float32(-3.0)


def _value_and_grads(fn, *args):
    """fn(img, txt, scale, bias) → (value, (d_img, d_txt, d_scale, d_bias))."""
    return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


def _assert_close(got, want, rtol=RTOL, atol=ATOL):
    value, grads = got
    want_value, want_grads = want
    np.testing.assert_allclose(value, want_value, rtol=rtol, atol=atol, err_msg="loss value")
    for i, (g, w) in enumerate(zip(grads, want_grads, strict=True)):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"gradient of argument {i}")


def _dense_clip(img, txt, scale, bias):
    del bias
    return losses.clip_loss(img, txt, scale)


def _on_mesh(fn, mesh_shape, axes, out_specs=P()):
    """fn(img, txt, scale, bias, axis_name=...) wrapped in shard_map over the first prod(mesh_shape) devices."""
    n = int(np.prod(mesh_shape))
    mesh = jax.make_mesh(mesh_shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=jax.devices()[:n])
    axis_name = axes if len(axes) > 1 else axes[0]
    batch = P(axis_name)
    return jax.shard_map(
        functools.partial(fn, axis_name=axis_name), mesh=mesh, in_specs=(batch, batch, P(), P()), out_specs=out_specs
    )


# ---------------------------------------------------------------- parity with open_clip


@pytest.fixture
def golden(fixtures_dir):
    path = fixtures_dir / "losses.npz"
    assert path.exists(), f"missing fixture {path}: run tests/fixtures/make_fixtures.py in the parity venv"
    with np.load(path) as z:
        return dict(z)


def test_clip_loss_matches_open_clip(golden):
    args = golden["image_features"], golden["text_features"], golden["logit_scale_raw"]
    got = _value_and_grads(losses.clip_loss, *args)
    want = golden["clip_loss"], tuple(golden[f"clip_grad_{k}"] for k in ("image", "text", "logit_scale_raw"))
    _assert_close(got, want)


def test_siglip_loss_matches_open_clip(golden):
    args = golden["image_features"], golden["text_features"], golden["siglip_logit_scale_raw"], golden["logit_bias"]
    got = _value_and_grads(losses.siglip_loss, *args)
    want = golden["siglip_loss"], tuple(
        golden[f"siglip_grad_{k}"] for k in ("image", "text", "logit_scale_raw", "logit_bias")
    )
    _assert_close(got, want)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_registered_losses_on_8_devices_match_open_clip(golden, name):
    kind = "siglip" if name == "siglip" else "clip"
    scale = golden["siglip_logit_scale_raw" if kind == "siglip" else "logit_scale_raw"]
    fn = _on_mesh(losses.get_loss(name), (8,), ("data",))
    args = golden["image_features"], golden["text_features"], scale, golden["logit_bias"]
    got_value, got_grads = _value_and_grads(fn, *args)
    grad_keys = ["image", "text", "logit_scale_raw"] + (["logit_bias"] if kind == "siglip" else [])
    want = golden[f"{kind}_loss"], tuple(golden[f"{kind}_grad_{k}"] for k in grad_keys)
    _assert_close((got_value, got_grads[: len(grad_keys)]), want)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_registered_losses_without_a_mesh_match_open_clip(golden, name):
    """axis_name=None: the same callables work on one device, outside shard_map."""
    kind = "siglip" if name == "siglip" else "clip"
    scale = golden["siglip_logit_scale_raw" if kind == "siglip" else "logit_scale_raw"]
    value = losses.get_loss(name)(golden["image_features"], golden["text_features"], scale, golden["logit_bias"], None)
    np.testing.assert_allclose(value, golden[f"{kind}_loss"], rtol=RTOL)


def test_get_loss_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="clip, clip_tiled, siglip"):
        losses.get_loss("infonce")


# ---------------------------------------------------------------- sharded ≡ single device


SHARDED = {
    "clip": (lambda i, t, s, b, axis_name: losses.clip_loss_sharded(i, t, s, axis_name), _dense_clip),
    "siglip": (losses.siglip_loss_sharded, losses.siglip_loss),
    # block 5 divides neither the local rows (24/P) nor the 24 columns: exercises the padding masks
    "clip_tiled": (
        lambda i, t, s, b, axis_name: losses.clip_loss_tiled_sharded(i, t, s, axis_name, block_size=5),
        _dense_clip,
    ),
}


@pytest.mark.parametrize("mesh_shape, axes", MESHES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("name", sorted(SHARDED))
def test_sharded_equals_single_device(name, mesh_shape, axes):
    sharded, dense = SHARDED[name]
    img, txt = _features(24, 8, seed=1)
    want = _value_and_grads(dense, img, txt, SCALE, BIAS)
    got = _value_and_grads(_on_mesh(sharded, mesh_shape, axes), img, txt, SCALE, BIAS)
    _assert_close(got, want)


def _open_clip_local_losses(img: np.ndarray, txt: np.ndarray, scale: float, n_shards: int) -> np.ndarray:
    """Per-shard open_clip local loss in numpy (float64): local rows vs all columns, labels offset by rank."""
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    b = img.shape[0] // n_shards

    def cross_entropy(logits, labels):
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        return np.mean(lse - logits[np.arange(len(labels)), labels])

    out = []
    for rank in range(n_shards):
        rows = slice(rank * b, (rank + 1) * b)
        labels = np.arange(b) + rank * b
        out.append(
            (cross_entropy(scale * img[rows] @ txt.T, labels) + cross_entropy(scale * txt[rows] @ img.T, labels)) / 2
        )
    return np.asarray(out)


@pytest.mark.parametrize("n", [2, 4])
def test_clip_local_loss_per_shard_and_mean_gradient(n):
    img, txt = _features(16, 8, seed=2)

    def per_shard(i, t, s, b, axis_name):
        return losses.clip_loss_sharded(i, t, s, axis_name, local_loss=True)[None]  # [1] per shard → [P]

    shard_values = _on_mesh(per_shard, (n,), ("data",), out_specs=P("data"))
    np.testing.assert_allclose(
        jax.jit(shard_values)(img, txt, SCALE, BIAS), _open_clip_local_losses(img, txt, np.exp(SCALE), n), rtol=RTOL
    )
    got = _value_and_grads(lambda *a: jnp.mean(shard_values(*a)), img, txt, SCALE, BIAS)
    _assert_close(got, _value_and_grads(_dense_clip, img, txt, SCALE, BIAS))


# ---------------------------------------------------------------- tiled ≡ dense


@pytest.mark.parametrize(
    "n, block_size", [(1, 4), (7, 1), (10, 3), (10, 4), (16, 4), (16, 16), (13, 1024)], ids=lambda v: str(v)
)
def test_tiled_equals_dense(n, block_size):
    img, txt = _features(n, 8, seed=n)
    tiled = lambda i, t, s, b: losses.clip_loss_tiled(i, t, s, block_size)  # noqa: E731
    _assert_close(_value_and_grads(tiled, img, txt, SCALE, BIAS), _value_and_grads(_dense_clip, img, txt, SCALE, BIAS))


@pytest.mark.parametrize("pairs", ["correlated", "identical"])
def test_tiled_at_the_maximum_scale(pairs):
    """Logit scale 100: logits up to ±100 (a naive exp overflows float32), log-sum-exps and positives near 100
    must cancel as exactly as in the dense loss; identical pairs make the loss and its gradients nearly 0."""
    img, txt = _features(12, 8, seed=3)
    txt = img if pairs == "identical" else txt
    scale = np.float32(np.log(100.0))
    tiled = lambda i, t, s, b: losses.clip_loss_tiled(i, t, s, 5)  # noqa: E731
    got = _value_and_grads(tiled, img, txt, scale, BIAS)
    assert np.all(np.isfinite(got[0])) and all(np.all(np.isfinite(g)) for g in got[1])
    _assert_close(got, _value_and_grads(_dense_clip, img, txt, scale, BIAS))


def _temp_bytes(fn, n: int, d: int) -> int:
    args = (jax.ShapeDtypeStruct((n, d), jnp.float32),) * 2 + (jax.ShapeDtypeStruct((), jnp.float32),)
    compiled = jax.jit(jax.grad(fn, argnums=(0, 1, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_tiled_memory_is_linear_in_the_batch():
    """Compiled scratch memory of loss+grad at N=4096: the dense [N, N] logits (64 MiB) vs at most a few tiles."""
    n, d, block = 4096, 8, 256
    dense = _temp_bytes(losses.clip_loss, n, d)
    tiled = _temp_bytes(functools.partial(losses.clip_loss_tiled, block_size=block), n, d)
    assert dense >= n * n * 4
    assert tiled <= 8 * block * block * 4 + 16 * n * d * 4, f"tiled loss+grad uses {tiled} bytes of scratch"
