"""The whole performance record in one command: matmul peak, train steps and inference, clipjax vs open_clip.

    python experiments/run_all.py                 # → results/perf-<date>.json, results/perf-<date>.png, a table
    python experiments/run_all.py --quick         # fewer rounds (a smoke run, not a record)

Needs open_clip + torch in the Python of `bench_common.TorchWorker` (the `parity` extra in a second venv; see
RESULTS.md). In one process and one run, alternating the two frameworks:
  1. fp32 matmul GFLOP/s of this machine (the MFU denominator: best of JAX and torch over 1024²…4096²);
  2. train step, small config (ViT-S-16-small, batch 128) and ViT-B-32 (batch 32): compile time, median step,
     samples/s, analytic and XLA FLOPs, MFU of each framework;
  3. encode_image / encode_text, ViT-B-32, batch 64.
The Markdown table it prints is the one in RESULTS.md and the README.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json

from bench_common import RESULTS_DIR as RESULTS, TorchWorker, command_line, stamp, write_json
from bench_infer import run as run_infer
from bench_matmul import measure_peak
from bench_train import run_case


def compile_s(case: dict) -> float:
    """Trace + lower + XLA compile of the train step (the first step's overhead before it runs)."""
    return case["compile"]["trace_lower_s"] + case["compile"]["compile_s"]


def table(record: dict) -> str:
    peak = record["matmul"]["peak_gflops"]
    lines = ["| benchmark | clipjax | open_clip | ratio | clipjax MFU | open_clip MFU |", "|---|---|---|---|---|---|"]
    for c in record["train"]:
        j, t = c["jax"], c.get("torch")
        lines.append(
            f"| train {c['model']}, batch {c['batch']} (samples/s) | {j['samples_per_s']:.2f} | "
            f"{t['samples_per_s']:.2f} | **{c['speedup']:.2f}×** | {j['gflops_per_s'] / peak:.2f} | "
            f"{t['gflops_per_s'] / peak:.2f} |" if t else
            f"| train {c['model']}, batch {c['batch']} (samples/s) | {j['samples_per_s']:.2f} | – | – | "
            f"{j['gflops_per_s'] / peak:.2f} | – |")
    inf = record["infer"]
    for what in ("image", "text"):
        r = inf[f"encode_{what}"]
        lines.append(f"| encode_{what} {inf['model']}, batch {inf['batch']} (per s) | {r['jax_per_s']:.1f} | "
                     + (f"{r['torch_per_s']:.1f} | **{r['speedup']:.2f}×** | | |" if "speedup" in r else "– | – | | |"))
    for c in record["train"]:
        lines.append(f"| compile (trace + lower + XLA), train {c['model']} (s) | {compile_s(c):.1f} | "
                     + (f"{c['torch_first_step_s']:.1f} (first step) | | | |" if "torch_first_step_s" in c
                        else "– | | | |"))
    lines.append(f"| fp32 matmul peak of this machine in this run (GFLOP/s) | "
                 + " / ".join(f"{r['n']}²: {r['jax_gflops']:.0f}" for r in record["matmul"]["sizes"]) + " | "
                 + " / ".join(f"{r['n']}²: {r['torch_gflops']:.0f}" for r in record["matmul"]["sizes"]
                              if "torch_gflops" in r) + f" | peak {peak:.0f} | | |")
    return "\n".join(lines)


def plot(record: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = record["matmul"]["peak_gflops"]
    labels, jx, tc, mj, mt = [], [], [], [], []
    for c in record["train"]:
        if "torch" in c:
            labels.append(f"train\n{c['model']}\nbatch {c['batch']}")
            jx.append(c["jax"]["samples_per_s"]), tc.append(c["torch"]["samples_per_s"])
            mj.append(c["jax"]["gflops_per_s"] / peak), mt.append(c["torch"]["gflops_per_s"] / peak)
    inf = record["infer"]
    for what in ("image", "text"):
        r = inf[f"encode_{what}"]
        if "torch_per_s" in r:
            labels.append(f"encode_{what}\n{inf['model']}\nbatch {inf['batch']}")
            jx.append(r["jax_per_s"]), tc.append(r["torch_per_s"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [len(labels), 2]})
    x = range(len(labels))
    rel = [j / t for j, t in zip(jx, tc)]
    a1.bar([i - 0.2 for i in x], [1.0] * len(labels), 0.4, label="open_clip (= 1)", color="tab:gray")
    a1.bar([i + 0.2 for i in x], rel, 0.4, label="clipjax", color="tab:blue")
    for i, (r, t) in enumerate(zip(rel, tc)):
        a1.text(i + 0.2, r, f"{r:.2f}×", ha="center", va="bottom", fontsize=9)
        a1.text(i - 0.2, 1.0, f"{t:.1f}/s", ha="center", va="bottom", fontsize=7, color="dimgray")
    a1.set_xticks(list(x), labels, fontsize=8)
    a1.set(ylabel="throughput relative to open_clip", title="throughput, same run (CPU fp32)")
    a1.legend(fontsize=8, loc="lower right")
    xm = range(len(mj))
    a2.bar([i - 0.2 for i in xm], mt, 0.4, color="tab:gray", label="open_clip")
    a2.bar([i + 0.2 for i in xm], mj, 0.4, color="tab:blue", label="clipjax")
    a2.set_xticks(list(xm), [lb.split("\n")[1] for lb in labels[:len(mj)]], fontsize=8)
    a2.set(ylabel=f"MFU (of measured {peak:.0f} GFLOP/s)", ylim=(0, 1.05), title="train-step MFU")
    a2.legend(fontsize=8)
    fig.suptitle(f"clipjax vs open_clip, {record['date'][:10]}, commit {record['commit']}, "
                 f"{record['machine']['cpu']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from clipjax.cpu import use_huge_pages

    use_huge_pages()  # as the command-line entry points do (re-executes this process; clipjax/cpu.py)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds of 1 step: checks the harness, not a record")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--tag", default="", help="results/perf-<tag>.json (default: today's date)")
    args = ap.parse_args()
    rounds, per_round, warmup = (2, 1, 1) if args.quick else (5, 2, 2)
    from clipjax import compile_cache

    compile_cache.enable("off")  # compile times are measured, so never from a cache
    tag = args.tag or datetime.date.today().isoformat()
    record: dict = stamp(command_line())
    with contextlib.nullcontext(None) if args.no_torch else TorchWorker() as worker:
        if worker is not None:
            record["torch_worker"] = worker("info")
        record["matmul"] = measure_peak(worker)
        print(json.dumps(record["matmul"]), flush=True)
        record["train"] = []
        for case in ("small", "b32"):
            record["train"].append(run_case(case, worker, rounds, per_round, warmup))
            c = record["train"][-1]
            print(f"train {case}: clipjax {c['jax']['samples_per_s']:.2f}/s, compile {compile_s(c):.1f} s; "
                  f"open_clip {c.get('torch', {}).get('samples_per_s', float('nan')):.2f}/s", flush=True)
        record["infer"] = run_infer("ViT-B-32", 64, worker, rounds, per_round)
        print(json.dumps({k: v.get("speedup") for k, v in record["infer"].items() if k.startswith("encode")}),
              flush=True)
    if args.quick:
        tag += "-quick"
    record["table"] = table(record)
    path = write_json(f"perf-{tag}.json", record)
    plot(record, RESULTS / f"perf-{tag}.png")
    print(record["table"])
    print(f"wrote {path} and {RESULTS / f'perf-{tag}.png'}")


if __name__ == "__main__":
    main()
