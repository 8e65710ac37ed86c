"""Input pipeline vs open_clip's: training images per second from the same JPEGs, same worker count, one run.

    CLIPJAX_PARITY_PYTHON=/path/to/parity/python python experiments/bench_loader.py [--shared]
                                                        # → results/bench_loader-DATE.json

Loaders (batch 64, 224 px, CLIP BPE captions of context 77, each with W worker processes, W = 1 and 2):

    clipjax    ``make_train_iterator(dir:DATA, workers=W, num_threads=1)``: ArrayRecord records, PIL decode,
               RandomResizedCrop (scale 0.9-1.0, bicubic) to uint8 [64, 224, 224, 3] (normalised later on the
               device), tokenised in the loading process; exact resume, same batches for any W
    clipjax-wds ``make_train_iterator(wds:SHARDS, workers=W, num_threads=1)``: the very tar shards open_clip reads,
               streamed in place (``clipjax.data.wds``: seeded shuffle buffer of 1000 samples, exact resume), the
               same decode, crop, uint8 batches and tokenizer as the ArrayRecord side
    open_clip  ``open_clip_train.data.get_wds_dataset`` (its ``--train-data`` webdataset path, shuffle buffers and
               all) over tar shards of the same JPEGs with ``open_clip.image_transform(224, is_train=True)``
               (RandomResizedCrop 0.9-1.0 bicubic, ToTensor, Normalize → float32 [64, 3, 224, 224]) and
               ``open_clip.get_tokenizer``; a ``WebLoader`` with ``num_workers=W``, as open_clip trains

plus, per round, the decode floor on one core without any loader: clipjax's ``preprocess.train_crop`` and
open_clip's decode + transform over the same 128 JPEGs (``--no-floors`` leaves them out). ``--sides`` picks the
loaders (default all three).

Data, written once under ``--data-dir``: N JPEGs (scenes rendered at 256 px, resized to random sides in 256-400 px,
mild noise so that they compress like photos, quality 90) with their captions, as webdataset tar shards
(``KEY.jpg`` + ``KEY.txt``) for open_clip, and the same shards ingested with ``python -m clipjax.data.ingest`` for
clipjax: byte-identical images on both sides.

Timing: all loaders stay open; each round runs them in turn (the order rotates from round to round), each
taking ``--drain`` batches untimed (what its prefetch buffers hold) and then ``--batches`` timed ones; the figure is
the median over rounds of images / wall time. The open_clip side runs in the parity venv's interpreter
(``bench_common.TorchWorker``) and blocks on its stdin while clipjax measures; idle loaders sit on full buffers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import time

from bench_common import PARITY_PYTHON, ROOT, TorchWorker, command_line, median, serve, stamp, write_json

BATCH, SIZE, CONTEXT = 64, 224, 77
GOAL_VS_OPEN_CLIP, GOAL_SCALING = 1.5, 1.5


# ============================================================================================ data

def _jpegs(n: int, seed: int):
    """(key, JPEG bytes, caption) × n: scenes at 256 px, resized to random 256-400 px sides, noise σ=6, q 90."""
    import numpy as np
    from PIL import Image

    from clipjax.data import scenes_render as sr

    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in sr.COLORS for s in sr.SHAPES]
    for i in range(n):
        color, shape = pairs[i % len(pairs)]
        scene = sr.sample_scene(rng, color, shape, None)
        width, height = (int(v) for v in rng.integers(256, 401, size=2))
        image = sr.render(rng, scene, 256).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, np.float32) + rng.normal(0.0, 6.0, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        yield f"{i:06d}", buf.getvalue(), sr.sample_captions(rng, scene, 1)[0]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def make_data(root: pathlib.Path, n: int, shards: int) -> tuple[pathlib.Path, pathlib.Path]:
    """(folder of tar shards, ingested clipjax dataset directory), written once."""
    tars, dataset = root / "shards", root / "arrayrecord"
    if not (root / "done").exists():
        tars.mkdir(parents=True, exist_ok=True)
        per = -(-n // shards)
        files = [tarfile.open(tars / f"{s:05d}.tar", "w") for s in range(shards)]
        for i, (key, jpeg, caption) in enumerate(_jpegs(n, seed=0)):
            _add(files[i // per], f"{key}.jpg", jpeg)
            _add(files[i // per], f"{key}.txt", caption.encode())
        for f in files:
            f.close()
        subprocess.run([sys.executable, "-m", "clipjax.data.ingest", str(tars), "--output", str(dataset),
                        "--name", "bench_loader", "--quiet"], check=True, cwd=ROOT)
        (root / "done").write_text(json.dumps({"images": n, "shards": shards}))
    return tars, dataset


def _first_jpegs(tar_path, images: int) -> list[bytes]:
    """The first ``images`` JPEGs of a tar shard."""
    jpegs = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.name.endswith(".jpg") and len(jpegs) < images:
                jpegs.append(tar.extractfile(member).read())
    return jpegs


# ============================================================================================ CPU accounting

def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(root: int) -> tuple[float, float, float]:
    """(CPU seconds of process ``root``, of its live descendants, of the whole machine), user + system, so far."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, seconds = {}, {}
    for entry in os.listdir("/proc"):
        fields = _stat(int(entry)) if entry.isdigit() else None
        if fields is not None:
            parent[int(entry)] = int(fields[1])
            seconds[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree = {root}
    for pid in sorted(parent):  # descendants: follow the parent links up to root
        chain, p = [], pid
        while p in parent and p not in tree and p > 1:
            chain.append(p)
            p = parent[p]
        if p in tree:
            tree.update(chain)
    with open("/proc/stat") as f:
        jiffies = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(jiffies[:8]) - jiffies[3] - jiffies[4]) / tick  # all but idle and iowait
    return seconds.get(root, 0.0), sum(seconds[p] for p in tree if p != root), busy


class CpuMeter:
    """Between ``start()`` and ``stop()``: CPU seconds of this process and of its descendants (its loader's
    workers), and the cores the rest of the machine used meanwhile (other people's work on a shared machine)."""

    def start(self) -> None:
        self._t0, self._c0 = time.perf_counter(), cpu_seconds(os.getpid())

    def stop(self) -> dict:
        own, workers, busy = cpu_seconds(os.getpid())
        wall = time.perf_counter() - self._t0
        own, workers, busy = own - self._c0[0], workers - self._c0[1], busy - self._c0[2]
        return {"wall_s": wall, "main_cpu_s": own, "workers_cpu_s": workers,
                "others_cores": max(0.0, busy - own - workers) / wall}


# ============================================================================================ open_clip side

_oc: dict = {}


def _oc_setup(shards: list[str], workers: int, num_samples: int, name: str) -> dict:
    import types

    sys.modules.setdefault("pandas", types.ModuleType("pandas"))  # only open_clip's CSV dataset uses it
    import open_clip
    import torch
    from open_clip_train.data import get_wds_dataset

    torch.set_num_threads(1)
    args = argparse.Namespace(train_data="::".join(shards), train_num_samples=num_samples, dataset_resampled=False,
                              train_data_upsampling_factors=None, seed=0, workers=workers, world_size=1,
                              batch_size=BATCH)
    transform = open_clip.image_transform(SIZE, is_train=True)  # RandomResizedCrop(0.9, 1) bicubic, ToTensor, Norm
    data = get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    _oc[name] = {"loader": data.dataloader, "it": iter(data.dataloader)}
    return {"transform": repr(transform).replace("\n", " ")}


def _oc_next(name: str):
    state = _oc[name]
    try:
        return next(state["it"])
    except StopIteration:  # an epoch of open_clip's with_epoch ended: the next one, as its training loop does
        state["it"] = iter(state["loader"])
        return next(state["it"])


def _oc_run(name: str, drain: int, batches: int) -> dict:
    for _ in range(drain):
        _oc_next(name)
    meter = CpuMeter()
    meter.start()
    for _ in range(batches):
        images, texts = _oc_next(name)
    return {**meter.stop(), "shape": list(images.shape), "dtype": str(images.dtype), "text": list(texts.shape)}


def _oc_floor(shards: list[str], images: int) -> dict:
    """Per-image decode (webdataset's "pilrgb": open + convert RGB) + open_clip's transform on one core, no loader."""
    import open_clip
    from PIL import Image

    transform = open_clip.image_transform(SIZE, is_train=True)
    jpegs = _first_jpegs(shards[0], images)
    meter = CpuMeter()
    meter.start()
    for jpeg in jpegs:
        transform(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    return {**meter.stop(), "images": len(jpegs)}


def _oc_versions() -> dict:
    import open_clip
    import PIL
    import torch
    import torchvision
    import webdataset

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "open_clip": open_clip.__version__,
            "webdataset": getattr(webdataset, "__version__", "unknown"), "pillow": PIL.__version__}


def torch_worker() -> None:
    serve({"setup": _oc_setup, "run": _oc_run, "floor": _oc_floor, "versions": _oc_versions})


# ============================================================================================ clipjax side

def _cj_iterator(spec: str, workers: int):
    from clipjax.data import pipeline
    from clipjax.data.tokenizer import get_tokenizer

    return pipeline.make_train_iterator(spec, global_batch_size=BATCH, image_size=SIZE,
                                        context_length=CONTEXT, tokenizer=get_tokenizer(), seed=0, process_index=0,
                                        process_count=1, workers=workers, num_threads=1)


def _cj_run(it, drain: int, batches: int) -> dict:
    """``drain`` untimed batches, then ``batches`` timed ones (CPU meter around them)."""
    for _ in range(drain):
        next(it)
    meter = CpuMeter()
    meter.start()
    for _ in range(batches):
        batch = next(it)
    assert batch["image"].shape == (BATCH, SIZE, SIZE, 3) and str(batch["image"].dtype) == "uint8"
    return meter.stop()


def _cj_floor(shards: pathlib.Path, images: int) -> dict:
    """Per-image decode + ``train_crop`` on one core, no loader."""
    import numpy as np

    from clipjax.data import preprocess as pp

    jpegs = _first_jpegs(shards / "00000.tar", images)
    meter = CpuMeter()
    meter.start()
    for i, jpeg in enumerate(jpegs):
        pp.train_crop(jpeg, SIZE, np.random.default_rng(i))
    return {**meter.stop(), "images": len(jpegs)}


# ============================================================================================ main

QUIET_CORES = 0.25  # a measurement is "quiet" when the rest of the machine used less than this many cores meanwhile


def _measure(name: str, w: int, args, cj: dict, oc: TorchWorker, tars: pathlib.Path, shards: list[str]) -> dict:
    """One timed measurement of case (name, w): images/s, CPU ms per image, others' cores meanwhile."""
    if name in ("clipjax", "clipjax-wds"):
        run, n = _cj_run(cj[name, w], args.drain, args.batches), args.batches * BATCH
    elif name == "open_clip":
        run, n = oc("run", name=f"w{w}", drain=args.drain, batches=args.batches), args.batches * BATCH
    elif name == "clipjax-floor":
        run = _cj_floor(tars, args.floor_images)
        n = run["images"]
    else:
        run = oc("floor", shards=shards, images=args.floor_images)
        n = run["images"]
    return {"images_per_sec": round(n / run["wall_s"], 1), "main_ms": round(run["main_cpu_s"] / n * 1e3, 3),
            "workers_ms": round(run["workers_cpu_s"] / n * 1e3, 3), "others_cores": round(run["others_cores"], 2)}


def _ratio(runs: dict, a: str, b: str) -> dict:
    """a/b per round (measured seconds apart): the median over all rounds and over rounds where both were quiet."""
    pairs = list(zip(runs[a], runs[b]))
    every = [x["images_per_sec"] / y["images_per_sec"] for x, y in pairs]
    quiet = [r for r, (x, y) in zip(every, pairs) if max(x["others_cores"], y["others_cores"]) < QUIET_CORES]
    return {"median_all_rounds": round(median(every), 3), "median_quiet_rounds": round(median(quiet), 3)
            if quiet else None, "quiet_rounds": len(quiet)}


def _summary(runs: dict) -> dict:
    out = {}
    for case, ms in runs.items():
        quiet = [m["images_per_sec"] for m in ms if m["others_cores"] < QUIET_CORES]
        out[case] = {"median": round(median([m["images_per_sec"] for m in ms]), 1),
                     "median_quiet": round(median(quiet), 1) if quiet else None, "quiet_rounds": len(quiet),
                     "main_cpu_ms_per_image": round(median([m["main_ms"] for m in ms]), 3),
                     "workers_cpu_ms_per_image": round(median([m["workers_ms"] for m in ms]), 3)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.path.expanduser("~/.cache/clipjax/bench_loader"))
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per loader per round")
    parser.add_argument("--drain", type=int, default=8,
                        help="untimed batches before the timed ones (more than any loader keeps buffered)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds of pause before each case, for the previous loader to refill and go idle")
    parser.add_argument("--floor-images", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sides", default="clipjax,clipjax-wds,open_clip",
                        help="loaders to compare, of clipjax (ArrayRecord), clipjax-wds (the tar shards), open_clip")
    parser.add_argument("--no-floors", action="store_true", help="leave out the one-core decode floors")
    parser.add_argument("--shared", action="store_true", help="record that other work ran on the machine")
    parser.add_argument("--out", default=None, help="JSON path (default results/bench_loader-DATE.json)")
    args = parser.parse_args(argv)

    root = pathlib.Path(args.data_dir) / f"n{args.images}-s{args.shards}"
    tars, dataset = make_data(root, args.images, args.shards)
    shards = [str(p) for p in sorted(tars.glob("*.tar"))]
    record = stamp(command_line())
    record["machine"]["shared_with_other_work"] = args.shared
    oc = TorchWorker(python=PARITY_PYTHON, script=str(pathlib.Path(__file__).resolve()), args=["--torch-worker"])
    cases, cj = [], {}
    sides = args.sides.split(",")
    specs = {"clipjax": f"dir:{dataset}", "clipjax-wds": f"wds:{tars}"}
    try:
        record["versions"].update(oc("versions"))
        for w in args.workers:
            for side in sides:
                if side in specs:
                    cj[side, w] = _cj_iterator(specs[side], w)
                elif side == "open_clip":
                    record.setdefault("open_clip_transform", oc("setup", shards=shards, workers=w,
                                                                num_samples=10 ** 7, name=f"w{w}")["transform"])
                else:
                    parser.error(f"--sides: unknown loader {side!r}")
                cases.append((side, w))
        if not args.no_floors:
            cases += [("clipjax-floor", 0), ("open_clip-floor", 0)]
        label = {case: case[0] + (f"-w{case[1]}" if case[1] else "") for case in cases}
        runs = {label[case]: [] for case in cases}
        for r in range(args.rounds):
            done = {}
            for case in cases[r % len(cases):] + cases[:r % len(cases)]:  # the order rotates
                time.sleep(args.settle)
                done[case] = _measure(*case, args, cj, oc, tars, shards)
            for case in cases:
                runs[label[case]].append(done[case])
            line = "  ".join(f"{label[c]} {done[c]['images_per_sec']:6.0f} ({done[c]['others_cores']:.1f})"
                             for c in cases)
            print(f"round {r + 1}/{args.rounds}: {line}  images/s (others' cores)", flush=True)
    finally:
        for it in cj.values():
            it.close()
        oc.close()
    ratios = {}
    for a, b in (("clipjax", "open_clip"), ("clipjax-wds", "open_clip"), ("clipjax-wds", "clipjax")):
        if a in sides and b in sides:
            ratios.update({f"{a}/{b} w{w}": _ratio(runs, f"{a}-w{w}", f"{b}-w{w}") for w in args.workers})
    if not args.no_floors:
        ratios["clipjax floor/open_clip floor"] = _ratio(runs, "clipjax-floor", "open_clip-floor")
    if 1 in args.workers and 2 in args.workers:
        for side in sides:
            ratios[f"{side} w2/w1"] = _ratio(runs, f"{side}-w2", f"{side}-w1")
    if 1 in args.workers and 2 in args.workers and {"clipjax", "open_clip"} <= set(sides):
        goals = {}
        for goal, key, target in ((f"clipjax >= {GOAL_VS_OPEN_CLIP}x open_clip, 2 workers", "clipjax/open_clip w2",
                                   GOAL_VS_OPEN_CLIP),
                                  (f"clipjax 2 workers >= {GOAL_SCALING}x 1 worker", "clipjax w2/w1", GOAL_SCALING)):
            quiet = ratios[key]["median_quiet_rounds"]
            goals[goal] = {"all_rounds": ratios[key]["median_all_rounds"] >= target,
                           "quiet_rounds": None if quiet is None else quiet >= target}
        record["goals"] = goals
    record["machine"]["load_avg_at_end"] = list(os.getloadavg())
    record.update(benchmark="bench_loader", sides=sides, batch=BATCH, image_size=SIZE, context_length=CONTEXT,
                  data={"images": args.images, "shards": args.shards, "jpeg": "scenes 256 px resized to 256-400 px "
                        "sides, noise sigma 6, quality 90", "bytes": sum(os.path.getsize(s) for s in shards)},
                  rounds=args.rounds, timed_batches=args.batches, drained_batches=args.drain, settle_s=args.settle,
                  quiet_below_cores=QUIET_CORES, images_per_sec=_summary(runs), ratios=ratios, runs=runs)
    if args.out:
        path = pathlib.Path(args.out)
        path.write_text(json.dumps(record, indent=1) + "\n")
    else:
        import datetime

        path = write_json(f"bench_loader-{datetime.date.today().isoformat()}.json", record)
    print(json.dumps({"images_per_sec": record["images_per_sec"], "ratios": ratios, "goals": record.get("goals")},
                     indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    if "--torch-worker" in sys.argv:
        torch_worker()
    else:
        main()
