"""Fine-tuning is a task of the one trainer: through `python -m clipjax.main --config=configs/finetune.py` it survives
`kill -9` with an exact resume, and its sharded step equals the single-device step."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from clipjax import sharding as shd
from clipjax.data import scenes
from clipjax.models import CLIP, CLIPConfig, TextConfig, VisionConfig
from clipjax.step import classify_grads
from clipjax.train import make_train_state, train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
HF = ROOT / "tests" / "fixtures" / "hf_clip"
TINY = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=16, layers=1, width=32, patch_size=8, head_width=16),
                  text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1), quick_gelu=True)
TINY_RN = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=(1, 1, 1, 1), width=8, patch_size=None),
                     text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1))


@pytest.fixture(scope="module")
def scenes_spec(tmp_path_factory):
    path = scenes.build_scenes(tmp_path_factory.mktemp("scenes") / "ds", num_train=96, num_test=48, num_heldout=48,
                               image_size=32, workers=0, progress=False)
    return f"dir:{path}"


def cli(workdir: pathlib.Path, spec: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "run_cli.py"), "clipjax.main",
            f"--config={ROOT / 'configs' / 'finetune.py'}:init_from={HF},data={spec},tokenizer=folded,runlocal",
            f"--workdir={workdir}", "--config.total_steps=6", "--config.ckpt_every=2", "--config.batch_size=8",
            "--config.async_checkpoints=False", "--config.data.max_eval_examples=16", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}


def rows(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_finetune_cli_resumes_exactly_after_kill_9(tmp_path, scenes_spec):
    ref = tmp_path / "ref"
    out = subprocess.run(cli(ref, scenes_spec), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done: step 6 of 6" in out.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(killed, scenes_spec), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env(), cwd=ROOT)
    for line in proc.stderr:  # the step after the first checkpoint (step 2, written synchronously) was logged
        if "step 3/6" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "head.safetensors").exists()  # outputs are written only by a completed run

    out = subprocess.run(cli(killed, scenes_spec), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step 2" in out.stderr
    for name in ("model.safetensors", "head.safetensors", "classifier.json"):
        assert (killed / name).read_bytes() == (ref / name).read_bytes(), name
    ref_rows, got = rows(ref), rows(killed)
    assert [r["step"] for r in got] == [r["step"] for r in ref_rows]  # no duplicate rows of the re-run steps
    assert [r["loss"] for r in got if "loss" in r] == [r["loss"] for r in ref_rows if "loss" in r]
    assert [r["step"] for r in got if "eval/top1" in r] == [0, 6]


def _random_classify_batch(cfg, n, classes, seed=0):
    rng = np.random.default_rng(seed)
    s = cfg.vision.image_size
    return {"image": rng.standard_normal((n, s, s, 3)).astype(np.float32),
            "label": rng.integers(0, classes, n).astype(np.int32)}


def _classify_run(cfg, mesh_shape, n_devices, batch, accum=1, steps=2):
    mesh = shd.make_mesh(mesh_shape, devices=jax.devices()[:n_devices])
    model = CLIP(cfg)
    frozen = ("text", "logit_scale")
    tx = optax.multi_transform({"trainable": optax.sgd(0.5), "frozen": optax.set_to_zero()},
                               lambda p: jax.tree.map_with_path(
                                   lambda path, _: "frozen" if str(path[0].key) in frozen else "trainable", p))
    state, _, tx = make_train_state(model, lambda p: tx, 0, mesh, num_classes=5)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, grads=classify_grads(0.1), mesh=mesh,
                                     accum_steps=accum, frozen=frozen), donate_argnums=(0,))
    metrics = []
    for _ in range(steps):
        b = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
        state, m = step(state, b)
        metrics.append({k: float(v) for k, v in m.items()})
    return jax.device_get(state), metrics


@pytest.mark.parametrize("cfg", [TINY, TINY_RN], ids=["vit", "resnet"])
def test_classify_step_sharded_equals_single_device(cfg):
    batch = _random_classify_batch(cfg, 16, 5)
    single, m1 = _classify_run(cfg, {"data": 1}, 1, batch)
    sharded, m8 = _classify_run(cfg, {"data": 2, "fsdp": 4}, 8, batch)
    for a, b in zip(m1, m8):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == b["accuracy"]
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(single.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # the head and the image tower moved, the frozen text tower did not
    start, _ = _classify_run(cfg, {"data": 1}, 1, batch, steps=0)
    assert not np.array_equal(single.params["head"]["kernel"], start.params["head"]["kernel"])
    for x, y in zip(jax.tree.leaves(single.params["text"]), jax.tree.leaves(start.params["text"])):
        np.testing.assert_array_equal(x, y)


def test_classify_accumulation_equals_the_full_batch():
    batch = _random_classify_batch(TINY, 16, 5, seed=1)
    full, m_full = _classify_run(TINY, {"data": 4}, 4, batch)
    accum, m_acc = _classify_run(TINY, {"data": 4}, 4, batch, accum=2)
    for a, b in zip(m_full, m_acc):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
