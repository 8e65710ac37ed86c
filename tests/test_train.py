"""Training core on simulated CPU devices: sharded steps equal single-device steps, accumulation is exact,
checkpoints resume exactly, FSDP really shards, and the CLI works end to end."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from clipjax import sharding as shd
from clipjax.checkpoint import Checkpointer
from clipjax.losses import get_loss
from clipjax.models import CLIP, CLIPConfig, TextConfig, VisionConfig
from clipjax.train import abstract_with_shardings, make_train_state, train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=16, layers=1, width=32, patch_size=8, head_width=16),
                  text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1), quick_gelu=True)
TINY_RN = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=(1, 1, 1, 1), width=8, patch_size=None),
                     text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1))


def batch(n, cfg=TINY, seed=0):
    rng = np.random.default_rng(seed)
    s, length = cfg.vision.image_size, cfg.text.context_length
    text = rng.integers(1, cfg.text.vocab_size - 1, (n, length)).astype(np.int32)
    text[np.arange(n), rng.integers(2, length, n)] = cfg.text.vocab_size - 1
    return {"image": rng.standard_normal((n, s, s, 3)).astype(np.float32), "text": text}


def run_steps(cfg, mesh_shape, n_devices, data, steps=2, loss="clip", accum=1, tx=None):
    mesh = shd.make_mesh(mesh_shape, devices=jax.devices()[:n_devices])
    model = CLIP(cfg)
    tx = tx or optax.sgd(0.5)
    state, shardings, tx = make_train_state(model, lambda p: tx, 0, mesh)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, loss_fn=get_loss(loss), mesh=mesh,
                                     accum_steps=accum), donate_argnums=(0,))
    losses = []
    for _ in range(steps):
        b = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in data.items()}
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    return state, losses


def assert_trees_close(a, b, atol=1e-5):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5, err_msg=str(path))


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps(TINY, {"data": 1}, 1, batch(16))


@pytest.mark.parametrize("mesh_shape,n", [({"data": -1}, 2), ({"data": -1}, 4), ({"data": -1}, 8),
                                          ({"fsdp": -1}, 8), ({"data": 2, "fsdp": 4}, 8),
                                          ({"fsdp": 4, "tensor": 2}, 8)])
def test_sharded_steps_equal_single_device(single_device_run, mesh_shape, n):
    ref_state, ref_losses = single_device_run
    state, losses = run_steps(TINY, mesh_shape, n, batch(16))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # float32 sums in another order on each device layout, after two SGD steps of lr 0.5: a few 1e-5 apart (a
    # wrongly sharded step is off by orders of magnitude more)
    assert_trees_close(state.params, ref_state.params, atol=5e-5)


@pytest.mark.parametrize("loss", ["siglip", "clip_tiled"])
def test_other_losses_shard_exactly(loss):
    cfg = TINY.replace(init_logit_bias=-10.0) if loss == "siglip" else TINY
    ref, ref_losses = run_steps(cfg, {"data": 1}, 1, batch(16), loss=loss)
    out, losses = run_steps(cfg, {"fsdp": -1}, 8, batch(16), loss=loss)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # after two lr-0.5 SGD steps: float32 sums over 8 shards in another order differ by up to 1.3e-5 here
    assert_trees_close(out.params, ref.params, atol=5e-5)


def test_resnet_step_shards_and_updates_batch_stats():
    ref, ref_losses = run_steps(TINY_RN, {"data": 1}, 1, batch(8, TINY_RN), steps=1)
    out, losses = run_steps(TINY_RN, {"data": -1}, 4, batch(8, TINY_RN), steps=1)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # BatchNorm statistics are reduced across devices: the reduction order differs, and BN amplifies it a little
    assert_trees_close(out.params, ref.params, atol=1e-4)
    assert_trees_close(out.batch_stats, ref.batch_stats, atol=1e-4)
    init_mean = np.zeros_like(np.asarray(out.batch_stats["visual"]["bn1"]["mean"]))
    assert np.abs(np.asarray(out.batch_stats["visual"]["bn1"]["mean"]) - init_mean).max() > 1e-4


@pytest.mark.parametrize("n_devices", [1, 4])
def test_gradient_accumulation_equals_full_batch(n_devices):
    data = batch(16)
    full, full_losses = run_steps(TINY, {"data": -1}, n_devices, data, steps=1)
    acc, acc_losses = run_steps(TINY, {"data": -1}, n_devices, data, steps=1, accum=4)
    np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)
    assert_trees_close(acc.params, full.params)


def test_fsdp_shards_parameters_and_optimizer_state():
    cfg = CLIPConfig(embed_dim=64, vision=VisionConfig(image_size=32, layers=2, width=128, patch_size=8),
                     text=TextConfig(context_length=16, vocab_size=512, width=128, heads=2, layers=2))
    mesh = shd.make_mesh({"fsdp": -1})
    state, _, _ = make_train_state(CLIP(cfg), lambda p: optax.adamw(1e-3), 0, mesh)
    assert shd.sharded_fraction(state.params).fraction >= 0.98
    assert shd.sharded_fraction(state.opt_state).fraction >= 0.98
    qkv = state.params["visual"]["transformer"]["resblocks_0"]["attn"]["qkv_kernel"]
    assert qkv.sharding.spec[0] == "fsdp" and len(qkv.addressable_shards) == 8
    assert qkv.addressable_shards[0].data.shape[0] == 128 // 8
    dp, _, _ = make_train_state(CLIP(cfg), lambda p: optax.adamw(1e-3), 0, shd.make_mesh({"data": -1}))
    assert shd.sharded_fraction(dp.params).fraction == 0.0
    assert_trees_close(dp.params, state.params, atol=0)  # same init whatever the mesh


def test_checkpoint_restore_continues_exactly(tmp_path):
    mesh = shd.make_mesh({"fsdp": -1})
    model, tx = CLIP(TINY), optax.adamw(1e-2)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, loss_fn=get_loss("clip"), mesh=mesh))
    data = [{k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in batch(8, seed=i).items()}
            for i in range(3)]
    state, shardings, _ = make_train_state(model, lambda p: tx, 0, mesh)
    state, _ = step(state, data[0])
    saved = jax.tree.map(np.asarray, state)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, state, {"position": 1})
    ckpt.wait()
    for b in data[1:]:
        state, m = step(state, b)
    # same mesh: the resumed trajectory is bit-identical to the uninterrupted one
    fresh, _, _ = make_train_state(model, lambda p: tx, 7, mesh)
    s, restored, data_state = ckpt.restore(abstract_with_shardings(shardings, fresh))
    assert s == 1 and data_state == {"position": 1} and int(restored.step) == 1
    for b in data[1:]:
        restored, m2 = step(restored, b)
    assert float(m2["loss"]) == float(m["loss"])
    assert_trees_close(restored.params, state.params, atol=0)
    # another mesh (8-device FSDP → 4-device data parallel): identical values, new shardings, training continues
    mesh4 = shd.make_mesh({"data": -1}, devices=jax.devices()[:4])
    state4, shardings4, _ = make_train_state(model, lambda p: tx, 1, mesh4)
    _, on4, _ = ckpt.restore(abstract_with_shardings(shardings4, state4))
    ckpt.close()
    assert_trees_close(on4, saved, atol=0)
    kernel = on4.params["visual"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"]
    assert kernel.sharding.is_fully_replicated and len(kernel.devices()) == 4
    step4 = jax.jit(functools.partial(train_step, model=model, tx=tx, loss_fn=get_loss("clip"), mesh=mesh4))
    b = {k: jax.device_put(np.asarray(v), shd.batch_sharding(mesh4, v.ndim)) for k, v in data[1].items()}
    on4, m4 = step4(on4, b)
    assert int(on4.step) == 2 and np.isfinite(float(m4["loss"]))


def test_nonfinite_update_is_skipped_and_counted():
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    model, tx = CLIP(TINY), optax.sgd(0.1)
    state, _, _ = make_train_state(model, lambda p: tx, 0, mesh)
    before = jax.tree.map(np.asarray, state.params)
    bad = batch(4)
    bad["image"][0, 0, 0, 0] = np.nan
    state, m = jax.jit(functools.partial(train_step, model=model, tx=tx, loss_fn=get_loss("clip"), mesh=mesh))(
        state, bad)
    assert not np.isfinite(float(m["loss"])) and int(m["nonfinite_total"]) == 1 and int(m["nonfinite_streak"]) == 1
    assert_trees_close(state.params, before, atol=0)


def test_mesh_axis_names_only_in_sharding_module():
    for path in (ROOT / "clipjax").rglob("*.py"):
        if path.name == "sharding.py":
            continue
        text = path.read_text()
        for axis in ('"fsdp"', '"tensor"', "'fsdp'", "'tensor'"):
            assert axis not in text, f"{path} names mesh axis {axis}: use logical names + clipjax.sharding"


def _main(workdir, *overrides, timeout=600):
    cmd = [sys.executable, "-m", "clipjax.main", f"--config={ROOT / 'configs' / 'vit_b32.py'}:runlocal",
           f"--workdir={workdir}", "--config.model.name=ViT-T-demo", "--config.batch_size=8",
           "--config.log_every=1", "--config.async_checkpoints=False", *overrides]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_main_resumes_from_workdir(tmp_path):
    full = _main(tmp_path / "full", "--config.total_steps=4", "--config.ckpt_every=2", "--config.warmup_steps=1")
    assert full.returncode == 0, full.stderr[-2000:]
    part = _main(tmp_path / "part", "--config.total_steps=2", "--config.ckpt_every=2", "--config.warmup_steps=1")
    assert part.returncode == 0, part.stderr[-2000:]
    # same schedule, longer run: the second invocation must resume at step 2 and follow the same trajectory
    cfg = json.loads((tmp_path / "part" / "config.json").read_text())
    assert cfg["model_config"]["embed_dim"] == 128
    resumed = _main(tmp_path / "part", "--config.total_steps=4", "--config.ckpt_every=2", "--config.warmup_steps=1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 2" in resumed.stderr
    rows = lambda d: {r["step"]: r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}
    full_rows, part_rows = rows(tmp_path / "full"), rows(tmp_path / "part")
    for step in (3, 4):
        assert part_rows[step]["loss"] == pytest.approx(full_rows[step]["loss"], rel=1e-6)
    for key in ("step", "loss", "lr", "temperature", "grad_norm", "samples_per_sec", "step_time", "loop_cpu_time"):
        assert key in full_rows[4]
    assert 0 < full_rows[4]["loop_cpu_time"] <= 1.01 * full_rows[4]["step_time"]  # one thread: at most the wall time
    assert full_rows[4]["temperature"] == pytest.approx(np.exp(full_rows[4]["logit_scale"]))
    import clipjax

    model = clipjax.load(tmp_path / "full")
    assert model.config.embed_dim == 128
    feats = np.asarray(model.encode_text(model.tokenize(["a red circle"])))
    assert feats.shape == (1, 128) and np.isfinite(feats).all()


def test_unknown_config_key_suggests_close_match(tmp_path):
    out = _main(tmp_path / "x", "--config.total_stepz=3")
    assert out.returncode != 0
    assert "unknown config key 'total_stepz'" in out.stderr and "total_steps" in out.stderr
