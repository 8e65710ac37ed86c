"""Dense fp32 matmul throughput of this machine (JAX and torch), the denominator of MFU.

    python experiments/bench_matmul.py            # prints JSON; run_all.py calls `measure_peak` in its own run

The "measured peak" is the best median GFLOP/s over square sizes and both frameworks: what a well-tuned fp32 GEMM
reaches on this host right now (with whatever else is running on it), not the nominal FMA-port peak.
"""

from __future__ import annotations

import json

from bench_common import TorchWorker, interleave, median, timed

SIZES = (1024, 2048, 4096)


def jax_matmul_times(n: int, reps: int, dtype: str = "float32", warmup: int = 1) -> list[float]:
    """Wall times of `reps` [n, n] @ [n, n] matmuls in JAX in `dtype` (float32 accumulation, XLA's default), after
    compiling and `warmup` untimed calls."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)  # [n, n]
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)  # [n, n]
    mm = jax.jit(jnp.matmul)
    for _ in range(warmup):
        mm(a, b).block_until_ready()
    return timed(lambda: mm(a, b).block_until_ready(), reps)


def measure_peak(worker: TorchWorker | None, sizes: tuple[int, ...] = SIZES, rounds: int = 2, reps: int = 3
                 ) -> dict:
    """GFLOP/s of an n×n @ n×n fp32 matmul in JAX (and torch if a worker is given), interleaved, per size."""
    rows = []
    for n in sizes:
        flops = 2.0 * n ** 3
        if worker is None:
            tj, tt = jax_matmul_times(n, rounds * reps), []
        else:
            worker("matmul", n=n, reps=1)  # warm-up
            tj, tt = interleave(lambda k, n=n: jax_matmul_times(n, k), lambda k, n=n: worker("matmul", n=n, reps=k)[
                "times"], rounds, reps)
        row = {"n": n, "jax_gflops": flops / median(tj) / 1e9}
        if tt:
            row["torch_gflops"] = flops / median(tt) / 1e9
        rows.append(row)
    best = max(max(r.get("jax_gflops", 0), r.get("torch_gflops", 0)) for r in rows)
    return {"sizes": rows, "peak_gflops": best}


if __name__ == "__main__":
    import contextlib
    import sys

    with TorchWorker() if "--no-torch" not in sys.argv else contextlib.nullcontext(None) as w:
        print(json.dumps(measure_peak(w), indent=2))
