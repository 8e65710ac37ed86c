"""Evaluation data: what a `--data` spec names, opened as in-order batches with class names and captions.

Specs:

    "scenes"            the embedded dataset (zero-shot defaults to its ``heldout`` split of unseen pairs)
    "dir:PATH"          a dataset directory written by ``clipjax.data.ingest`` (or any TFDS data directory)
    PATH                the same, when PATH (or one folder below it) holds ``dataset_info.json``; otherwise an
                        ImageFolder (one subfolder per class, class name = folder name with ``_`` read as a
                        space), read directly: no ingest needed
    NAME                a prepared TFDS dataset

(parsed by ``clipjax.data.sources``, the one spec parser; ``is_image_folder``, ``pipeline_spec`` and
``default_split`` here are its functions). Every spec yields the batches of ``clipjax.data.pipeline.EvalDataset``:
{"image" f32 [B,S,S,3], "label" i32 [B], "mask" bool [B], "captions" (B lists of str), "key" (B str)}; the last
batch is padded and masked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np

from clipjax.data import sources
from clipjax.data.sources import IMAGE_EXTS, SCENES, default_split, is_image_folder  # noqa: F401  (re-exported)
from clipjax.data.sources import CLASS_TEMPLATE as CAPTION_TEMPLATE  # noqa: F401  (re-exported)
from clipjax.data.sources import resolve_spec as pipeline_spec  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)
# Shipped class names / templates for datasets known by their TFDS name (see templates.py).
KNOWN = {"imagenet2012": "imagenet", "imagenet_v2": "imagenet", "imagenet_a": "imagenet", "imagenet_r": "imagenet",
         "imagenet_sketch": "imagenet", "cifar10": "cifar10", "cifar100": "cifar100"}


def known_name(spec: str) -> str | None:
    """The shipped class-name/template set that fits `spec` (e.g. "imagenet" for TFDS "imagenet2012")."""
    base = spec.split(":")[-1].split("/")[0]
    return KNOWN.get(base)


def open_eval_data(spec: str, split: str | None, *, task: str, image_size: int, batch_size: int,
                   classnames: Sequence[str] | None = None, max_examples: int | None = None,
                   label_space: str = "split"):
    """(batches, classnames or None, split) for `spec`. `batches` is re-iterable; `max_examples` caps it;
    `label_space` as in ``clipjax.data.pipeline.make_eval_dataset`` (an ImageFolder has one label space).
    `max_examples` None or ≤ 0: every example."""
    from clipjax.data import pipeline

    if max_examples is not None and max_examples <= 0:
        max_examples = None
    split = split or sources.default_split(spec, task)
    if sources.is_image_folder(spec):  # sorted by class: an evenly spaced subset keeps every class represented
        data = pipeline.make_eval_dataset(spec, split, image_size=image_size, batch_size=batch_size,
                                          classnames=classnames, evenly_spaced=max_examples)
        return data, data.classnames, split
    data = pipeline.make_eval_dataset(sources.resolve_spec(spec), split, image_size=image_size,
                                      batch_size=batch_size, label_space=label_space)
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
