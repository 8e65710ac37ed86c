"""Evaluation data: what a `--data` spec names, opened as in-order batches with class names and captions.

Specs:

    "scenes"            the embedded dataset (zero-shot defaults to its ``heldout`` split of unseen pairs)
    "dir:PATH"          a dataset directory written by ``clipjax.data.ingest`` (or any TFDS data directory)
    PATH                the same, when PATH (or one folder below it) holds ``dataset_info.json``; otherwise an
                        ImageFolder (one subfolder per class, class name = folder name with ``_`` read as a
                        space), read directly: no ingest needed
    NAME                a prepared TFDS dataset

Every source yields the batches of ``clipjax.data.pipeline.EvalDataset``: {"image" f32 [B,S,S,3], "label" i32
[B], "mask" bool [B], "captions" (B lists of str), "key" (B str)}; the last batch is padded and masked.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np

from clipjax.data import preprocess as pp

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_TEMPLATE = "a photo of a {}."
SCENES = "scenes"
log = logging.getLogger(__name__)
# Shipped class names / templates for datasets known by their TFDS name (see templates.py).
KNOWN = {"imagenet2012": "imagenet", "imagenet_v2": "imagenet", "imagenet_a": "imagenet", "imagenet_r": "imagenet",
         "imagenet_sketch": "imagenet", "cifar10": "cifar10", "cifar100": "cifar100"}


def _has_dataset_info(path: pathlib.Path) -> bool:
    return (path / "dataset_info.json").is_file() or any(path.glob("*/dataset_info.json")) or any(
        path.glob("*/*/dataset_info.json"))


def is_image_folder(spec: str | os.PathLike) -> bool:
    """A directory of class subfolders that is not a dataset directory (and not a "scenes"/"dir:"/"tfds:" spec)."""
    if str(spec) == SCENES or str(spec).startswith(("dir:", "tfds:")):
        return False
    p = pathlib.Path(spec).expanduser()
    return p.is_dir() and not _has_dataset_info(p) and any(q.is_dir() for q in p.iterdir())


def pipeline_spec(spec: str) -> str:
    """The clipjax.data spec of a CLI `--data` value that is not an ImageFolder."""
    if spec == SCENES or spec.startswith(("dir:", "tfds:")):
        return spec
    p = pathlib.Path(spec).expanduser()
    if p.is_dir():
        return f"dir:{p}"
    return spec


def known_name(spec: str) -> str | None:
    """The shipped class-name/template set that fits `spec` (e.g. "imagenet" for TFDS "imagenet2012")."""
    base = spec.split(":")[-1].split("/")[0]
    return KNOWN.get(base)


class ImageFolder:
    """An ImageFolder read in place, in `EvalDataset`'s batch format (class index = sorted folder order)."""

    def __init__(self, root: str | os.PathLike, *, image_size: int, batch_size: int,
                 classnames: Sequence[str] | None = None, max_examples: int | None = None, num_threads: int = 2):
        self.root = pathlib.Path(root).expanduser()
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"{self.root}: no class subfolders (expected ROOT/CLASS/IMAGE files)")
        if classnames is not None and len(classnames) != len(folders):
            raise ValueError(f"{len(classnames)} class names given for {len(folders)} class folders in {self.root}")
        self.classnames = list(classnames) if classnames is not None else [f.replace("_", " ") for f in folders]
        items = []
        for label, folder in enumerate(folders):
            for path in sorted((self.root / folder).rglob("*")):
                if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTS:
                    items.append((path, label))
        if not items:
            raise ValueError(f"{self.root}: no images with extensions {IMAGE_EXTS} in the class folders")
        if max_examples is not None and max_examples < len(items):  # evenly spaced: every class stays represented
            items = [items[i] for i in np.linspace(0, len(items) - 1, max_examples).round().astype(int)]
        self.items, self.image_size, self.batch_size = items, image_size, batch_size
        self.num_threads = max(1, num_threads)
        self.num_examples = len(items)
        self.skipped = 0

    def _load(self, item: tuple[pathlib.Path, int]):
        path, label = item
        try:
            image = pp.preprocess(path, self.image_size)  # [S, S, 3]
        except Exception as e:  # an unreadable image is skipped, not fatal
            return f"{path}: {e}"
        caption = CAPTION_TEMPLATE.format(self.classnames[label])
        return image, label, [caption], path.relative_to(self.root).as_posix()

    def __iter__(self) -> Iterator[dict]:
        self.skipped = 0
        b, s = self.batch_size, self.image_size
        with cf.ThreadPoolExecutor(self.num_threads, thread_name_prefix="clipjax-imagefolder") as pool:
            for start in range(0, len(self.items), b):
                rows = []
                for result in pool.map(self._load, self.items[start:start + b]):
                    if isinstance(result, str):
                        self.skipped += 1
                        log.warning("skipping %s", result)
                    else:
                        rows.append(result)
                n = len(rows)
                image = np.zeros((b, s, s, 3), np.float32)  # [B, S, S, 3]
                if n:
                    image[:n] = np.stack([r[0] for r in rows])
                yield {"image": image,
                       "label": np.asarray([r[1] for r in rows] + [-1] * (b - n), np.int32),  # [B]
                       "mask": np.arange(b) < n,  # [B]
                       "captions": [r[2] for r in rows] + [[] for _ in range(b - n)],
                       "key": [r[3] for r in rows] + [""] * (b - n)}

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)


def default_split(spec: str, task: str) -> str:
    """The split evaluated when none is given: scenes' ``heldout`` for zero-shot (``test`` otherwise); for other
    datasets the first of test / validation / train that exists."""
    if spec == SCENES:
        return "heldout" if task == "zeroshot" else "test"
    if is_image_folder(spec):
        return "test"
    from clipjax.data import sources

    names = sources.splits(pipeline_spec(spec))
    for split in ("test", "validation", "val", "train"):
        if split in names:
            return split
    return names[0]


def open_eval_data(spec: str, split: str | None, *, task: str, image_size: int, batch_size: int,
                   classnames: Sequence[str] | None = None, max_examples: int | None = None,
                   label_space: str = "split"):
    """(batches, classnames or None, split) for `spec`. `batches` is re-iterable; `max_examples` caps it;
    `label_space` as in ``clipjax.data.pipeline.make_eval_dataset`` (an ImageFolder has one label space).
    `max_examples` None or ≤ 0: every example."""
    if max_examples is not None and max_examples <= 0:
        max_examples = None
    if is_image_folder(spec):
        data = ImageFolder(spec, image_size=image_size, batch_size=batch_size, classnames=classnames,
                           max_examples=max_examples)
        return data, data.classnames, split or "test"
    from clipjax.data import pipeline

    split = split or default_split(spec, task)
    data = pipeline.make_eval_dataset(pipeline_spec(spec), split, image_size=image_size, batch_size=batch_size,
                                      label_space=label_space)
    names = list(classnames) if classnames is not None else data.classnames
    if classnames is None and names is not None and known_name(spec):
        from clipjax.evaluate import templates

        shipped = templates.get_classnames(known_name(spec))
        names = shipped if len(shipped) == len(names) else names
    if classnames is not None and data.classnames is not None and len(classnames) != len(data.classnames):
        raise ValueError(f"{len(classnames)} class names given; dataset {spec!r} split {split!r} has "
                         f"{len(data.classnames)} classes")
    return Limited(data, max_examples), names, split


class Limited:
    """At most `max_examples` valid rows of a re-iterable batch source (rows past the limit are masked out)."""

    def __init__(self, data, max_examples: int | None):
        self.data, self.max_examples = data, max_examples

    @property
    def num_examples(self) -> int:
        n = getattr(self.data, "num_examples", None)
        return n if self.max_examples is None or n is None else min(n, self.max_examples)

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.data.batch_size)

    def __iter__(self) -> Iterator[dict]:
        seen = 0
        for batch in self.data:
            if self.max_examples is not None and seen + int(batch["mask"].sum()) > self.max_examples:
                mask = batch["mask"].copy()
                mask[np.flatnonzero(mask)[self.max_examples - seen:]] = False
                batch = {**batch, "mask": mask}
            seen += int(batch["mask"].sum())
            yield batch
            if self.max_examples is not None and seen >= self.max_examples:
                return


class Cached:
    """A re-iterable batch source whose batches are kept in host memory after the first full pass, when they
    fit in `limit_bytes` (evaluations during training re-encode the same images with new weights)."""

    def __init__(self, data, limit_bytes: int = 512 << 20):
        self.data, self.limit_bytes = data, limit_bytes
        self._batches: list[dict] | None = None

    @property
    def num_examples(self) -> int | None:
        return getattr(self.data, "num_examples", None)

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[dict]:
        if self._batches is not None:
            yield from self._batches
            return
        kept: list[dict] | None = []
        size = 0
        for batch in self.data:
            if kept is not None:
                size += batch["image"].nbytes
                if size <= self.limit_bytes:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        self._batches = kept
