"""The pod recipes compiled by the real TPU compiler for compile-only TPU devices (needs the [tpu] extra: libtpu;
skipped without it). A small topology with the pod's per-chip batch: ViT-B-32 as configs/vit_b32.py runs it on a
v5e-256 (128 pairs per chip), here on a v5e 2x2 (4 chips). The 256-chip compiles are in experiments/AOT.md."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("libtpu", reason="compiling for a TPU needs libtpu (pip install 'clipjax[tpu]')")
import jax  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
PER_CHIP = 128  # the pod recipe's pairs per chip (32 768 on 256 chips)


@pytest.fixture(scope="module")
def chips():
    from clipjax import aot

    devices = aot.topology_devices("v5e:2x2")
    assert len(devices) == 4 and devices[0].device_kind == "TPU v5 lite"
    return devices


def _recipe(**mesh):
    import vit_b32

    c = vit_b32.get_config()
    c.batch_size = PER_CHIP * 4
    if mesh:
        c.mesh = mesh
    return c


def _state_bytes(state):
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


@pytest.fixture(scope="module")
def fsdp(chips):
    from clipjax import aot

    program = aot.lower(_recipe(), chips)
    out, compiled = aot.report(program, "v5e:2x2", 1, chips)
    return program, out, compiled.as_text()


def test_vit_b32_recipe_shards_parameters_and_optimizer_state_over_the_chips(fsdp):
    program, out, _ = fsdp
    assert out["mesh"] == {"slice": 1, "data": 1, "fsdp": 4, "tensor": 1} and out["fits"] is True
    assert out["global_batch"] == 512 and out["dtype"] == "bfloat16"
    # the whole state and batch, unsharded, against what one chip holds: a quarter, plus the few replicated vectors
    whole = out["total_argument_bytes"]
    state = _state_bytes(program.state)
    assert state > 0.9 * whole  # parameters and Adam moments dominate the arguments
    assert whole / 4 <= out["bytes_per_chip"]["arguments"] <= 1.15 * whole / 4
    # the updated state is written over the donated one
    assert out["bytes_per_chip"]["aliased"] >= 0.9 * state / 4
    assert out["collectives"]["all-gather"] > 0 and out["model_flops_per_step"] > 1e13


def test_tensor_parallel_mesh_shards_the_mlp_activations(chips, fsdp):
    from clipjax import aot

    # ViT-B-32 at 224: 50 tokens, MLP width 3072. With FSDP alone a chip computes whole MLP rows [b, 50, 3072] ...
    _, _, hlo_fsdp = fsdp
    assert re.search(r"bf16\[\d+,50,3072\]", hlo_fsdp)
    # ... with a tensor axis of 2 it computes half of each row, [b, 50, 1536], and never the whole width
    program = aot.lower(_recipe(fsdp=2, tensor=2), chips)
    out, compiled = aot.report(program, "v5e:2x2", 1, chips)
    hlo = compiled.as_text()
    assert out["mesh"]["tensor"] == 2 and out["fits"] is True
    assert re.search(r"bf16\[\d+,50,1536\]", hlo)
    assert not re.search(r"bf16\[\d+,50,3072\]", hlo)


def test_recipe_too_big_for_its_chips_is_one_line_and_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "clipjax.aot", f"--config={ROOT / 'configs' / 'vit_b32.py'}", "--topology=v5e:2x2",
           f"--config.batch_size={16 * PER_CHIP * 4}", f"--save_executable={tmp_path / 'step.exe'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    line = errors[0]
    assert "vit_b32.py does not fit v5e:2x2 (4 chips" in line and "GiB per chip" in line
    assert "remat" in line and "per-chip batch (now 2048" in line and "more chips" in line
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["fits"] is False and report["bytes_per_chip_total"] > 0.9 * report["hbm_bytes_per_chip"]
    assert not (tmp_path / "step.exe").exists()  # nothing written for a program that does not fit


def test_two_slices_send_gradient_reductions_over_the_data_centre_network():
    from clipjax import aot

    devices = aot.topology_devices("v5e:2x2", num_slices=2)
    assert sorted({d.slice_index for d in devices}) == [0, 1]
    import vit_b32

    c = vit_b32.get_config()
    c.model.name, c.batch_size = "ViT-T-demo", 64  # the multi-slice layout, not the model, is under test
    program = aot.lower(c, devices)
    assert dict(program.mesh.shape) == {"slice": 2, "data": 1, "fsdp": 4, "tensor": 1}
    specs = [str(x.sharding.spec) for x in jax.tree.leaves(program.state.params)]
    assert any("fsdp" in s for s in specs) and not any("slice" in s for s in specs)
    out, _ = aot.report(program, "v5e:2x2", 2, devices)
    cross = out["cross_slice"]
    params = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(program.state.params))
    # the gradients are all-reduced across slices from the chips' shards (not each chip a whole gradient: that would
    # be ≥ params / 2 bytes in bf16); the rest is the loss's gather of the [N, E] embeddings and its scalars
    assert cross["all-reduce"]["bytes"] >= 0.9 * sum(v["bytes"] for v in cross.values())
    assert params / 8 * 0.8 <= cross["all-reduce"]["bytes"] < params / 2
    assert set(cross) <= {"all-reduce", "all-gather", "reduce-scatter"}
