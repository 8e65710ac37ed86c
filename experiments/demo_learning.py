"""Does the CPU demo learn? Train `configs/demo.py`, then measure zero-shot on unseen colour–shape pairs.

    python experiments/demo_learning.py --train                    # train into runs/demo, then evaluate and plot
    python experiments/demo_learning.py --workdir runs/demo         # evaluate and plot an existing run
    python experiments/demo_learning.py --train --tag mine -- --config.data.train=dir:data/mine  # extra overrides

Writes experiments/results/demo_curves.png (training loss and the periodic held-out zero-shot top-1, from the run's
metrics.jsonl) and experiments/results/demo_results.json: wall and CPU time of the training command, steps/s,
and the final checkpoint's zero-shot top-1 on the whole held-out split (10 pairs never seen together in training,
chance 0.10) with the 8 `scenes` templates ensembled and with the single template "a photo of a {}.", on the seen
pairs' test split (38 classes, chance 1/38), and image–text retrieval on the test split.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def train(workdir: pathlib.Path, config: str, overrides: list[str]) -> dict:
    """Runs the training command; returns its wall time, CPU time and the machine load around it."""
    cmd = [sys.executable, "-m", "clipjax.main", f"--config={config}", f"--workdir={workdir}", *overrides]
    print("$", " ".join(cmd), flush=True)
    load_before = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": " ".join(["python", "-m", "clipjax.main", f"--config={config}", f"--workdir={workdir}",
                                 *overrides]),
            "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
            "loadavg_1min_before": load_before[0], "loadavg_1min_after": os.getloadavg()[0]}


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(rows: list[dict], out: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "zeroshot/heldout/top1" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], color="tab:blue")
    ax1.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    ax1.grid(alpha=0.3)
    ax2.plot([r["step"] for r in evals], [r["zeroshot/heldout/top1"] for r in evals], "o-", color="tab:green",
             label="held-out pairs (10 classes)")
    seen = [r for r in rows if "zeroshot/seen/top1" in r]
    if seen:
        ax2.plot([r["step"] for r in seen], [r["zeroshot/seen/top1"] for r in seen], "s--", color="tab:purple",
                 label="seen pairs, test images (38 classes)")
    ax2.axhline(0.1, color="tab:green", ls=":", alpha=0.6, label="chance, held-out (0.10)")
    ax2.axhline(1 / 38, color="tab:purple", ls=":", alpha=0.6, label="chance, seen (0.026)")
    ax2.set(xlabel="step", ylabel="zero-shot accuracy", ylim=(0, 1.02), title="zero-shot top-1")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print("wrote", out)


def final_evals(workdir: pathlib.Path, data: str) -> dict:
    """Zero-shot (ensembled and single template) and retrieval of the run's last checkpoint."""
    from clipjax.evaluate.retrieval import RetrievalEvaluator
    from clipjax.evaluate.zeroshot import ZeroShotEvaluator
    from clipjax.interop.load import load

    model = load(workdir)
    out = {"checkpoint": model.source}
    for split in ("heldout", "test"):
        for templates in ("scenes", "single"):
            ev = ZeroShotEvaluator("final", model.config, data=data, split=split, templates=templates,
                                   batch_size=250, cache_images=False)
            m = ev.evaluate(model.variables)
            out[f"zeroshot_{split}_{templates}"] = {k: m[k] for k in ("acc1", "acc5", "mean_per_class_recall",
                                                                      "num_examples", "num_classes",
                                                                      "num_templates")}
            if split == "heldout" and templates == "scenes":
                out["heldout_per_class_recall"] = m["per_class_recall"]
    ev = RetrievalEvaluator("final", model.config, data=data, split="test", batch_size=250, cache_images=False)
    out["retrieval_test"] = ev.evaluate(model.variables)
    return out


# ============================================================================================ "your own data"

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INKS = {"red": (200, 30, 30), "green": (20, 140, 40), "blue": (30, 60, 210), "orange": (235, 120, 10),
        "purple": (130, 40, 170), "black": (20, 20, 20)}
INK_NAMES = tuple(INKS)


def _heldout_ink(digit: int) -> str:
    """Each digit has one ink never seen with it in training (its held-out combination)."""
    return INK_NAMES[digit % len(INK_NAMES)]


def _digit_image(rng, digit: int, ink: str):
    from PIL import Image, ImageDraw, ImageFont

    side = 64
    base = rng.integers(170, 245)
    bg = np.clip(base + rng.integers(-25, 26, 3), 0, 255)
    img = Image.new("RGB", (side, side), tuple(int(v) for v in bg))
    size = int(rng.integers(26, 48))
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    x = rng.integers(-left, max(-left + 1, side - right))
    y = rng.integers(-top, max(-top + 1, side - bottom))
    draw.text((int(x), int(y)), str(digit), font=font, fill=INKS[ink])
    return img, ("large" if size >= 38 else "small")


def _digit_captions(rng, digit: int, ink: str, size: str) -> list[str]:
    w = DIGITS[digit]
    forms = [f"a {ink} {w}", f"the number {w} in {ink}", f"a {size} {ink} {w}", f"the digit {w}",
             f"a picture of the number {w}", f"{ink} ink, the number {w}"]
    return [forms[i] for i in rng.choice(len(forms), size=2, replace=False)]


def make_own_data(root: pathlib.Path, num_train: int = 6000, num_heldout: int = 300, seed: int = 0) -> None:
    """A stand-in for a user's own captioned images: digits in six inks, captions in words.

    root/train/*.png + root/train.jsonl (image, captions) for `python -m clipjax.data.ingest`; root/heldout/<word>/
    an ImageFolder of the (digit, ink) combinations never seen in training, for zero-shot; root/templates.txt.
    """
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    with open(root / "train.jsonl", "w") as f:
        for i in range(num_train):
            digit = int(rng.integers(10))
            ink = str(rng.choice([n for n in INK_NAMES if n != _heldout_ink(digit)]))
            img, size = _digit_image(rng, digit, ink)
            img.save(root / "train" / f"{i:06d}.png")
            f.write(json.dumps({"image": f"train/{i:06d}.png",
                                "caption": _digit_captions(rng, digit, ink, size)}) + "\n")
    for i in range(num_heldout):
        digit = i % 10
        folder = root / "heldout" / DIGITS[digit]
        folder.mkdir(parents=True, exist_ok=True)
        _digit_image(rng, digit, _heldout_ink(digit))[0].save(folder / f"{i:05d}.png")
    (root / "templates.txt").write_text("the number {}\na picture of the number {}\nthe digit {}\n")
    print(f"wrote {num_train} captioned training images and {num_heldout} held-out images under {root}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=str(ROOT / "runs" / "demo"))
    p.add_argument("--config", default="configs/demo.py")
    p.add_argument("--train", action="store_true", help="run the training command first (workdir must be new)")
    p.add_argument("--data", default="scenes", help="dataset of the final evaluations")
    p.add_argument("--tag", default="demo", help="output names: results/<tag>_curves.png, <tag>_results.json")
    p.add_argument("--make-own-data", default=None, metavar="DIR",
                   help="write the 'your own data' example (digits with captions) into DIR and exit")
    p.add_argument("overrides", nargs="*", help="extra --config.key=value overrides (after --)")
    args = p.parse_args()
    if args.make_own_data:
        make_own_data(pathlib.Path(args.make_own_data))
        return
    workdir = pathlib.Path(args.workdir)
    record: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()}
    import jax
    import flax

    record.update(jax=jax.__version__, flax=flax.__version__)
    try:
        record["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True).stdout.strip()
    except OSError:
        pass
    if args.train:
        if workdir.exists():
            raise SystemExit(f"{workdir} exists: remove it or drop --train (training would resume, not start)")
        record["train"] = train(workdir, args.config, args.overrides)
    rows = read_metrics(workdir)
    times = [r["step_time"] for r in rows if "step_time" in r][1:]  # the first includes compilation
    steps = max(r["step"] for r in rows)
    record["steps"] = steps
    record["median_steps_per_sec"] = round(1 / statistics.median(times), 3) if times else None
    record["curve"] = [{k: r[k] for k in ("step", "zeroshot/heldout/top1", "zeroshot/seen/top1") if k in r}
                       for r in rows if "zeroshot/heldout/top1" in r]
    title = f"clipjax demo ({args.config}), {steps} steps, {record.get('date', '')[:10]}"
    plot(rows, RESULTS / f"{args.tag}_curves.png", title)
    if args.data:
        record["final"] = final_evals(workdir, args.data)
    out = RESULTS / f"{args.tag}_results.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
