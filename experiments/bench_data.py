"""Throughput of the clipjax training input pipeline (images/s on this host).

    python experiments/bench_data.py                      # JPEG scenes at 256 px → 224, batch 64; demo 64 px
    python experiments/bench_data.py --quick              # fewer batches

Cases (each after one warm-up batch; images/s = batches × batch / wall time, best of --repeats runs):
    clipjax-threadsN   ``make_train_iterator`` with N decode threads (the default is 2)

grain against the same executors, like for like: ``bench_grain.py``.

Data: the scenes dataset built once into ``--data-dir`` (default ``$CLIPJAX_DATA_DIR`` or
``~/.cache/clipjax/datasets``): 2 000 JPEG images of 256 px for the 224-px cases, the default 64-px PNG
dataset for the demo case. A JSON record (date, host, CPU count, load average, versions, command) is written
to ``experiments/results/bench_data-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

from clipjax.data import pipeline, scenes
from clipjax.data.tokenizer import get_tokenizer

CONTEXT = 77


def _time(it, batches: int) -> float:
    next(it)  # warm-up: thread/process start, first reads
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return time.perf_counter() - start


def bench_clipjax(spec: str, image_size: int, batch: int, batches: int, threads: int) -> float:
    it = pipeline.make_train_iterator(spec, global_batch_size=batch, image_size=image_size, context_length=CONTEXT,
                                      tokenizer=get_tokenizer(), seed=0, process_index=0, process_count=1,
                                      num_threads=threads)
    seconds = _time(it, batches)
    it.close()
    return batches * batch / seconds


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=pathlib.Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="runs per case; the best is reported")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    batches = 5 if args.quick else 15
    jpeg = f"dir:{scenes.ensure_scenes(args.data_dir, num_train=2000, num_test=50, num_heldout=50, image_size=256, image_format='jpeg')}"
    demo = f"dir:{scenes.ensure_scenes(args.data_dir)}"
    cases = []
    for name, spec, size in (("jpeg256->224", jpeg, 224), ("demo-png64", demo, 64)):
        for threads in (1, 2, 4):
            cases.append((name, f"clipjax-threads{threads}", lambda s=spec, z=size, t=threads: bench_clipjax(
                s, z, 64, batches, t)))
    results = []
    for data, loader, run in cases:
        rates = [run() for _ in range(args.repeats)]
        results.append({"data": data, "loader": loader, "batch": 64, "images_per_s": round(max(rates), 1),
                        "all_runs": [round(r, 1) for r in rates]})
        print(f"{data:14s} {loader:18s} {max(rates):8.1f} images/s (best of {args.repeats})", flush=True)
    import jax

    record = {
        "benchmark": "bench_data",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(), "python": platform.python_version(), "numpy": np.__version__,
        "jax": jax.__version__,
        "pillow": __import__("PIL").__version__, "command": " ".join([sys.executable] + sys.argv),
        "commit": _commit(), "batches_timed": batches, "results": results,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_data-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
