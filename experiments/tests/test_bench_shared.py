"""The pieces the benchmark scripts share: bench_loss's case record, bench_matmul's rates, one synthetic batch for
both frameworks, the open_clip worker's train step (torch_worker.py, also bench_gpu's open_clip side), and the
product suite staying free of benchmark code."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
PARITY_PYTHON = os.environ.get("CLIPJAX_PARITY_PYTHON", "")
needs_torch = pytest.mark.skipif(not os.path.exists(PARITY_PYTHON),
                                 reason="the open_clip worker needs torch: set CLIPJAX_PARITY_PYTHON to a python "
                                        "with the [parity] extra")


def test_loss_case_record_from_the_command_line():
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / "bench_loss.py"), "--case", "tiled", "512", "128",
                           "--repeats", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    case = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(case) == {"kind", "batch", "dim", "block_size", "compile_s", "temp_bytes", "argument_bytes",
                         "output_bytes", "rss_before_run_bytes", "loss", "grad_scale", "times_s", "median_s",
                         "peak_rss_bytes"}
    assert (case["kind"], case["batch"], case["dim"], case["block_size"]) == ("tiled", 512, 512, 128)
    assert len(case["times_s"]) == 2 and math.isfinite(case["loss"]) and case["loss"] > 0


def test_loss_program_is_the_same_in_both_benchmarks():
    import jax

    import bench_gpu
    from bench_loss import compile_loss_grad, loss_inputs

    gpu = bench_gpu.loss_case("tiled", 256, 32, 64, mem_limit=2**30, steps=2, deadline=math.inf)
    compiled, _ = compile_loss_grad("tiled", 256, 32, 64)
    loss, _ = jax.block_until_ready(compiled(*loss_inputs(256, 32, math.log(1 / 0.07))))
    assert gpu["fits"] and gpu["loss"] == float(loss) and gpu["n_steps"] == 2


def test_matmul_rates():
    from bench_matmul import jax_matmul_times, measure_peak

    times = jax_matmul_times(64, 3, "bfloat16", warmup=2)
    assert len(times) == 3 and all(t > 0 for t in times)
    peak = measure_peak(None, sizes=(64,), rounds=1, reps=2)
    assert list(peak["sizes"][0]) == ["n", "jax_gflops"] and peak["peak_gflops"] == peak["sizes"][0]["jax_gflops"] > 0


def test_one_synthetic_batch_for_every_benchmark():
    from bench_common import random_batch

    b = random_batch(TINY, 5, seed=3)
    assert b["image"].shape == (5, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["text"].shape == (5, 8) and b["text"].dtype == np.int32
    assert (b["text"].argmax(-1) >= 2).all() and (b["text"].max(-1) == 63).all()  # one end-of-text id per row
    np.testing.assert_array_equal(random_batch(TINY, 5, seed=3)["text"], b["text"])


def test_the_trainers_recipe_is_what_open_clip_copies():
    from bench_common import optimizer_recipe, train_config

    config = train_config(8, open_clip_config=TINY, dtype="bfloat16")
    assert config.model.open_clip_config.to_dict() == TINY and config.model.dtype == "bfloat16"
    assert optimizer_recipe(config) == {"lr": config.lr, "weight_decay": config.optimizer.weight_decay,
                                        "b1": config.optimizer.b1, "b2": config.optimizer.b2,
                                        "eps": config.optimizer.eps, "grad_clip_norm": 1.0}


@pytest.mark.parity
@needs_torch
def test_open_clip_worker_trains_on_the_jax_sides_batch():
    from bench_common import TorchWorker, optimizer_recipe, train_config

    check = ("import numpy as np, torch_worker, bench_common\n"
             f"cfg = {TINY!r}\n"
             "images, tokens = torch_worker.make_batch(cfg, 4)\n"
             "b = bench_common.random_batch(cfg, 4)\n"
             "assert (images.numpy() == b['image'].transpose(0, 3, 1, 2)).all(), 'images'\n"
             "assert (tokens.numpy() == b['text']).all() and str(tokens.dtype) == 'torch.int64', 'tokens'\n")
    proc = subprocess.run([PARITY_PYTHON, "-c", check], capture_output=True, text=True, timeout=120, cwd=EXPERIMENTS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with TorchWorker(python=PARITY_PYTHON) as worker:
        assert worker("setup_train", model_cfg=TINY, batch=4, opt=optimizer_recipe(train_config(4)))["params"] > 0
        steps = worker("train_steps", n=3)
        worker("setup_infer", model_cfg=TINY, batch=4)
        infer = worker("infer_steps", what="text", n=2)
    assert len(steps["times"]) == 3 and math.isfinite(steps["loss"]) and len(infer["times"]) == 2


def test_the_product_suite_runs_no_benchmark_code():
    testpaths = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    assert testpaths == ["tests"]
    scripts = [p.stem for p in EXPERIMENTS.glob("*.py")]
    for test in (ROOT / "tests").rglob("*.py"):
        text = test.read_text()
        for s in scripts:  # neither run nor imported (the scripts import each other as top-level modules)
            assert f"{s}.py" not in text and not re.search(rf"^\s*(import|from) {s}\b", text, re.M), (test, s)
