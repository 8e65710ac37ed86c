"""Peak memory and time of the softmax contrastive loss + gradient: dense `clip_loss` vs tiled `clip_loss_tiled`.

Each case runs in its own subprocess so that its peak RSS (ru_maxrss) is its own. Per case we record XLA's compiled
memory analysis (temp = scratch buffers, plus arguments and outputs), the process's peak RSS before and after the
run, and the median wall time of loss+grad (w.r.t. both feature sets and the logit scale) after a warm-up call.

    python experiments/bench_loss.py                 # all cases → experiments/results/loss_memory.json
    python experiments/bench_loss.py --quick         # B = 4096 only
    python experiments/bench_loss.py --case tiled 16384 1024   # one case, prints its JSON line

Cases at D = 512: "dense" (`clip_loss`, the reference form), "dense_global" (`clip_loss_sharded` with no mesh axis:
the dense form the "clip" registry entry trains with) and "tiled" (`clip_loss_tiled`) at B = 4096 and 16384; tiled at
B = 65536, and the dense loss at 65536 compiled only (its memory analysis, without running it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import time

from bench_common import peak_rss

D = 512
RESULTS = pathlib.Path(__file__).parent / "results" / "loss_memory.json"
CASES = [  # (kind, batch, block_size, timed repeats; 0 = compile only)
    ("dense", 4096, 0, 5),
    ("dense_global", 4096, 0, 5),
    ("tiled", 4096, 1024, 5),
    ("dense", 16384, 0, 3),
    ("dense_global", 16384, 0, 3),
    ("tiled", 16384, 1024, 3),
    ("tiled", 65536, 1024, 1),
    ("dense", 65536, 0, 0),
]
GIB = 2**30


def compile_loss_grad(kind: str, batch: int, dim: int, block_size: int):
    """The loss + gradients (w.r.t. both feature sets and the logit scale) of `kind` ("dense": `clip_loss`;
    "dense_global": `clip_loss_sharded` with no mesh axis; "tiled": `clip_loss_tiled`) compiled for [batch, dim]
    float32 features → (the compiled function, seconds to compile)."""
    import functools

    import jax
    import jax.numpy as jnp

    from clipjax import losses

    loss = {
        "dense": losses.clip_loss,
        "dense_global": functools.partial(losses.clip_loss_sharded, axis_name=None),
        "tiled": functools.partial(losses.clip_loss_tiled, block_size=block_size),
    }[kind]
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
    t0 = time.perf_counter()
    compiled = fn.lower(spec, spec, jax.ShapeDtypeStruct((), jnp.float32)).compile()
    return compiled, time.perf_counter() - t0


def loss_inputs(batch: int, dim: int, scale: float):
    """Unit-norm image and text features [batch, dim] (each text correlated with its image) and the logit scale."""
    import jax
    import jax.numpy as jnp

    k1, k2 = jax.random.split(jax.random.key(0))
    img = jax.random.normal(k1, (batch, dim))  # [B, D]
    txt = img + jax.random.normal(k2, (batch, dim))  # [B, D], correlated with its pair
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    return jax.block_until_ready((img, txt, jnp.float32(scale)))


def run_case(kind: str, batch: int, block_size: int, repeats: int) -> dict:
    """Compile and time loss+grad for one case in this process."""
    import jax

    compiled, compile_s = compile_loss_grad(kind, batch, D, block_size)
    mem = compiled.memory_analysis()
    out = {
        "kind": kind, "batch": batch, "dim": D, "block_size": block_size or None, "compile_s": round(compile_s, 2),
        "temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
    }
    if repeats == 0:
        return out

    img, txt, scale = loss_inputs(batch, D, 2.6592)
    out["rss_before_run_bytes"] = peak_rss()
    times = []
    for i in range(repeats + (1 if repeats > 1 else 0)):  # a warm-up call unless there is a single timed call
        t0 = time.perf_counter()
        value, grads = jax.block_until_ready(compiled(img, txt, scale))
        if repeats == 1 or i > 0:
            times.append(time.perf_counter() - t0)
    out.update({
        "loss": float(value), "grad_scale": float(grads[2]), "times_s": [round(t, 3) for t in times],
        "median_s": round(statistics.median(times), 3), "peak_rss_bytes": peak_rss(),
    })
    return out


def _machine() -> dict:
    info = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    meminfo = pathlib.Path("/proc/meminfo").read_text().splitlines() if pathlib.Path("/proc/meminfo").exists() else []
    mem_kib = next((int(line.split()[1]) for line in meminfo if line.startswith("MemTotal")), 0)
    return {
        "cpu": models[0] if models else platform.processor(), "logical_cpus": len(models),
        "avx512": " avx512f" in flags, "mem_total_gib": round(mem_kib / 2**20, 1), "platform": platform.platform(),
    }


def _commit() -> str | None:
    try:
        here = pathlib.Path(__file__).parent
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summary_markdown(results: dict) -> str:
    rows = ["| loss | B | block | temp (compiled) | peak RSS | loss+grad time |", "|---|---|---|---|---|---|"]
    for r in results["cases"]:
        rss = f"{r['peak_rss_bytes'] / GIB:.2f} GiB" if "peak_rss_bytes" in r else "not run"
        t = f"{r['median_s']:.2f} s" if "median_s" in r else "—"
        rows.append(f"| {r['kind']} | {r['batch']} | {r['block_size'] or '—'} | {r['temp_bytes'] / GIB:.3f} GiB "
                    f"| {rss} | {t} |")
    head = f"D = {D}, float32, {results['machine']['cpu']} ({results['machine']['logical_cpus']} vCPU), " \
           f"jax {results['jax']}, {results['date']}"
    return head + "\n\n" + "\n".join(rows)


def main() -> None:
    from clipjax.cpu import use_huge_pages

    use_huge_pages()  # as the command-line entry points do (re-executes this process; clipjax/cpu.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs=3, metavar=("KIND", "BATCH", "BLOCK"), help="run one case in-process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="only the B = 4096 cases")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args()

    if args.case:
        kind, batch, block = args.case
        print(json.dumps(run_case(kind, int(batch), int(block), args.repeats)))
        return

    import jax

    cases = [c for c in CASES if c[1] == 4096] if args.quick else CASES
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(), "jax": jax.__version__, "python": platform.python_version(), "machine": _machine(),
        "command": "python " + " ".join(sys.argv), "cases": [],
    }
    for kind, batch, block, repeats in cases:
        cmd = [sys.executable, __file__, "--case", kind, str(batch), str(block), "--repeats", str(repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"case {kind} B={batch} failed:\n{proc.stderr[-2000:]}")
        case = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(case), flush=True)
        results["cases"].append(case)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(summary_markdown(results))


if __name__ == "__main__":
    main()
