"""GPU benchmark in one command: clipjax vs open_clip (eager and torch.compile), dense vs tiled loss, matmul rate.

    bash experiments/gpu_run.sh                       # on the GPU machine: wheels, versions, then this (≤ 6 min)
    python experiments/bench_gpu.py                   # → experiments/results/gpu-<date>.json (+ a copy under $OUT)
    python experiments/bench_gpu.py --tiny            # CPU rehearsal, tiny sizes, the same code path
                                                      #   → --out (default $OUT/bench_gpu-tiny.json or /tmp/...)

Same recipe on both sides: bf16 mixed precision (clipjax: model.dtype "bfloat16", float32 parameters; open_clip:
float32 parameters under `torch.autocast(bfloat16)`, as open_clip_train's amp_bf16), AdamW with the trainer's
defaults (`configs/common.py`), global-norm clipping at 1.0, logit-scale clamp, the contrastive loss, one fixed batch
of random data on the device. clipjax trains through the trainer's own `make_train_state` + `jit_train_step`.

Cases, in order of priority (a deadline skips what no longer fits): the JAX bf16 matmul rate; ViT-B-32 batch 512
(clipjax, open_clip eager, open_clip + torch.compile); ViT-B-16 batch 256 (clipjax, eager); loss + gradients at
N = 16k / 65k / 262k, D = 512 (dense where it fits in device memory, else its compiled size only; tiled always);
ViT-B-16 with torch.compile; ViT-L-14 batch 128.

Every part runs in its own process, one after the other (JAX and torch never share the chip; each process's peak
memory is its own), under its own timeout; its log goes to the log folder and its result (one JSON line) into the
record. Ratios are taken within this one run (same chip, same clocks). Steps: median of ≥ 15 timed steps after
≥ 3 warm-up steps, each step synchronised (`jax.block_until_ready` / `torch.cuda.synchronize`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench_common import (RESULTS_DIR, ROOT, command_line, median, optimizer_recipe, peak_rss, random_batch, stamp,
                          timed, train_config)

GPU_CASES = [("ViT-B-32", 512), ("ViT-B-16", 256), ("ViT-L-14", 128)]
GPU_LOSS = {"sizes": [16384, 65536, 262144], "dim": 512, "block": 1024}
GPU_MATMUL = 8192


def _tiny_vit(layers: int, width: int, patch: int) -> dict[str, Any]:
    text = {"context_length": 16, "vocab_size": 512, "width": width, "heads": 2, "layers": layers}
    return {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": layers, "width": width, "patch_size": patch},
            "text_cfg": text}


# --tiny: the same cases at toy sizes (CPU rehearsal of the code path, not a measurement)
TINY_MODELS = {"ViT-B-32": (_tiny_vit(2, 64, 16), 8), "ViT-B-16": (_tiny_vit(2, 64, 8), 8),
               "ViT-L-14": (_tiny_vit(3, 128, 8), 4)}
TINY_LOSS = {"sizes": [256, 1024, 4096], "dim": 64, "block": 128}
TINY_MATMUL = 256
TINY_MEM_LIMIT = 32 * 2**20  # so that the tiny dense loss at the largest N takes the "does not fit" path too

# estimated seconds a part needs on the GPU: it is skipped when less than this is left before the deadline
MIN_S = {"kernels": 45, "jax_train": 90, "jax_warm": 40, "torch_eager": 30, "torch_compile": 80}


# ============================================================================================ parts (subprocesses)

def _jax_peak(device) -> dict[str, Any]:
    """Peak device memory (GPU allocator) or, where the device reports none (CPU), the process's peak RSS."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_bytes": int(stats["peak_bytes_in_use"]), "peak_kind": "device",
                "bytes_limit": int(stats.get("bytes_limit", 0))}
    return {"peak_bytes": peak_rss(), "peak_kind": "host_rss"}


def part_matmul(n: int, reps: int = 10, **_) -> dict:
    """bf16 [n, n] @ [n, n] rate of the device in JAX (float32 accumulation as XLA's default): bench_matmul's."""
    import jax

    from bench_matmul import jax_matmul_times

    times = jax_matmul_times(n, reps, "bfloat16", warmup=3)
    return {"n": n, "dtype": "bfloat16", "median_s": median(times), "tflops": 2 * n**3 / median(times) / 1e12,
            "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform}


def _train_config(model_cfg: dict, batch: int):
    """The trainer's config for this benchmark: its defaults (AdamW, clip 1.0), bf16 compute, this model, batch."""
    return train_config(batch, open_clip_config=model_cfg, dtype="bfloat16")


def part_jax_train(model_cfg: dict, batch: int, warmup: int, steps: int, deadline: float,
                   cache_dir: str = "off", **_) -> dict:
    """clipjax's train step as the trainer builds it (one device): init, compile, first step, timed steps.
    `cache_dir`: the persistent compilation cache (`clipjax.compile_cache`; "off": compiled afresh) — a second run
    with the same directory is the trainer's warm start (a resume, a re-run)."""
    t_import = time.perf_counter()
    import jax

    from clipjax import compile_cache

    if compile_cache.enable(cache_dir):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the tiny rehearsal's steps too
    from clipjax import sharding as shd
    from clipjax.metrics import train_flops_per_step
    from clipjax.models import CLIP
    from clipjax.train import jit_train_step, make_train_state, make_tx, model_config

    device = jax.devices()[0]
    config = _train_config(model_cfg, batch)
    cfg = model_config(config)
    mesh = shd.make_mesh({"data": 1}, devices=[device])
    t0 = time.perf_counter()
    model = CLIP(cfg)
    state, shardings, tx = make_train_state(model, lambda p: make_tx(config, p), 0, mesh)
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    data = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in random_batch(model_cfg, batch).items()}
    lowered = jit_train_step(model, tx, config, mesh, shardings).lower(state, data)
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    box = {"state": state}

    def step():
        box["state"], metrics = compiled(box["state"], data)
        box["loss"] = float(jax.block_until_ready(metrics)["loss"])

    step()
    t4 = time.perf_counter()
    times = timed(step, steps, warmup=warmup, deadline=deadline, budget_s=30.0)
    mem = compiled.memory_analysis()
    flops = train_flops_per_step(cfg, batch)
    return {"framework": "clipjax", "device": device.device_kind, "platform": device.platform,
            "import_s": t0 - t_import, "init_s": t1 - t0, "trace_lower_s": t2 - t1, "compile_s": t3 - t2,
            "first_step_s": t4 - t3, "time_to_first_step_s": t4 - t0, **_summary(times, batch, flops),
            "loss": box["loss"], "compiled_temp_bytes": int(mem.temp_size_in_bytes), **_jax_peak(device)}


def _summary(times: list[float], batch: int, flops: float) -> dict:
    step = median(times)
    return {"step_s": step, "samples_per_s": batch / step, "tflops_per_s": flops / step / 1e12,
            "flops_per_step": flops, "n_steps": len(times), "times": [round(t, 5) for t in times]}


def part_torch_train(model_cfg: dict, batch: int, opt: dict, mode: str, warmup: int, steps: int, deadline: float,
                     **_) -> dict:
    """open_clip's train step (`torch_worker.train_step`: forward + ClipLoss under bf16 autocast, backward, clip,
    AdamW, clamp), eager or torch.compile'd, on CUDA when there is one."""
    t_import = time.perf_counter()
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # time to first step: compiled afresh
    import open_clip
    import torch
    from open_clip.loss import ClipLoss

    import torch_worker

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":  # as open_clip_train's main sets them
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    t0 = time.perf_counter()
    torch.manual_seed(0)
    base = torch_worker.make_model(model_cfg).to(dev).train()
    model = torch.compile(base) if mode == "compile" else base
    optimizer, loss_fn = torch_worker.make_optimizer(base, opt), ClipLoss()
    images, tokens = torch_worker.make_batch(model_cfg, batch, device=dev)  # [N, 3, S, S], [N, L]
    box = {}

    def step():
        total = torch_worker.train_step(model, base, optimizer, loss_fn, images, tokens, opt["grad_clip_norm"],
                                        autocast=torch.bfloat16)
        sync()
        box["loss"] = float(total.item())

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()
    t1 = time.perf_counter()
    times = timed(step, steps, warmup=warmup, deadline=deadline, budget_s=30.0)
    if dev == "cuda":
        peak = {"peak_bytes": int(torch.cuda.max_memory_allocated()), "peak_kind": "device"}
        name = torch.cuda.get_device_name()
    else:
        peak, name = {"peak_bytes": peak_rss(), "peak_kind": "host_rss"}, "cpu"
    return {"framework": f"open_clip {open_clip.__version__} ({mode})", "torch": torch.__version__, "device": name,
            "import_s": t0 - t_import, "time_to_first_step_s": t1 - t0, **_summary(times, batch, float("nan")),
            "loss": box["loss"], **peak}


def loss_case(kind: str, n: int, dim: int, block: int, mem_limit: int, steps: int, deadline: float) -> dict:
    """Loss + gradients (w.r.t. both feature sets and the scale) at N × D: the compiled program's memory (temp +
    arguments + outputs), and the median time where that fits in the device's memory (bench_loss's program and
    inputs)."""
    import jax

    from bench_loss import compile_loss_grad, loss_inputs

    device = jax.devices()[0]
    compiled, compile_s = compile_loss_grad(kind, n, dim, block)
    mem = compiled.memory_analysis()
    need = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    limit = mem_limit or int((device.memory_stats() or {}).get("bytes_limit", 0)) or _host_available()
    out = {"kind": kind, "n": n, "dim": dim, "block": block if kind == "tiled" else None,
           "compile_s": compile_s, "temp_bytes": int(mem.temp_size_in_bytes), "needs_bytes": int(need),
           "limit_bytes": int(limit), "fits": need <= 0.95 * limit}
    if not out["fits"]:
        return out
    img, txt, scale = loss_inputs(n, dim, math.log(1 / 0.07))
    box = {}

    def call():
        box["loss"] = float(jax.block_until_ready(compiled(img, txt, scale))[0])

    times = timed(call, steps, warmup=1, deadline=deadline, budget_s=15.0)
    return {**out, "median_s": median(times), "n_steps": len(times), "loss": box["loss"]}


def part_kernels(matmul_n: int, loss: dict, mem_limit: int, steps: int, deadline: float, **_) -> dict:
    """One JAX process: the bf16 matmul rate, then dense and tiled loss + gradients at each N (each case in its own
    try, skipped once the deadline has passed)."""
    out: dict[str, Any] = {"matmul": part_matmul(matmul_n), "loss": []}
    for n in loss["sizes"]:
        for kind in ("dense", "tiled"):
            what = {"kind": kind, "n": n, "dim": loss["dim"]}
            if time.time() > deadline:
                out["loss"].append({**what, "skipped": "deadline"})
                continue
            try:
                out["loss"].append(loss_case(kind, n, loss["dim"], loss["block"], mem_limit, steps, deadline))
            except Exception as e:  # one case's failure (e.g. out of memory) is recorded, the others still run
                out["loss"].append({**what, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            print(json.dumps(out["loss"][-1]), file=sys.stderr, flush=True)
    return out


def _host_available() -> int:
    """Half the host's available memory (the CPU's "device memory" for the fits check)."""
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    return kib * 1024 // 2


PARTS = {"kernels": part_kernels, "jax_train": part_jax_train, "torch_train": part_torch_train}


def run_part_here(name: str, spec: dict) -> None:
    """Child side: run one part, print its result as the last stdout line (library prints go to stderr)."""
    out, sys.stdout = sys.stdout, sys.stderr
    result = PARTS[name](**spec)
    out.write(json.dumps(result) + "\n")
    out.flush()


# ============================================================================================ orchestration

class Runner:
    """Runs parts as subprocesses, one after the other, each under min(its timeout, time left to the deadline)."""

    def __init__(self, deadline: float, log_dir: pathlib.Path, torch_python: str | None):
        self.deadline, self.log_dir, self.torch_python = deadline, log_dir, torch_python
        self.skipped: list[dict] = []
        self.errors: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def __call__(self, label: str, part: str, spec: dict, *, min_s: float, timeout: float,
                 python: str | None = None) -> dict | None:
        if self.left() < min_s:
            self.skipped.append({"part": label, "reason": f"{self.left():.0f} s left, needs ~{min_s} s"})
            print(f"[skip] {label}: {self.skipped[-1]['reason']}", flush=True)
            return None
        limit = max(1.0, min(timeout, self.left()))
        spec = {**spec, "deadline": time.time() + limit - max(10.0, 0.25 * limit)}  # the part stops timing early
        log = self.log_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", label) + ".log")  # plain names travel everywhere
        cmd = [python or sys.executable, str(pathlib.Path(__file__).resolve()), "--part", part, "--spec",
               json.dumps(spec)]
        t0 = time.perf_counter()
        code, stdout = _run_group(cmd, log, limit)
        wall = time.perf_counter() - t0
        if code != 0 or not stdout.strip():
            why = "timeout" if code is None else f"exit code {code}"
            self.errors.append({"part": label, "error": why, "log": str(log), "wall_s": wall,
                                "log_tail": _tail(log)})
            print(f"[fail] {label}: {why} after {wall:.0f} s (log {log})", flush=True)
            return None
        result = {**json.loads(stdout.strip().splitlines()[-1]), "wall_s": wall}
        print(f"[done] {label} in {wall:.1f} s: {_brief(result)}", flush=True)
        return result


def _run_group(cmd: list[str], log: pathlib.Path, timeout: float) -> tuple[int | None, str]:
    """Run `cmd` in its own process group (torch.compile's workers die with it on a timeout) → (code, stdout);
    code None on a timeout."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
            return proc.returncode, stdout
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return None, ""


def _tail(path: pathlib.Path, chars: int = 1500) -> str:
    try:
        return path.read_text()[-chars:]
    except OSError:
        return ""


def _brief(r: dict) -> str:
    if "matmul" in r:
        return f"matmul {r['matmul']['tflops']:.3g} TFLOP/s, {len(r['loss'])} loss cases"
    keys = ("samples_per_s", "time_to_first_step_s", "peak_bytes", "tflops", "median_s", "fits", "temp_bytes")
    return ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys if k in r)


def _train_case(run: Runner, model: str, model_cfg: dict, batch: int, opt: dict, args, modes: list[str],
                warm: bool = False) -> dict:
    """clipjax and open_clip (each of `modes`) on one model and batch → the case with its in-run ratios."""
    case: dict[str, Any] = {"model": model, "batch": batch, "open_clip_config": model_cfg}
    # the first case also measures the warm start: its compilation cache (fresh, so the first run is cold) is read
    # by a second run of the same step
    cache = tempfile.mkdtemp(prefix="clipjax-xla-cache-") if warm else "off"  # not under $OUT: not brought back
    spec = {"model_cfg": model_cfg, "batch": batch, "warmup": args.warmup, "steps": args.steps, "cache_dir": cache}
    r = run(f"{model} clipjax", "jax_train", spec, min_s=MIN_S["jax_train"], timeout=240)
    if r:
        case["clipjax"] = r
        if warm:
            w = run(f"{model} clipjax, warm compilation cache", "jax_train", {**spec, "warmup": 1, "steps": 3},
                    min_s=MIN_S["jax_warm"], timeout=120)
            if w:
                case["clipjax_warm"] = w
    for mode in modes:
        _torch_case(run, case, opt, args, mode)
    return case


def _torch_case(run: Runner, case: dict, opt: dict, args, mode: str) -> None:
    """open_clip in `mode` ("eager" | "compile") on the case's model and batch, added to the case."""
    spec = {"model_cfg": case["open_clip_config"], "batch": case["batch"], "warmup": args.warmup,
            "steps": args.steps, "opt": opt, "mode": mode}
    r = run(f"{case['model']} open_clip {mode}", "torch_train", spec, min_s=MIN_S[f"torch_{mode}"],
            timeout=240 if mode == "compile" else 120, python=run.torch_python)
    if r:
        case[f"open_clip_{mode}"] = r
        _ratios(case)


def _ratios(case: dict) -> None:
    """clipjax ÷ open_clip samples/s, and open_clip's TFLOP/s from clipjax's analytic FLOPs (same model)."""
    jx = case.get("clipjax")
    for key in ("open_clip_eager", "open_clip_compile"):
        if jx and key in case:
            case[key]["tflops_per_s"] = jx["flops_per_step"] / case[key]["step_s"] / 1e12
            case[key]["flops_per_step"] = jx["flops_per_step"]
            case[f"clipjax_vs_{key}"] = jx["samples_per_s"] / case[key]["samples_per_s"]


def model_cases(tiny: bool, names: list[str] | None) -> list[tuple[str, dict, int]]:
    """(name, open_clip config, batch) of each train case."""
    from clipjax.models import get_model_config

    out = []
    for name, batch in GPU_CASES:
        if names and name not in names:
            continue
        if tiny:
            cfg, batch = TINY_MODELS[name]
            out.append((f"tiny:{name}", cfg, batch))
        else:
            out.append((name, get_model_config(name).to_open_clip(), batch))
    return out


def run_all(args, torch_python: str | None, log_dir: pathlib.Path) -> dict:
    """Every part in order of priority until the deadline → the record."""
    run = Runner(time.time() + args.deadline_s, log_dir, torch_python)
    record: dict[str, Any] = {**stamp(command_line()), "tiny": args.tiny, "nvidia_smi": nvidia_smi(),
                              "torch_python": torch_python, "deadline_s": args.deadline_s,
                              "recipe": {"dtype": "bfloat16 compute, float32 parameters", **optimizer_recipe(_train_config({}, 1))}}
    kernels = run("matmul + loss", "kernels", {
        "matmul_n": TINY_MATMUL if args.tiny else GPU_MATMUL, "loss": TINY_LOSS if args.tiny else GPU_LOSS,
        "mem_limit": TINY_MEM_LIMIT if args.tiny else 0, "steps": args.loss_steps}, min_s=MIN_S["kernels"],
        timeout=150)
    record["matmul"], record["loss"] = (kernels["matmul"], kernels["loss"]) if kernels else (None, [])
    cases = model_cases(args.tiny, args.models)
    modes = [] if torch_python is None else args.torch_modes
    record["train"] = []
    for i, (name, cfg, batch) in enumerate(cases):
        # ViT-B-16's torch.compile waits until ViT-B-16's other parts are done (it is the first to go when late)
        later = ["compile"] if i == 1 and "compile" in modes else []
        record["train"].append(_train_case(run, name, cfg, batch, record["recipe"], args,
                                           [m for m in modes if m not in later], warm=i == 0))
        for mode in later:
            _torch_case(run, record["train"][-1], record["recipe"], args, mode)
    record["skipped"], record["errors"] = run.skipped, run.errors
    record["table"] = table(record)
    return record


def nvidia_smi() -> dict | None:
    """The GPU's name, memory, driver and clocks (None without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    q = "name,memory.total,driver_version,clocks.max.sm,clocks.sm,temperature.gpu,power.limit"
    try:
        rows = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": str(e)}
    return {"query": q, "rows": rows}


# ============================================================================================ report

def _gb(x: float | None) -> str:
    if not x:
        return "–"
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.1f} MB"


def _rate(r: dict | None, ratio: float | None = None) -> str:
    if not r:
        return "–"
    text = f"{r['samples_per_s']:.0f}"
    if "tflops_per_s" in r and math.isfinite(r["tflops_per_s"]):
        text += f" ({r['tflops_per_s']:.3g} TFLOP/s)"
    return text + (f", clipjax {ratio:.2f}×" if ratio else "")


def _first_step(r: dict | None) -> str:
    if not r:
        return "–"
    return f"{r['time_to_first_step_s']:.1f} s" + (f" (compile {r['compile_s']:.1f} s)" if "compile_s" in r else "")


def _loss_cell(r: dict | None) -> str:
    if r is None or "skipped" in r or "error" in r:
        return "–" if r is None else r.get("skipped") or "error"
    if not r["fits"]:
        return f"does not fit ({_gb(r['needs_bytes'])} compiled)"
    return f"{r['median_s'] * 1e3:.1f} ms, {_gb(r['needs_bytes'])}"


def table(record: dict) -> str:
    """The Markdown table of a record (the GPU section of RESULTS.md takes it as is)."""
    lines = ["| what | clipjax | open_clip eager (autocast bf16) | open_clip + torch.compile |", "|---|---|---|---|"]
    for c in record["train"]:
        j, e, k = (c.get(key) for key in ("clipjax", "open_clip_eager", "open_clip_compile"))
        head = f"{c['model']} train, batch {c['batch']}"
        lines.append(f"| {head}, samples/s | {_rate(j)} | {_rate(e, c.get('clipjax_vs_open_clip_eager'))} | "
                     f"{_rate(k, c.get('clipjax_vs_open_clip_compile'))} |")
        lines.append(f"| {head}, time to first step (init + compile + step) | {_first_step(j)} | "
                     f"{_first_step(e)} | {_first_step(k)} |")
        if c.get("clipjax_warm"):
            lines.append(f"| {head}, time to first step, warm compilation cache | "
                         f"{_first_step(c['clipjax_warm'])} | | |")
        lines.append(f"| {head}, peak memory | " + " | ".join(_gb(r and r["peak_bytes"]) for r in (j, e, k)) + " |")
    by = {(r["kind"], r["n"]): r for r in record["loss"]}
    for n in sorted({r["n"] for r in record["loss"]}):
        dim = record["loss"][0]["dim"]
        lines.append(f"| loss + grads (compiled memory), N = {n}, D = {dim}: dense / tiled | "
                     f"{_loss_cell(by.get(('dense', n)))} / "
                     f"{_loss_cell(by.get(('tiled', n)))} | – | – |")
    m = record.get("matmul")
    if m:
        lines.append(f"| bf16 matmul {m['n']}³ (JAX), TFLOP/s | {m['tflops']:.1f} | | |")
    return "\n".join(lines)


# ============================================================================================ main

def torch_python_for(args) -> str | None:
    """The Python that runs open_clip: $CLIPJAX_PARITY_PYTHON, else this one when it has torch + open_clip, else
    the checkout's parity venv; None with --no-torch or when none is found."""
    if args.no_torch:
        return None
    env = os.environ.get("CLIPJAX_PARITY_PYTHON")
    if env:
        return env
    import importlib.util

    if importlib.util.find_spec("torch") and importlib.util.find_spec("open_clip"):
        return sys.executable
    venv = ROOT / ".venv-parity" / "bin" / "python"
    return str(venv) if venv.exists() else None


def output_path(args) -> pathlib.Path:
    """Where the record goes: results/gpu-<date>.json for a real run; --out or $OUT / /tmp for --tiny (never the
    recorded results)."""
    date = datetime.date.today().isoformat()
    if not args.tiny:
        return pathlib.Path(args.out) if args.out else RESULTS_DIR / f"gpu-{date}.json"
    out = pathlib.Path(args.out) if args.out else pathlib.Path(os.environ.get("OUT") or "/tmp") / "bench_gpu-tiny.json"
    if out.resolve().parent == RESULTS_DIR.resolve():
        raise SystemExit(f"--tiny writes no record into {RESULTS_DIR}: give --out elsewhere")
    return out


def main() -> None:
    from clipjax.cpu import use_huge_pages

    use_huge_pages()  # as the command-line entry points do (re-executes this process; clipjax/cpu.py)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU rehearsal of the same code path)")
    ap.add_argument("--out", default="", help="the record's path (see the default above)")
    ap.add_argument("--no-torch", action="store_true", help="clipjax and the loss only")
    ap.add_argument("--torch-modes", default="eager,compile", help="open_clip modes: eager,compile")
    ap.add_argument("--models", default="", help="comma-separated subset of ViT-B-32,ViT-B-16,ViT-L-14")
    ap.add_argument("--deadline-s", type=float, default=0, help="stop starting parts after this (default 330; "
                                                                  "--tiny 1800)")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps (default 3; --tiny 1)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 15; --tiny 3)")
    ap.add_argument("--loss-steps", type=int, default=0, help="timed loss calls (default 10; --tiny 3)")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        return run_part_here(args.part, json.loads(args.spec))
    args.deadline_s = args.deadline_s or (1800 if args.tiny else 330)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    args.steps = args.steps or (3 if args.tiny else 15)
    args.loss_steps = args.loss_steps or (3 if args.tiny else 10)
    args.torch_modes = [m for m in args.torch_modes.split(",") if m]
    args.models = [m for m in args.models.split(",") if m] or None
    if not args.tiny and nvidia_smi() is None:
        raise SystemExit("no GPU here (nvidia-smi not found): use --tiny for a CPU rehearsal")
    path = output_path(args)
    log_dir = pathlib.Path(os.environ.get("OUT") or "/tmp") / "bench_gpu-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    torch_python = torch_python_for(args)
    print(json.dumps({"versions": stamp("")["versions"], "torch_python": torch_python, "out": str(path),
                      "logs": str(log_dir)}), flush=True)
    record = run_all(args, torch_python, log_dir)
    write_record(record, path)
    print(record["table"])
    if record["errors"] or record["skipped"]:
        print(json.dumps({"errors": [{k: e[k] for k in ("part", "error", "log")} for e in record["errors"]],
                          "skipped": record["skipped"]}, indent=1))


def write_record(record: dict, path: pathlib.Path) -> None:
    """The record at `path` and, on a real run with $OUT set, a copy under $OUT/results (what comes back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2) + "\n"
    path.write_text(text)
    print(f"wrote {path}", flush=True)
    if not record["tiny"] and os.environ.get("OUT"):
        copy = pathlib.Path(os.environ["OUT"]) / "results" / path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(text)
        print(f"wrote {copy}", flush=True)


if __name__ == "__main__":
    main()
