"""grain against clipjax's own executors: the same training samples, the same per-sample function, one run.

    python experiments/bench_grain.py                 # → results/bench_grain-DATE.json and bench_grain-DATE.png
    python experiments/bench_grain.py --quick         # fewer rounds and batches (a rehearsal)

What is compared is the part that grain could replace: the parallel, ordered map from work items to decoded samples
(``clipjax.data.core.OrderedMap`` over ``clipjax.data.workers``' executors). Both sides map the same items, the
first slots of a training stream (``slots.Slot``: slot t, record index from this host's epoch order), with the same
function, the trainer's own ``slots.TrainLoader`` (read the ArrayRecord record, decode the JPEG, RandomResizedCrop
0.9-1.0 bicubic to uint8 [224, 224, 3], pick a caption), and make the same batches of 64 (images stacked, captions
tokenised with CLIP BPE, context 77). Loaders:

    clipjax-threadsN  ``OrderedMap(loader, items, executor=workers.threads(N), window=core.window(64, N))``, batches
                      stacked in this thread (what ``slots.TrainIterator`` does with ``num_threads=N``)
    grain-threadsN    ``grain.MapDataset.source(items).map(loader).to_iter_dataset(ReadOptions(num_threads=N,
                      prefetch_buffer_size=core.window(64, N)))``, batches stacked in this thread as above
    clipjax-procsN    ``workers.processes(N, 1)``: N worker processes (fresh interpreters without JAX) of one thread
                      (``workers=N, num_threads=1``), samples sent back over pipes
    grain-procsN      ``…map(loader).batch(64).to_iter_dataset(ReadOptions(num_threads=1)).mp_prefetch(
                      MultiprocessingOptions(num_workers=N))``: N worker processes of one reading thread, each making
                      whole batches (stacked in the worker, sent through shared memory), captions tokenised here

plus ``floor``: the loader called in a loop on one thread, no executor (the work itself, on one core).

Timing: each round runs the loaders one at a time (the order rotates), so nothing else runs while one is timed:
started afresh from slot 0, its first batch taken (start-up: threads, processes, first reads; every loader's first
batch must equal the others'), ``--drain`` more batches untimed (more than any loader reads ahead, so what is timed is
the rate it makes batches, not a buffer filled beforehand), ``--batches`` timed, then closed; a loader's figure is the
median over rounds of images / wall time. After its timed batches, the resident memory of each process it started is
recorded (``child_process_rss_mb``). A figure is comparable only with the others of the same run: the JSON record has the
date, machine, load average and this machine's fp32 matmul rate (numpy, 1024²).

Data: ``scenes.ensure_scenes(num_train=2000, image_size=256, image_format="jpeg")`` under ``--data-dir``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from bench_common import command_line, stamp, write_json

from clipjax.data import core, scenes, slots, sources, workers
from clipjax.data.tokenizer import get_tokenizer

BATCH, SIZE, CONTEXT, SEED = 64, 224, 77, 0


def matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    """This machine's fp32 matmul rate through numpy's BLAS (best of ``reps``)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best = min(_wall(lambda: a @ a) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def child_rss_mb() -> list[float]:
    """Resident memory (MB) of each process this one started that is still running (its workers)."""
    pids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    out = []
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/status") as f:
                out += [int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS")]
        except OSError:
            pass
    return out


def slot_items(spec: str, count: int) -> tuple[slots.TrainLoader, list[slots.Slot]]:
    """The trainer's per-sample function for ``spec`` and the first ``count`` slots of its training stream."""
    source = sources.open_source(spec, "train")
    orders = slots.RecordOrders({0: len(source)}, seed=SEED, process_index=0, process_count=1)
    loader = slots.TrainLoader(sources.SourceSet([spec], "train", opened=[source]), SIZE, (0.9, 1.0), SEED, 0)
    return loader, [slots.Slot(t, 0, orders(0, t)) for t in range(count)]


class _Batches:
    """Batches of ``BATCH`` from an iterator of (image, caption, label) samples, stacked and tokenised here."""

    def __init__(self, samples, tokenize):
        self.samples, self.tokenize = samples, tokenize

    def __next__(self) -> dict:
        rows = [next(self.samples) for _ in range(BATCH)]
        return {"image": np.stack([r[0] for r in rows]), "text": self.tokenize([r[1] for r in rows], CONTEXT)}


class _Results:
    """The results of an ``OrderedMap`` (it yields (item, result) pairs)."""

    def __init__(self, ordered):
        self.ordered = ordered

    def __next__(self):
        return next(self.ordered)[1]


def clipjax_loader(loader, items, executor, decoders: int, tokenize):
    ordered = core.OrderedMap(loader, items, executor=executor, window=core.window(BATCH, decoders))
    return _Batches(_Results(ordered), tokenize), ordered.close


def grain_threads(loader, items, n: int, tokenize):
    import grain

    ds = grain.MapDataset.source(items).map(loader).to_iter_dataset(
        grain.ReadOptions(num_threads=n, prefetch_buffer_size=core.window(BATCH, n)))
    return _Batches(iter(ds), tokenize), lambda: None


class _GrainBatches:
    def __init__(self, it, tokenize):
        self.it, self.tokenize = it, tokenize

    def __next__(self) -> dict:
        images, captions, _ = next(self.it)
        return {"image": images, "text": self.tokenize(list(captions), CONTEXT)}


def grain_procs(loader, items, n: int, tokenize):
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags when it starts worker processes
        flags.FLAGS.mark_as_parsed()
    ds = (grain.MapDataset.source(items).map(loader).batch(BATCH)
          .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
          .mp_prefetch(grain.MultiprocessingOptions(num_workers=n)))
    it = iter(ds)
    return _GrainBatches(it, tokenize), getattr(it, "close", lambda: None)


class _Floor:
    def __init__(self, loader, items, tokenize):
        self.batches = _Batches(map(loader, items), tokenize)

    def __next__(self):
        return next(self.batches)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 batches")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=16, help="timed batches per loader per round")
    parser.add_argument("--drain", type=int, default=8,
                        help="untimed batches after the first (more than any loader reads ahead)")
    parser.add_argument("--decoders", default="1,2", help="N for the threads and processes loaders")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batches, args.drain = 2, 4, 4
    record = stamp(command_line())
    record["matmul_fp32_gflops_numpy_1024"] = round(matmul_gflops(), 1)
    import grain

    record["versions"]["grain"] = getattr(grain, "__version__", "unknown")
    spec = f"dir:{scenes.ensure_scenes(args.data_dir, num_train=2000, num_test=50, num_heldout=50, image_size=256, image_format='jpeg')}"
    per_round = args.drain + args.batches
    loader, items = slot_items(spec, (per_round + 1) * BATCH)  # every loader starts from slot 0
    tokenize = get_tokenizer()
    ns = [int(n) for n in args.decoders.split(",")]
    loaders = {"floor": lambda: (_Floor(loader, items, tokenize), lambda: None)}
    for n in ns:
        loaders[f"clipjax-threads{n}"] = lambda n=n: clipjax_loader(loader, items, workers.threads(n), n, tokenize)
        loaders[f"grain-threads{n}"] = lambda n=n: grain_threads(loader, items, n, tokenize)
        loaders[f"clipjax-procs{n}"] = lambda n=n: clipjax_loader(loader, items, workers.processes(n, 1), n,
                                                                  tokenize)
        loaders[f"grain-procs{n}"] = lambda n=n: grain_procs(loader, items, n, tokenize)
    names = list(loaders)
    rates: dict[str, list[float]] = {name: [] for name in names}
    check = None
    memory: dict[str, list[float]] = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:  # one loader at a time: nothing else runs while it is timed
            it, close = loaders[name]()
            try:
                first = next(it)  # its start: processes, threads, first reads
                if check is None:
                    check = first
                elif not (np.array_equal(first["image"], check["image"])
                          and np.array_equal(first["text"], check["text"])):
                    raise SystemExit(f"{name}: its first batch differs from the others': not a like-for-like "
                                     f"comparison")
                for _ in range(args.drain):  # its read-ahead emptied: then it runs at the rate it makes batches
                    next(it)
                t = _wall(lambda: [next(it) for _ in range(args.batches)])
                memory[name] = child_rss_mb()
            finally:
                close()
            rates[name].append(args.batches * BATCH / t)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {rates[n][-1]:.0f}" for n in names)
              + f" images/s (load {os.getloadavg()[0]:.2f})", flush=True)
    results = {name: {"images_per_s": round(statistics.median(v), 1), "rounds": [round(x, 1) for x in v],
                      "child_process_rss_mb": [round(m) for m in memory[name]]} for name, v in rates.items()}
    for n in ns:
        for kind in ("threads", "procs"):
            ours, theirs = results[f"clipjax-{kind}{n}"], results[f"grain-{kind}{n}"]
            ours["grain_over_clipjax"] = round(theirs["images_per_s"] / ours["images_per_s"], 3)
    record.update({"benchmark": "bench_grain", "batch": BATCH, "image_size": SIZE, "rounds": args.rounds,
                   "batches_timed": args.batches, "drain": args.drain, "data": "scenes 2000 JPEG 256 px",
                   "load_avg_at_end": list(os.getloadavg()), "results": results})
    day = record["date"][:10]
    suffix = "-quick" if args.quick else ""
    path = write_json(f"bench_grain-{day}{suffix}.json", record)
    for name in names:
        extra = results[name].get("grain_over_clipjax")
        print(f"{name:18s} {results[name]['images_per_s']:8.1f} images/s"
              + (f"   grain/clipjax {extra:.3f}" if extra else ""))
    print(f"wrote {path}")
    _plot(results, names, path.with_suffix(".png"), record)


def _plot(results: dict, names: list[str], path, record: dict) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = [results[n]["images_per_s"] for n in names]
    colors = ["0.6" if n == "floor" else ("tab:blue" if n.startswith("clipjax") else "tab:orange") for n in names]
    ax.barh(names, values, color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("training images / s (median over rounds)")
    ax.set_title(f"grain vs clipjax executors, batch {BATCH}, {SIZE} px JPEG ({record['machine']['nproc']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
