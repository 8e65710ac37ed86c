"""Shared pieces of the clipjax-vs-open_clip benchmarks: the torch worker client, machine/version facts, timing.

Measurements are ratios taken in one run: the JAX side runs in this process, the open_clip side in a long-lived
subprocess (`torch_worker.py`) of the parity venv that sleeps on its stdin while JAX measures; rounds alternate
between the two, and every figure is a median of >= 5 timed steps after warm-up. The parity venv's python is
$CLIPJAX_PARITY_PYTHON, by default `.venv-parity/bin/python` in the checkout
(`python -m venv .venv-parity && .venv-parity/bin/pip install -e ".[parity]"`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "experiments" / "results"
PARITY_PYTHON = os.environ.get("CLIPJAX_PARITY_PYTHON", str(ROOT / ".venv-parity" / "bin" / "python"))


class TorchWorker:
    """Client of a JSON-lines worker process: `torch_worker.py` in the parity venv by default, or any script with
    the same protocol (`bench_train.py --worker` runs a clipjax variant under its own XLA_FLAGS)."""

    def __init__(self, python: str = PARITY_PYTHON, script: str | None = None, args: list[str] | None = None,
                 env: dict[str, str] | None = None):
        if not os.path.exists(python):
            raise FileNotFoundError(f"worker python {python!r} not found (set CLIPJAX_PARITY_PYTHON)")
        base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
        script = script or str(ROOT / "experiments" / "torch_worker.py")
        self.proc = subprocess.Popen([python, script, *(args or [])], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**base, **(env or {})}, bufsize=1)

    def __call__(self, cmd: str, **kw: Any) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died during {cmd!r} (exit code {self.proc.poll()})")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"torch worker, command {cmd!r}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)

    def __enter__(self) -> "TorchWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(handlers: dict[str, Callable[..., dict]]) -> None:
    """The worker side of `TorchWorker`'s protocol: one JSON request per stdin line → one JSON reply per stdout line,
    {"ok": True, ...handler's result} or {"ok": False, "error": ...}; {"cmd": "quit"} ends. Library prints go to
    stderr so they cannot corrupt the protocol."""
    out, sys.stdout = sys.stdout, sys.stderr
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        if cmd == "quit":
            break
        try:
            if cmd not in handlers:
                raise ValueError(f"unknown command {cmd!r}")
            reply = {"ok": True, **handlers[cmd](**msg)}
        except Exception as e:  # reported to the orchestrator, which raises
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def timed(fn: Callable[[], Any], n: int, *, warmup: int = 0, deadline: float = math.inf,
          budget_s: float = math.inf) -> list[float]:
    """Wall time of `n` calls of `fn` (which must block until its result is ready) after `warmup` untimed calls;
    fewer, but at least 3, once `time.time()` passes `deadline` or the timed calls add up to `budget_s`."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    while len(out) < n and (len(out) < 3 or (time.time() < deadline and sum(out) < budget_s)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleave(a: Callable[[int], list[float]], b: Callable[[int], list[float]], rounds: int, per_round: int
               ) -> tuple[list[float], list[float]]:
    """Alternate `per_round` steps of A and of B for `rounds` rounds; returns all step times of each."""
    ta, tb = [], []
    for r in range(rounds):
        first, second = (a, b) if r % 2 == 0 else (b, a)  # also alternate who goes first
        x, y = first(per_round), second(per_round)
        (ta, tb)[0 if first is a else 1].extend(x)
        (ta, tb)[1 if first is a else 0].extend(y)
    return ta, tb


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def peak_rss() -> int:
    """This process's peak resident memory in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def random_batch(model_cfg: dict, batch: int, seed: int = 0) -> dict:
    """One synthetic batch for an open_clip model-config dict, the same for both frameworks: images [N, S, S, 3]
    float32 (standard normal) and tokens [N, L] int32 with the end-of-text id (vocab - 1, the maximum) at a random
    position ≥ 2 of each row (NumPy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    s, text = model_cfg["vision_cfg"]["image_size"], model_cfg["text_cfg"]
    length, vocab = text.get("context_length", 77), text.get("vocab_size", 49408)
    tokens = rng.integers(1, vocab - 1, (batch, length)).astype(np.int32)
    tokens[np.arange(batch), rng.integers(2, length, batch)] = vocab - 1
    return {"image": rng.standard_normal((batch, s, s, 3)).astype(np.float32), "text": tokens}


def train_config(batch: int, *, model_name: str = "", open_clip_config: dict | None = None, scan: bool = False,
                 remat: str = "none", dtype: str = "float32"):
    """The trainer's config for a benchmark: its defaults (AdamW, clipping at 1.0), the model by name or as an
    open_clip config dict, the batch."""
    sys.path.insert(0, str(ROOT))
    import ml_collections

    from configs.common import base_config

    c = base_config()
    c.model.name, c.model.scan_layers, c.model.remat, c.model.dtype = model_name, scan, remat, dtype
    if open_clip_config is not None:
        c.model.open_clip_config = ml_collections.ConfigDict(open_clip_config)
    c.batch_size, c.total_steps, c.warmup_steps = batch, 10_000, 10
    return c


def optimizer_recipe(config) -> dict:
    """The trainer's optimizer settings of `config`, which the open_clip side copies (`torch_worker.make_optimizer`)."""
    o = config.optimizer
    return {"lr": config.lr, "weight_decay": o.weight_decay, "b1": o.b1, "b2": o.b2, "eps": o.eps,
            "grad_clip_norm": o.grad_clip_norm}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def machine() -> dict[str, Any]:
    cpu, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return {"cpu": cpu, "nproc": os.cpu_count(), "simd": simd, "platform": platform.platform(),
            "python": platform.python_version(), "load_avg_at_start": list(os.getloadavg())}


def jax_versions() -> dict[str, str]:
    import flax
    import jax
    import jaxlib
    import optax

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__}


def stamp(command: str) -> dict[str, Any]:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "command": command, "machine": machine(), "versions": jax_versions(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def write_json(name: str, payload: dict) -> pathlib.Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


# ---- FLOPs counted from the program itself ----------------------------------------------------------------------

def jaxpr_matmul_flops(fn: Callable, *args: Any) -> float:
    """Exact FLOPs of every dot_general and convolution in `fn(*args)`'s jaxpr (2 per multiply-add), looking into
    sub-jaxprs (jit, custom_vjp, remat, shard_map; scan bodies × their length). An independent check of the
    analytic formulas in `clipjax.metrics`: it counts what the traced program really multiplies."""
    import jax

    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    from jax.extend.core import jaxprs_in_params

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
            cin = rhs[dn.rhs_spec[1]]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * spatial * cin
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for sub in jaxprs_in_params(eqn.params):
            total += times * _jaxpr_flops(sub)
    return total
