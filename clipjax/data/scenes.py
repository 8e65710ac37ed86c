"""The embedded ``scenes`` dataset: procedural captioned scenes, generated locally on first use and cached.

Classes are the 48 (colour, shape) pairs of ``scenes_render`` (8 colours × 6 shapes), named ``"red circle"``;
the integer label is ``colour_index * 6 + shape_index`` (the TFDS ``ClassLabel`` of every split).
``HELDOUT`` (10 pairs, ~21 %) never appear together in ``train`` — neither as the main object nor as a
distractor nor in any caption — while each colour still appears there with ≥ 4 shapes and each shape with
≥ 6 colours. Splits:

    train    the 38 seen pairs, 1–3 objects, sometimes a distractor; 4 captions per image
    test     the seen pairs, no distractor (zero-shot / retrieval on seen combinations)
    heldout  the 10 held-out pairs, no distractor (zero-shot on unseen combinations)

Main-object pairs are balanced (example ``i`` of a split shows pair ``i mod #pairs``); all other
attributes are drawn from ``np.random.default_rng([seed, split_id, i])``, so the dataset is a pure function
of its parameters. ``metadata.json`` lists, per split, the class ids it uses and their names
(``split_classes`` / ``split_classnames``): zero-shot on ``heldout`` chooses among its 10 classes.

Learnable: a ViT of 4 layers × width 128 (patch 8, 64 px) with a 3-layer width-128 text tower, trained from
scratch with the softmax CLIP loss for 700 steps of batch 128 (AdamW 1e-3, ~3 epochs of the default train
split), reached 0.875 zero-shot top-1 on ``heldout`` (10 unseen pairs; 4 templates) and 0.68 on ``test``
(38-way).

Storage: a TFDS data directory of ArrayRecord shards (see ``records``), the image bytes stored exactly as
encoded (PNG by default, or JPEG). Default location ``$CLIPJAX_DATA_DIR``, else ``$XDG_CACHE_HOME/clipjax/datasets``
or ``~/.cache/clipjax/datasets``, then ``clipjax_scenes/<variant>/<version>``.

Why shards are written by ``records.ShardWriter`` and not by a ``tfds.core.GeneratorBasedBuilder``:
both work without TensorFlow (tensorflow-datasets 4.9.10 serializes ``tf.train.Example`` with its own
protos; checked with ``"tensorflow" not in sys.modules``). The builder path serializes and runs its shuffle
pass in the parent process after the pool returns image bytes; writing one shard per worker task
parallelises serialization too, makes a killed build resumable shard by shard, and is the same code
``ingest`` uses. Measured on the shared 2-core machine (load ~4-6, so ~2-3x pessimistic): rendering +
PNG encoding 1.4 ms/image, ``serialize_example`` 0.19 ms/record, the builder's write + shuffle pass 0.26
ms/record in one process; the default 32 000-image build took 72 s with 2 worker processes. Either way
the output reads back with ``tfds.builder_from_directory(DIR).as_data_source(split)`` (~50 µs/record).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import json
import multiprocessing
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from clipjax import cache_dir, cli
from clipjax.data import records
from clipjax.data import scenes_render as sr

NAME = "clipjax_scenes"
VERSION = "1.0.0"
COLORS = tuple(sr.COLORS)
SHAPES = sr.SHAPES
CLASSNAMES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
HELDOUT = (
    ("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "star"), ("purple", "cross"),
    ("orange", "diamond"), ("white", "circle"), ("black", "square"), ("blue", "cross"), ("orange", "star"),
)
HELDOUT_IDS = tuple(sorted(COLORS.index(c) * len(SHAPES) + SHAPES.index(s) for c, s in HELDOUT))
SEEN_IDS = tuple(i for i in range(len(CLASSNAMES)) if i not in HELDOUT_IDS)
SPLIT_IDS = {"train": 0, "test": 1, "heldout": 2}
META_FIELDS = {"color": "text", "shape": "text", "size": "text", "position": "text", "count": "int",
               "background": "text", "distractor": "text"}
DEFAULTS = dict(num_train=30_000, num_test=1_000, num_heldout=1_000, image_size=64, image_format="png", seed=0)


def label_of(color: str, shape: str) -> int:
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


def split_class_ids(split: str) -> tuple[int, ...]:
    return HELDOUT_IDS if split == "heldout" else SEEN_IDS


def make_example(split: str, index: int, *, seed: int, image_size: int, image_format: str) -> dict:
    """Example ``index`` of ``split``: a dict in the ``records.image_text_features`` layout."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    ids = split_class_ids(split)
    label = ids[index % len(ids)]
    color, shape = CLASSNAMES[label].split(" ")
    distractors = [tuple(CLASSNAMES[i].split(" ")) for i in SEEN_IDS] if split == "train" else None
    scene = sr.sample_scene(rng, color, shape, distractors)
    image = sr.render(rng, scene, image_size)
    return {
        "image": sr.encode(image, image_format),
        "captions": sr.sample_captions(rng, scene),
        "key": f"{split}-{index:07d}",
        "label": label,
        "meta": {
            "color": color, "shape": shape, "size": scene.size, "position": scene.position,
            "count": scene.count, "background": scene.background,
            "distractor": " ".join(scene.distractor) if scene.distractor else "",
        },
    }


def features():
    return records.image_text_features(CLASSNAMES, META_FIELDS)


def _write_shard(path: str, split: str, start: int, stop: int, params: dict) -> int:
    feats = features()
    with records.ShardWriter(path, feats) as writer:
        for i in range(start, stop):
            writer.write(make_example(split, i, seed=params["seed"], image_size=params["image_size"],
                                      image_format=params["image_format"]))
    return stop - start


def _plan(sizes: dict[str, int], shard_size: int) -> Iterator[tuple[str, int, int, int, int]]:
    """(split, shard index, shard count, start, stop) for every shard."""
    for split, n in sizes.items():
        count = max(1, -(-n // shard_size))
        bounds = np.linspace(0, n, count + 1).astype(int)
        for k in range(count):
            yield split, k, count, int(bounds[k]), int(bounds[k + 1])


def build_scenes(
    directory: str | os.PathLike,
    *,
    num_train: int = DEFAULTS["num_train"],
    num_test: int = DEFAULTS["num_test"],
    num_heldout: int = DEFAULTS["num_heldout"],
    image_size: int = DEFAULTS["image_size"],
    image_format: str = DEFAULTS["image_format"],
    seed: int = DEFAULTS["seed"],
    shard_size: int = 2_000,
    workers: int | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Generates the dataset into ``directory`` (a TFDS data dir) and returns it.

    Shards already present (from an interrupted build with the same parameters) are kept.
    ``workers``: processes (default: CPU count, or none for < 2000 images; 0 renders in this process).
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = dict(num_train=num_train, num_test=num_test, num_heldout=num_heldout, image_size=image_size,
                  image_format=image_format, seed=seed, version=VERSION)
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"unknown image format {image_format!r} (expected 'png' or 'jpeg')")
    sizes = {"train": num_train, "test": num_test, "heldout": num_heldout}
    if min(sizes.values()) < 1:
        raise ValueError(f"every split needs at least one example, got {sizes}")
    plan = list(_plan(sizes, shard_size))
    lengths: dict[str, list[int]] = {s: [0] * c for s, _, c, _, _ in plan}
    todo = []
    for split, k, count, start, stop in plan:
        lengths[split][k] = stop - start
        path = directory / records.shard_filename(NAME, split, k, count)
        if not path.exists():
            todo.append((os.fspath(path), split, start, stop, params))
    if workers is None:  # a pool only pays off past a few seconds of rendering
        small = sum(t[3] - t[2] for t in todo) < 2_000
        workers = 0 if small else min(os.cpu_count() or 1, len(todo))
    bar = tqdm(total=sum(sizes.values()), desc=f"building {NAME}", unit="img", disable=not progress)
    bar.update(sum(sizes.values()) - sum(t[3] - t[2] for t in todo))
    if workers == 0:
        for task in todo:
            bar.update(_write_shard(*task))
    else:
        ctx = multiprocessing.get_context("spawn")  # the parent may run JAX threads: never fork it
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for done in cf.as_completed([pool.submit(_write_shard, *t) for t in todo]):
                bar.update(done.result())
    bar.close()
    records.write_metadata(
        directory, NAME, features(), lengths,
        description="Procedural captioned scenes (colour × shape, held-out combinations) built by clipjax.",
        metadata={
            "builder": params,
            "heldout": [list(p) for p in HELDOUT],
            "split_classes": {s: list(split_class_ids(s)) for s in sizes},
            "split_classnames": {s: [CLASSNAMES[i] for i in split_class_ids(s)] for s in sizes},
        },
        version=VERSION,
    )
    return directory


def default_data_dir() -> pathlib.Path:
    """``$CLIPJAX_DATA_DIR``, else ``datasets`` in clipjax's cache (``$XDG_CACHE_HOME/clipjax/datasets`` or
    ``~/.cache/clipjax/datasets``)."""
    env = os.environ.get("CLIPJAX_DATA_DIR")
    return pathlib.Path(env).expanduser() if env else cache_dir.path("datasets")


def variant_name(**params) -> str:
    p = {**DEFAULTS, **params}
    return (f"{p['image_size']}px-{p['image_format']}-seed{p['seed']}"
            f"-{p['num_train']}-{p['num_test']}-{p['num_heldout']}")


@contextlib.contextmanager
def _lock(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_scenes(data_dir: str | os.PathLike | None = None, *, progress: bool = True, **params) -> pathlib.Path:
    """Path of the scenes dataset with ``params`` (see ``DEFAULTS``), building it on first use.

    Concurrent callers on one machine wait on a file lock; a build goes to ``<path>.incomplete`` and is
    renamed when complete, so a finished directory is never partial.
    """
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown scenes parameters {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    root = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    final = root / NAME / variant_name(**params) / VERSION
    if records.is_dataset_dir(final):
        return final
    with _lock(final.parent / ".lock"):
        if not records.is_dataset_dir(final):
            partial = final.with_name(final.name + ".incomplete")
            # A fresh interpreter whose __main__ is this module: the spawn pool inside it never re-runs the
            # caller's script (which may lack a ``__main__`` guard).
            cmd = [sys.executable, "-m", "clipjax.data.scenes", os.fspath(partial),
                   "--params", json.dumps({**DEFAULTS, **params})] + ([] if progress else ["--quiet"])
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=None if progress else subprocess.PIPE)
            if proc.returncode != 0:
                err = (proc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["see stderr"]
                raise RuntimeError(f"building {NAME} into {partial} failed: {err[0]}")
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
    return final


def _run(argv: list[str] | None) -> None:
    parser = cli.ArgumentParser(prog="python -m clipjax.data.scenes",
                                description="Build the clipjax scenes dataset into DIR.")
    parser.add_argument("directory")
    parser.add_argument("--params", default="{}",
                        help=f"JSON object of build_scenes keyword arguments: {', '.join(sorted(DEFAULTS))}")
    parser.add_argument("--workers", type=cli.integer(1), default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        given = json.loads(args.params)
    except json.JSONDecodeError as e:
        raise ValueError(f"--params: not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(given, dict) or set(given) - set(DEFAULTS):
        raise ValueError(f"--params {args.params}: a JSON object with keys among {sorted(DEFAULTS)}")
    print(build_scenes(args.directory, workers=args.workers, progress=not args.quiet, **{**DEFAULTS, **given}))


def main(argv: list[str] | None = None) -> int:
    """The command line: 0, or 2 after one `error: ...` line for bad input."""
    return cli.run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
