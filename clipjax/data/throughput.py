"""Can this host feed its accelerators? Training batches per second from the real input pipeline.

    python -m clipjax.data.throughput --data SPEC [--split train] --batch-size B --workers N --threads T \\
        --image-size S --seconds SEC

runs ``make_train_iterator`` exactly as training does (read, decode, random resized crop to uint8, tokenise,
batch; ``--workers 0``: ``--threads`` threads in this process; N > 0: N worker processes of ``--threads`` threads)
for SEC seconds after the first batch (worker start-up and first reads are reported apart), printing what it starts
before starting it, then a progress line with the rate every ``--every`` seconds on stderr, and ends with one JSON
line on stdout (``--workers`` is at most 4 per CPU, ``--seconds`` finite)::

    {"images_per_sec": ..., "batches": ..., "workers": N, "threads": T, ...}

Compare ``images_per_sec`` with the samples/s the training step reaches on this host's chips (per host: global
batch / hosts per step time): below it, the step waits on data; try more ``--workers`` (one per core left to the
input pipeline) or ``--threads``. SPEC is any training spec (``dir:PATH``, an ImageFolder, ``scenes``, a TFDS
name). Bad input prints one line ``error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from clipjax import cli
from clipjax.data import core, pipeline
from clipjax.data.tokenizer import get_tokenizer


def measure(batches: Iterator[dict], seconds: float, *, every: float = 2.0,
            progress: Callable[[str], Any] | None = None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Pulls batches for ``seconds`` after the first one; returns the rate, counts and the first batch's wait.

    ``progress(line)`` gets a line with the running rate about every ``every`` seconds.
    """
    start = clock()
    first = next(batches)
    per_batch = len(first["image"])
    t0 = clock()
    startup, n, last_t, last_n = t0 - start, 0, t0, 0
    while True:
        now = clock()
        if now - t0 >= seconds:
            break
        next(batches)
        n += 1
        now = clock()
        if progress is not None and now - last_t >= every:
            progress(f"[{now - t0:6.1f} s] {n} batches, {n * per_batch} images: {n * per_batch / (now - t0):.1f} "
                     f"images/s (last {now - last_t:.1f} s: {(n - last_n) * per_batch / (now - last_t):.1f})")
            last_t, last_n = now, n
    elapsed = clock() - t0
    return {"images_per_sec": round(n * per_batch / elapsed, 1) if elapsed > 0 else 0.0, "batches": n,
            "images": n * per_batch, "seconds": round(elapsed, 3), "startup_s": round(startup, 3),
            "image_bytes_per_batch": int(first["image"].nbytes), "image_dtype": str(first["image"].dtype)}


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m clipjax.data.throughput", description=__doc__)
    parser.add_argument("--data", required=True, help="training data spec (dir:PATH, an ImageFolder, scenes, ...)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, required=True, help="this host's batch size")
    parser.add_argument("--workers", type=int, default=0, help="decode worker processes (0: threads in this process)")
    parser.add_argument("--threads", type=int, default=2, help="decode threads (per worker process when --workers)")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to measure, after the first batch")
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--tokenizer", default=None, help="tokenizer spec as in the config (default: CLIP BPE)")
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.9, 1.0), metavar=("MIN", "MAX"))
    parser.add_argument("--prefetch", type=int, default=2, help="finished batches kept ahead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between progress lines")
    return parser


WORKERS_PER_CPU = 4  # --workers beyond this many per CPU is refused


def max_workers() -> int:
    """The most decode worker processes a run may ask for on this machine."""
    return WORKERS_PER_CPU * (os.cpu_count() or 1)


def _check(args) -> None:
    positive = {"--batch-size": args.batch_size, "--threads": args.threads, "--image-size": args.image_size,
                "--seconds": args.seconds, "--context-length": args.context_length, "--prefetch": args.prefetch,
                "--every": args.every}
    for flag, value in positive.items():
        if not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if not math.isfinite(args.seconds):
        raise ValueError(f"--seconds must be a finite number of seconds, got {args.seconds}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0 (0: threads in this process), got {args.workers}")
    if args.workers > max_workers():
        raise ValueError(f"--workers {args.workers} is more than {max_workers()} ({WORKERS_PER_CPU} per CPU of this "
                         f"machine's {os.cpu_count() or 1}): more decode processes than that only compete for the "
                         f"CPUs (and each takes seconds and memory to start)")
    low, high = args.crop_scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"--crop-scale must be 0 < MIN <= MAX <= 1, got {low} {high}")


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv``, measure, print the JSON line; bad input raises."""
    args = _parser().parse_args(argv)
    _check(args)
    tokenizer = get_tokenizer(args.tokenizer, args.context_length)
    it = pipeline.make_train_iterator(
        args.data, split=args.split, global_batch_size=args.batch_size, image_size=args.image_size,
        context_length=args.context_length, tokenizer=tokenizer, seed=args.seed, process_index=0, process_count=1,
        scale=tuple(args.crop_scale), num_threads=args.threads, prefetch=args.prefetch, workers=args.workers)
    decoders = (f"{args.workers} decode worker process{'es' if args.workers != 1 else ''} of {args.threads} "
                f"thread{'s' if args.threads != 1 else ''}" if args.workers else
                f"{args.threads} decode thread{'s' if args.threads != 1 else ''} in this process")
    print(f"starting {decoders}; measuring for {args.seconds:g} s after the first batch", file=sys.stderr,
          flush=True)
    try:
        result = measure(it, args.seconds, every=args.every, progress=lambda line: print(line, file=sys.stderr,
                                                                                      flush=True))
        result["skipped"] = it.skipped
    finally:
        it.close()
    result.update(workers=args.workers, threads=args.threads, batch_size=args.batch_size,
                  image_size=args.image_size, data=args.data, split=args.split)
    print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: 0, or 2 after one ``error: ...`` line for bad input or data that cannot be read."""
    return cli.run_main(run, argv, user_errors=(ValueError, OSError, core.DataWorkerError, core.TooManyBadRecords))


if __name__ == "__main__":
    sys.exit(main())
