"""experiments/bench_gpu.py on the CPU with --tiny: the code path the GPU run takes, its record's keys and numbers."""

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "experiments" / "bench_gpu.py"


def run_bench(tmp_path, *flags, timeout=300):
    out = tmp_path / "gpu-tiny.json"
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--models", "ViT-B-32", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return json.loads(out.read_text()), proc.stdout


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_clipjax_side_writes_a_complete_record(tmp_path):
    record, stdout = run_bench(tmp_path, "--no-torch")
    assert record["tiny"] is True and record["errors"] == [] and record["skipped"] == []
    for key in ("date", "commit", "machine", "versions", "recipe", "matmul", "loss", "train", "table"):
        assert key in record, key
    assert record["recipe"]["grad_clip_norm"] == 1.0 and "bfloat16" in record["recipe"]["dtype"]
    assert positive(record["matmul"]["tflops"]) and record["matmul"]["dtype"] == "bfloat16"

    (case,) = record["train"]
    assert case["model"] == "tiny:ViT-B-32" and "open_clip_eager" not in case
    jx = case["clipjax"]
    for key in ("samples_per_s", "step_s", "tflops_per_s", "time_to_first_step_s", "init_s", "compile_s",
                "first_step_s", "peak_bytes", "compiled_temp_bytes", "loss"):
        assert positive(jx[key]), (key, jx[key])
    assert jx["n_steps"] >= 3 and len(jx["times"]) == jx["n_steps"]
    # the warm start reads the compiled step from the cold run's persistent cache: same step, far less compiling
    warm = case["clipjax_warm"]
    assert warm["loss"] == jx["loss"] and warm["compile_s"] < jx["compile_s"] / 2, (warm, jx)
    assert "warm compilation cache" in record["table"]

    loss = {(r["kind"], r["n"]): r for r in record["loss"]}
    assert sorted(loss) == [(k, n) for k in ("dense", "tiled") for n in (256, 1024, 4096)]
    for (kind, n), r in loss.items():
        assert positive(r["needs_bytes"]) and positive(r["compile_s"])
        if (kind, n) == ("dense", 4096):
            assert r["fits"] is False and "median_s" not in r  # the "does not fit" path: compiled size only
        else:
            assert r["fits"] and positive(r["median_s"]) and positive(r["loss"]), r
    assert loss[("tiled", 4096)]["needs_bytes"] < loss[("dense", 4096)]["needs_bytes"] / 10
    assert "tiny:ViT-B-32 train, batch 8" in record["table"] and "does not fit" in record["table"]
    assert "tiny:ViT-B-32 train" in stdout  # the table is printed


def test_tiny_record_never_lands_in_recorded_results():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench_gpu
    finally:
        sys.path.remove(str(BENCH.parent))
    tiny = argparse.Namespace(tiny=True, out=str(ROOT / "experiments" / "results" / "gpu-x.json"))
    with pytest.raises(SystemExit, match="--tiny writes no record"):
        bench_gpu.output_path(tiny)
    assert bench_gpu.output_path(argparse.Namespace(tiny=False, out="")).parent == ROOT / "experiments" / "results"


@pytest.mark.parity
@pytest.mark.skipif(not os.path.exists(os.environ.get("CLIPJAX_PARITY_PYTHON", "/nonexistent")),
                    reason="open_clip side needs torch: set CLIPJAX_PARITY_PYTHON to a python with open_clip")
def test_tiny_open_clip_side(tmp_path):
    record, _ = run_bench(tmp_path, "--torch-modes", "eager")
    case = record["train"][0]
    assert record["errors"] == [], record["errors"]
    for key in ("samples_per_s", "time_to_first_step_s", "peak_bytes", "tflops_per_s"):
        assert positive(case["open_clip_eager"][key]), key
    assert positive(case["clipjax_vs_open_clip_eager"])
