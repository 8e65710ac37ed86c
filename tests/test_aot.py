"""`python -m clipjax.aot` on this host's (simulated) devices: what the compiled step holds per device, which
collectives cross slices of a multi-slice mesh, and a step compiled ahead of time that `clipjax.main --compiled`
runs bit for bit like one it compiles itself. (Compiles for TPU topologies, which need libtpu: test_aot_tpu.py.)"""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))


def _tiny_config(mesh):
    import vit_b32

    c = vit_b32.get_config("runlocal")
    c.model.name = "ViT-T-demo"
    c.batch_size = 16
    c.mesh = mesh
    return c


def _param_bytes(program):
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(program.state.params))


def test_multislice_mesh_keeps_parameters_in_a_slice_and_only_reduces_gradients_across():
    from clipjax import aot

    devices = jax.devices()[:8]
    program = aot.lower(_tiny_config({"slices": 2, "fsdp": -1}), devices)
    assert dict(program.mesh.shape) == {"slice": 2, "data": 1, "fsdp": 4, "tensor": 1}
    state = program.state
    specs = [x.sharding.spec for x in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state)]
    assert any("fsdp" in str(s) for s in specs)  # sharded inside a slice ...
    assert not any("slice" in str(s) for s in specs)  # ... never across slices
    out, compiled = aot.report(program, "local", 1, devices)
    # state and batch per device: a quarter of the whole (FSDP over the 4 devices of a slice, replicated over slices)
    assert out["bytes_per_chip"]["arguments"] == pytest.approx(out["total_argument_bytes"] / 4, rel=0.05)
    cross = out["cross_slice"]
    moved = {op: v["bytes"] for op, v in cross.items()}
    # the gradient reduction is the all-reduce across slices of each slice's gradient shard (the parameters / 4) ...
    assert moved["all-reduce"] == pytest.approx(_param_bytes(program) / 4, rel=0.1)
    # ... and is nearly all that crosses: the rest is the loss's gather of the embeddings [N, E] and its scalars
    assert moved["all-reduce"] > 0.9 * sum(moved.values())
    assert set(cross) <= {"all-reduce", "all-gather", "reduce-scatter"}
    assert cross["all-reduce"]["count"] <= out["collectives"]["all-reduce"]
    # one slice: the slice axis has size 1 and the same state shards the same way
    single = aot.lower(_tiny_config({"fsdp": 4}), devices[:4])
    assert dict(single.mesh.shape) == {"slice": 1, "data": 1, "fsdp": 4, "tensor": 1}
    assert [x.sharding.spec for x in jax.tree.leaves(single.state.params)] == [
        x.sharding.spec for x in jax.tree.leaves(state.params)]


def test_collective_groups_in_every_hlo_spelling():
    from clipjax import aot

    assert aot._groups("{{0,1},{2,3}}") == [[0, 1], [2, 3]]
    assert aot._groups("[2,2]<=[4]") == [[0, 1], [2, 3]]
    assert aot._groups("[2,2]<=[2,2]T(1,0)") == [[0, 2], [1, 3]]
    # mesh form: devices laid out [2,4]ᵀ over axes (a=4, b=2); groups vary along a only
    assert aot._mesh_groups("'a'=4,'b'=2", "[2,4]T(1,0)", "'a'") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert aot._mesh_groups("'a'=4,'b'=2", None, "'b'") == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_unknown_topology_or_missing_compiler_is_one_line():
    cmd = [sys.executable, "-m", "clipjax.aot", f"--config={ROOT / 'configs' / 'vit_b32.py'}", "--topology=v5e:3x7"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    if importlib.util.find_spec("libtpu") is None:
        assert "libtpu" in lines[0] and "clipjax[tpu]" in lines[0]
    else:
        assert "v5e:3x7" in lines[0] and "topology" in lines[0]


DEMO = [f"--config={ROOT / 'configs' / 'demo.py'}", "--config.batch_size=16", "--config.total_steps=3",
        "--config.log_every=1", "--config.evals={}", "--config.async_checkpoints=False"]


def _run(module, *args, devices=2):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", module, *DEMO, f"--local_device_count={devices}", *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_step_compiled_ahead_of_time_trains_bit_for_bit_and_is_refused_for_another_config(tmp_path):
    exe = tmp_path / "step.exe"
    made = _run("clipjax.aot", "--topology=local", f"--save_executable={exe}")
    assert made.returncode == 0, made.stderr[-3000:]
    report = json.loads(made.stdout.strip().splitlines()[-1])
    assert report["chips"] == 2 and report["fits"] is True and exe.stat().st_size > 0
    ran = _run("clipjax.main", f"--workdir={tmp_path / 'aot'}", f"--compiled={exe}")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "train step loaded from" in ran.stderr
    plain = _run("clipjax.main", f"--workdir={tmp_path / 'jit'}")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert len(_losses(tmp_path / "aot")) == 3
    assert _losses(tmp_path / "aot") == _losses(tmp_path / "jit")  # bit-identical
    # another learning rate is another program: refused in one line, nothing trained
    other = _run("clipjax.main", f"--workdir={tmp_path / 'other'}", f"--compiled={exe}", "--config.lr=5e-4")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith("error: --compiled=") and "another program" in other.stderr
    assert not (tmp_path / "other" / "metrics.jsonl").exists()
    # other devices: named
    fewer = _run("clipjax.main", f"--workdir={tmp_path / 'one'}", f"--compiled={exe}", devices=1)
    assert fewer.returncode == 2 and "chips 2 there, 1 here" in fewer.stderr.strip().splitlines()[-1]
    # not an executable at all
    junk = tmp_path / "junk.exe"
    junk.write_bytes(b"not a program")
    bad = _run("clipjax.main", f"--workdir={tmp_path / 'junk'}", f"--compiled={junk}")
    assert bad.returncode == 2 and "not a step written by python -m clipjax.aot" in bad.stderr
