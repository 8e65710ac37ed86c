"""Does the training loop keep the chip busy? The bare jitted step vs `clipjax.train.train`'s loop, same model, batch
and step function, one run:

    bare            `jit_train_step` on one fixed device batch, steps dispatched back to back (the chip's rate)
    loop/synthetic  the trainer's loop (`python -m clipjax.main` runs the same function) on the synthetic source,
                    which makes its batches on the devices: what the loop itself costs
    loop/jpeg       the same loop on real JPEG records (an ingested ArrayRecord dataset, 256 px → S px random
                    resized crops, uint8 to the device): what the input pipeline costs on this host

    python experiments/bench_loop.py                      # ViT-T-demo at 64 px, batch 64 → results/bench_loop-DATE.json
    python experiments/bench_loop.py --model experiments/models/tiny_loop.json --batch 32   # a step of ≤ 20 ms on CPU
    python experiments/bench_loop.py --model ViT-B-32 --batch 256 --dtype bfloat16 --workers 14 --threads 1
                                                          # accelerators (PARTS=loop bash experiments/gpu_run.sh)

Loop rates are the median `samples_per_sec` of the log intervals after the first (which holds the compilation).
Bare and synthetic loop alternate `--pairs` times, bare first and last; the ratio is the median of each loop run over
the mean of the bare runs before and after it (a shared machine's speed drifts between minutes by more than the loop
costs). `cpu_ms`: CPU time of the thread
that dispatches, per step (bare: the dispatch alone; loop: `loop_cpu_time`), which drift does not move much — the
loop's own cost is their difference.
Goal (CPU, synthetic source, a step of ≤ 20 ms): loop/bare ≥ 0.95; the JPEG loop is reported, not held to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from bench_common import ROOT, command_line, median, stamp, write_json


def _config(args, steps: int, data: str):
    import ml_collections

    sys.path.insert(0, str(ROOT))
    from configs.common import base_config

    c = base_config()
    if args.model.endswith(".json"):  # an open_clip model-config file (e.g. a model small enough for a ≤ 20 ms step)
        c.model.name = ""
        c.model.open_clip_config = ml_collections.ConfigDict(json.loads(pathlib.Path(args.model).read_text()))
    else:
        c.model.name = args.model
    c.model.dtype = args.dtype
    c.batch_size, c.total_steps, c.warmup_steps = args.batch, steps, 1
    c.log_every, c.ckpt_every, c.eval_every = args.log_every, 10 ** 9, 10 ** 9
    c.async_checkpoints = True
    c.data.train, c.data.num_threads, c.data.workers = data, args.threads, args.workers
    return c


def bare(args) -> dict:
    """Steps per second of the jitted step alone on a fixed device batch (uint8 images, as the loop sends)."""
    import jax
    import numpy as np

    from clipjax import sharding as shd
    from clipjax.models import CLIP
    from clipjax.train import jit_train_step, make_train_state, make_tx, model_config

    config = _config(args, 10 ** 6, "synthetic")
    cfg = model_config(config)
    mesh = shd.make_mesh({"data": -1})
    state, shardings, tx = make_train_state(CLIP(cfg), lambda p: make_tx(config, p), 0, mesh)
    step = jit_train_step(CLIP(cfg), tx, config, mesh, shardings)
    rng = np.random.default_rng(0)
    s, length, vocab = cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size
    text = rng.integers(1, vocab - 1, (args.batch, length)).astype(np.int32)
    text[:, -1] = vocab - 1
    host = {"image": rng.integers(0, 256, (args.batch, s, s, 3), dtype=np.uint8), "text": text}
    batch = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
    for _ in range(3):  # compile and warm up
        state, m = step(state, batch)
    jax.block_until_ready(m)
    rates, cpu = [], []
    for _ in range(args.rounds):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(args.log_every):
            state, m = step(state, batch)
        jax.block_until_ready((state, m))
        rates.append(args.log_every * args.batch / (time.perf_counter() - t0))
        cpu.append((time.thread_time() - c0) / args.log_every)
    return {"samples_per_sec": median(rates), "step_ms": 1e3 * args.batch / median(rates), "rounds": rates,
            "cpu_ms": 1e3 * median(cpu)}


def loop(args, data: str, workdir: pathlib.Path) -> dict:
    """The trainer's own rate on `data`: median samples/s of its log intervals after the first."""
    from clipjax.train import train

    steps = args.log_every * (args.rounds + 1)
    train(_config(args, steps, data), str(workdir))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "samples_per_sec" in r and r["step"] > args.log_every]
    rates = [r["samples_per_sec"] for r in timed]
    skipped = max((r.get("data_skipped", 0) for r in rows), default=0)
    return {"samples_per_sec": median(rates), "intervals": rates, "data_skipped": skipped,
            "cpu_ms": 1e3 * median([r["loop_cpu_time"] for r in timed])}


def jpeg_dataset(root: pathlib.Path, n: int, side: int = 256) -> str:
    """`n` JPEG photos-like images (smooth gradients + shapes + noise, `side` px) ingested as a clipjax dataset."""
    import numpy as np
    from PIL import Image, ImageDraw

    images = root / "jpeg"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(n):
        base = np.stack([c0 + c1 * xx + c2 * yy for c0, c1, c2 in rng.uniform(0, 120, (3, 3))], -1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(noisy)
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y, r = (int(v) for v in rng.integers(20, side - 20, 3) // (1, 1, 4))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        path = images / f"{i:05d}.jpg"
        img.save(path, quality=90)
        rows.append({"image": str(path), "caption": f"a picture number {i} with three shapes"})
    listing = root / "images.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "dataset"
    subprocess.run([sys.executable, "-m", "clipjax.data.ingest", str(listing), "--output", str(out)], check=True,
                   cwd=ROOT)
    return f"dir:{out}"


def main() -> None:
    from clipjax.cpu import use_huge_pages

    use_huge_pages()  # as the command-line entry points do (re-executes this process; clipjax/cpu.py)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-T-demo")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--log-every", type=int, default=20, help="steps per timed interval")
    p.add_argument("--rounds", type=int, default=5, help="timed intervals per case")
    p.add_argument("--threads", type=int, default=2, help="decode threads of the JPEG loop (per worker process)")
    p.add_argument("--workers", type=int, default=0, help="decode worker processes of the JPEG loop (data.workers)")
    p.add_argument("--images", type=int, default=2000, help="JPEGs in the dataset of the JPEG loop")
    p.add_argument("--pairs", type=int, default=3, help="bare / synthetic-loop measurements, alternating")
    p.add_argument("--no-jpeg", action="store_true")
    p.add_argument("--out", default="", help="results file (default results/bench_loop-DATE.json)")
    args = p.parse_args()
    import jax

    from clipjax import compile_cache

    compile_cache.enable()
    out = {**stamp(command_line()), "devices": [str(d) for d in jax.devices()], "args": vars(args)}
    # bare and loop alternate, bare first and last: a shared or virtual machine's speed drifts by more than the loop's
    # cost between minutes, so each loop run is compared with the mean of the bare runs just before and after it
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        after = bare(args)
        for i in range(args.pairs):
            b = after
            s = loop(args, "synthetic", tmp / f"synthetic-{i}")
            after = bare(args)
            ref = (b["samples_per_sec"] + after["samples_per_sec"]) / 2
            pairs.append({"bare": b, "bare_after": after, "loop_synthetic": s, "vs_bare": s["samples_per_sec"] / ref})
            print(f"pair {i + 1}: bare step {b['samples_per_sec']:.1f} → {after['samples_per_sec']:.1f} samples/s "
                  f"({b['step_ms']:.1f} ms, dispatch {b['cpu_ms']:.2f} ms CPU), loop on synthetic "
                  f"{s['samples_per_sec']:.1f} samples/s ({s['cpu_ms']:.2f} ms CPU a step): "
                  f"{pairs[-1]['vs_bare']:.3f} of bare", flush=True)
        out["pairs"] = pairs
        out["bare"] = {k: median([p["bare"][k] for p in pairs]) for k in ("samples_per_sec", "step_ms", "cpu_ms")}
        out["loop_synthetic"] = {k: median([p["loop_synthetic"][k] for p in pairs])
                                 for k in ("samples_per_sec", "cpu_ms")}
        out["loop_synthetic"]["vs_bare"] = median([p["vs_bare"] for p in pairs])
        print(f"loop, synthetic: {out['loop_synthetic']['vs_bare']:.3f} of bare (median of {len(pairs)} pairs)",
              flush=True)
        if not args.no_jpeg:
            spec = jpeg_dataset(tmp / "data", args.images)
            out["loop_jpeg"] = loop(args, spec, tmp / "jpeg")
            out["loop_jpeg"]["vs_bare"] = out["loop_jpeg"]["samples_per_sec"] / out["bare"]["samples_per_sec"]
            print(f"loop, JPEG ({args.workers} workers, {args.threads} threads): {out['loop_jpeg']['samples_per_sec']:.1f} samples/s "
                  f"({out['loop_jpeg']['vs_bare']:.3f} of bare)", flush=True)
    name = args.out or f"bench_loop-{datetime.date.today().isoformat()}.json"
    path = write_json(name, out) if not os.path.isabs(name) else pathlib.Path(name)
    if os.path.isabs(name):
        path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
