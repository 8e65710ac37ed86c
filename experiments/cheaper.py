"""Cheaper pretraining on the shipped scenes dataset: how much training wall time FLIP patch dropout and a
low-resolution phase (CLIPA) save to reach the baseline's final held-out zero-shot accuracy.

    python experiments/cheaper.py                       # all variants, seeds 0 and 1 → results/cheaper-DATE.{json,png}
    python experiments/cheaper.py --steps 100 --variants baseline,pd50 --seeds 0    # a quick look

Every run is `clipjax.train.train` on `configs/demo.py:tower=vit` (the ViT image tower; patch dropout needs one),
held-out zero-shot top-1 every `--eval-every` steps, the variants one after the other on the same machine:

    baseline   no dropout, 64 px throughout
    pd50/pd75  patch dropout 0.5 / 0.75 for the first `--frac` of the steps, then a short unmasked phase (FLIP)
    lowres     32 px images (a quarter of the patch tokens) for the first `--frac` of the steps, then 64 px (CLIPA)

Training wall time is the sum of the logged step times (every step is logged; evaluation and checkpoint time are
not in them), with the first step of each phase, which holds its compilation, counted at the median of its phase.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import tempfile

from bench_common import ROOT, command_line, stamp, write_json

VARIANTS = ("baseline", "pd50", "pd75", "lowres")


def config(variant: str, seed: int, args):
    import ml_collections

    sys.path.insert(0, str(ROOT / "configs"))
    import demo

    c = demo.get_config(f"tower=vit,steps={args.steps},batch={args.batch}")
    c.seed = seed
    c.log_every, c.eval_every = 1, args.eval_every
    c.evals = ml_collections.ConfigDict({"heldout": c.evals.heldout.to_dict()})  # the held-out pairs only
    first = int(args.steps * args.frac)
    c.schedule = {"baseline": [], "pd50": [{"steps": first, "patch_dropout": 0.5}],
                  "pd75": [{"steps": first, "patch_dropout": 0.75}],
                  "lowres": [{"steps": first, "image_size": 32}]}[variant]
    return c


def training_times(rows: list[dict], boundaries: list[int]) -> dict[int, float]:
    """Cumulative training seconds after each step; the first step of each phase at its phase's median."""
    steps = {r["step"]: r["step_time"] for r in rows if "step_time" in r}
    edges = [0, *boundaries, max(steps)]
    out, total = {}, 0.0
    for lo, hi in zip(edges, edges[1:]):
        times = [steps[s] for s in range(lo + 1, hi + 1) if s in steps]
        med = statistics.median(times[1:] or times)
        for s in range(lo + 1, hi + 1):
            total += med if s == lo + 1 else steps.get(s, med)
            out[s] = total
    return out


def run(variant: str, seed: int, args, root: pathlib.Path) -> dict:
    from clipjax.train import train

    c = config(variant, seed, args)
    workdir = root / f"{variant}-{seed}"
    train(c, str(workdir))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    boundaries = [p["steps"] for p in c.schedule][:1]
    clock = training_times(rows, boundaries)
    curve = [(r["step"], clock[r["step"]], r["zeroshot/heldout/top1"]) for r in rows
             if "zeroshot/heldout/top1" in r and r["step"] in clock]
    print(f"{variant} seed {seed}: final held-out {curve[-1][2]:.3f} after {curve[-1][1]:.1f} s of training",
          flush=True)
    return {"variant": variant, "seed": seed, "schedule": list(c.schedule), "curve": curve,
            "train_seconds": clock[max(clock)], "final_top1": curve[-1][2]}


def time_to(curve: list, target: float) -> float | None:
    return next((t for _, t, acc in curve if acc >= target - 1e-9), None)


def steps_to(curve: list, target: float) -> int | None:
    return next((s for s, _, acc in curve if acc >= target - 1e-9), None)


def summarise(runs: list[dict]) -> list[dict]:
    """Per run: the time (and step) at which it first reaches the same seed's baseline final held-out top-1, and
    the saving = the baseline's own time to that accuracy ÷ the run's."""
    base = {r["seed"]: r for r in runs if r["variant"] == "baseline"}
    rows = []
    for r in runs:
        b = base.get(r["seed"])
        target = b["final_top1"] if b else None
        t = time_to(r["curve"], target) if target is not None else None
        tb = time_to(b["curve"], target) if b else None
        rows.append({"variant": r["variant"], "seed": r["seed"], "final_top1": r["final_top1"],
                     "train_seconds": r["train_seconds"], "target": target, "seconds_to_target": t,
                     "step_to_target": steps_to(r["curve"], target) if target is not None else None,
                     "saving": (tb / t) if (tb and t) else None})
    return rows


def plot(runs: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = dict(zip(VARIANTS, ("black", "tab:blue", "tab:orange", "tab:green")))
    for r in runs:
        _, t, acc = zip(*r["curve"])
        ax.plot(t, acc, color=colors.get(r["variant"]), ls="-" if r["seed"] == 0 else "--",
                label=f"{r['variant']} seed {r['seed']}")
    ax.set_xlabel("training wall time (s; compile and eval excluded)")
    ax.set_ylabel("held-out zero-shot top-1")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def resummarise(path: pathlib.Path) -> None:
    """Recompute the summary and the plot of a results file (no training)."""
    out = json.loads(path.read_text())
    out["summary"] = summarise(out["runs"])
    path.write_text(json.dumps(out, indent=2))
    plot(out["runs"], path.with_suffix(".png"))
    for row in out["summary"]:
        print(json.dumps(row))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--frac", type=float, default=0.8, help="fraction of the steps in the cheaper phase")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--resummarise", default="", help="a results JSON: recompute its summary and plot only")
    args = p.parse_args()
    if args.resummarise:
        return resummarise(pathlib.Path(args.resummarise))
    from clipjax import compile_cache

    compile_cache.enable()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            for variant in args.variants.split(","):
                runs.append(run(variant, seed, args, pathlib.Path(tmp)))
    summary = summarise(runs)
    for row in summary:
        print(json.dumps(row))
    name = f"cheaper-{datetime.date.today().isoformat()}"
    out = write_json(f"{name}.json", {**stamp(command_line()), "args": vars(args), "runs": runs,
                                      "summary": summary})
    plot(runs, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
