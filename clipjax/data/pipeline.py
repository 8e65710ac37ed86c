"""Host input pipeline: resumable, deterministic training batches and in-order eval batches.

``make_train_iterator`` chooses the training iterator of a spec or mix; ``make_eval_dataset`` reads eval batches.

Training stream (per host, ``clipjax.data.slots``): sample slots t = 0, 1, 2, ..., each given a source from the mix
weights, then that source's next record in this host's epoch order (a random-access source) or the next sample of its
shuffle buffer (a ``wds:`` stream), with crop and caption from ``default_rng([seed, process_index, t])``, all pure
functions of the seed. A batch is the next ``b`` slots whose sample decodes and has a non-empty caption (and, with
``labels=True``, a label); bad samples are skipped and counted. The resume state is the slot reached, the slots each
source took, the skips and each stream's position, and a restored iterator yields exactly the batches the
uninterrupted one would.

Training images stay uint8 from the decoder to the accelerator (``preprocess.train_crop``): the jitted step
normalises them on the device (``clipjax.step.prepare_images``), so the host ships a quarter of the float32 bytes
and never spends time on the normalisation. Eval batches are float32 (``preprocess.preprocess`` of the image
decoded to RGB, as open_clip's ImageFolder and webdataset evaluations load it).

Both loaders run on ``clipjax.data.core``: a picklable loader object (``TrainLoader``, ``EvalLoader``) is mapped
over work items (slots, record indices) by an ``OrderedMap``, either on ``num_threads`` threads of this process
(``workers=0``; PIL and NumPy release the GIL) or in ``workers`` worker processes of ``num_threads`` threads each
(fresh interpreters without JAX; batches are the same either way); a ``Prefetcher`` thread keeps ``prefetch``
finished training batches ahead. Records are parsed straight from the serialized ``tf.train.Example`` (~13 µs)
instead of TFDS's pure-Python ``deserialize_example_np`` (~1 ms, GIL-bound). ``python -m clipjax.data.throughput``
measures what a host delivers; ``experiments/bench_loader.py`` compares with open_clip's loader (2-core machine,
JPEGs of 256-400 px → 224 px, batch 64: 698 / 1167 images/s with 1 / 2 workers, open_clip's 397 / 676).
``wds:`` specs (webdataset shards streamed in place, ``clipjax.data.wds``) are sources of the same slots, alone or in
a mix with random-access sources: one iterator and one resume state for all (``clipjax.data.slots``).

Shapes: b per-host batch, S image size, C context length.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np

from clipjax.data import core, wds
from clipjax.data import preprocess as pp
from clipjax.data import sources as src_lib
from clipjax.data.core import BLOCK as _BLOCK  # noqa: F401  (re-exported)
from clipjax.data.core import Tokenizer  # noqa: F401  (re-exported)
from clipjax.data.core import MAX_CONSECUTIVE_BAD as _MAX_CONSECUTIVE_BAD  # noqa: F401  (re-exported)
from clipjax.data.core import executor_for as _executor  # noqa: F401  (re-exported)
from clipjax.data.core import window as _window  # noqa: F401  (re-exported)
from clipjax.data.slots import STATE_VERSION, Slot, TrainIterator, TrainLoader  # noqa: F401  (re-exported)
from clipjax.data.slots import epoch_order, source_choices  # noqa: F401  (re-exported)
from clipjax.data.sources import get_classnames  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def make_train_iterator(
    spec_or_mix: str | dict[str, float],
    *,
    global_batch_size: int,
    image_size: int,
    context_length: int,
    tokenizer: core.Tokenizer,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    scale: tuple[float, float] = (0.9, 1.0),
    num_threads: int = 2,
    prefetch: int = 2,
    split: str = "train",
    labels: bool = False,
    workers: int = 0,
    executor: core.ExecutorFactory | None = None,
    shuffle_buffer: int | None = None,
) -> TrainIterator:
    """Training batches of ``spec_or_mix`` (a spec string or {spec: weight}) for this host: the one slot iterator,
    ``slots.TrainIterator``, for random-access sources and ``wds:`` streams (webdataset shards) alike, a mix of them
    or one. ``shuffle_buffer``: a stream's samples shuffled in a buffer of that many (None:
    ``wds.DEFAULT_SHUFFLE_BUFFER``; ignored without streams).

    ``process_index``/``process_count`` default to ``jax.process_index()``/``jax.process_count()``.
    ``tokenizer(texts, context_length)`` → int32 [N, C] (e.g. ``clipjax.data.tokenizer.get_tokenizer()``).
    ``labels=True`` (one labelled dataset, e.g. "scenes" or an ImageFolder): every batch also has "label": int32
    [b], the record's index into ``get_classnames(spec)`` (all classes, whatever the split); a record without a
    label is bad (skipped, counted). The other fields, and the state, are the same as without labels.
    ``workers``: 0 decodes on ``num_threads`` threads of this process; N > 0 in N worker processes of
    ``num_threads`` threads each (``core.processes``), for hosts where one process's GIL limits the rate. A worker
    that dies raises ``core.DataWorkerError``; ``close()`` ends the workers. ``executor``: any other executor
    factory (``clipjax.data.core``), in place of the one ``workers`` chooses. Batches and the resume state depend on
    none of these.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    specs, weights = src_lib.resolve_specs(spec_or_mix)
    return TrainIterator(
        specs, weights, split=split, global_batch_size=global_batch_size, image_size=image_size,
        context_length=context_length, tokenizer=tokenizer, seed=seed, process_index=process_index,
        process_count=process_count, scale=scale, num_threads=num_threads, prefetch=prefetch, labels=labels,
        workers=workers, executor=executor,
        shuffle_buffer=wds.DEFAULT_SHUFFLE_BUFFER if shuffle_buffer is None else shuffle_buffer,
    )


# ============================================================================================ evaluation

@dataclasses.dataclass
class EvalLoader:
    """Record index → (image f32 [S,S,3], label, captions, key); picklable for workers. The image is decoded to RGB
    first (``preprocess.load_image``, as open_clip's ImageFolder and webdataset evaluations do), then given the eval
    transform.

    ``label_map``: global label id → label in the evaluated label space (ids not in it become -1); None keeps
    the global ids. Raises ``core.BadRecord`` for a record that cannot be read or decoded.
    """

    sources: src_lib.SourceSet  # one spec
    image_size: int
    label_map: dict[int, int] | None = None

    def __call__(self, index: int) -> tuple[np.ndarray, int, list[str], str]:
        source = self.sources[0]
        where = f"of {source.spec!r} split {source.split!r}"
        try:
            rec = source.record(index)
        except Exception as e:  # a corrupt serialized record, an unreadable file
            raise core.BadRecord(f"record {index} {where}: unreadable ({type(e).__name__}: {e})") from None
        try:
            image = pp.preprocess(pp.load_image(rec.image), self.image_size)  # [S, S, 3]
        except Exception as e:  # corrupt or undecodable image bytes
            raise core.BadRecord(f"record {rec.key!r} {where}: {e}") from None
        label = rec.label if self.label_map is None else self.label_map.get(rec.label, -1)
        return image, label, list(rec.captions), rec.key


def evenly_spaced_indices(n: int, k: int | None) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k`` is None or ≥ n)."""
    if k is None or k >= n:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, k).round().astype(int)]


class EvalDataset:
    """In-order eval batches of one split; re-iterable.

    Each batch: {"image": f32 [B,S,S,3] (eval transform of the RGB image), "label": i32 [B], "mask": bool [B],
    "captions": list of B lists of str, "key": list of B str}. Every batch has ``batch_size`` rows; the
    last one is padded (zeros, label -1, mask False, no captions). Records whose image does not decode
    are skipped and counted in ``skipped``. Labels index ``classnames``.

    ``classnames``: an ImageFolder's class names in place of its folder names (its captions use them).
    ``evenly_spaced``: read only that many records, spread evenly over the split (an ImageFolder's records are
    sorted by class: every class stays represented). ``workers``, ``executor``: as in ``make_train_iterator``
    (worker processes start at each iteration).
    """

    def __init__(self, spec: str, split: str, *, image_size: int, batch_size: int, label_space: str,
                 num_threads: int, classnames: Sequence[str] | None = None, evenly_spaced: int | None = None,
                 workers: int = 0, executor: core.ExecutorFactory | None = None):
        if label_space not in ("split", "all"):
            raise ValueError(f"label_space must be 'split' or 'all', got {label_space!r}")
        for name, value in (("batch_size", batch_size), ("image_size", image_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"eval {name} must be a positive integer, got {value!r}")
        self.source = src_lib.open_source(spec, split, classnames=classnames)
        self.spec, self.split, self.image_size, self.batch_size = spec, split, image_size, batch_size
        self.num_threads, self.workers = max(1, num_threads), int(workers)
        self.executor, self._decoders = core.executor_for(executor, self.workers, self.num_threads, "clipjax-eval")
        self.indices = evenly_spaced_indices(len(self.source), evenly_spaced)  # the records read, in order
        self.num_examples = len(self.indices)
        self.skipped = 0
        ids = src_lib.split_class_ids(spec, split) if label_space == "split" else None
        label_map = {g: i for i, g in enumerate(ids)} if ids is not None else None
        self.loader = EvalLoader(src_lib.SourceSet([spec], split, classnames=classnames, opened=[self.source]),
                                 image_size, label_map)
        if classnames is not None:
            self.classnames: list[str] | None = list(classnames)
        else:
            try:
                self.classnames = src_lib.get_classnames(spec, split if label_space == "split" else None)
            except src_lib.DatasetError:
                self.classnames = None

    def _batch(self, rows: list) -> dict:
        n, b, s = len(rows), self.batch_size, self.image_size
        image = np.zeros((b, s, s, 3), np.float32)  # [B, S, S, 3]
        if n:
            image[:n] = np.stack([r[0] for r in rows])
        return {
            "image": image,
            "label": np.asarray([r[1] for r in rows] + [-1] * (b - n), np.int32),  # [B]
            "mask": np.arange(b) < n,  # [B]
            "captions": [r[2] for r in rows] + [[] for _ in range(b - n)],
            "key": [r[3] for r in rows] + [""] * (b - n),
        }

    def __iter__(self) -> Iterator[dict]:
        self.skipped = 0
        rows: list = []
        records = core.OrderedMap(self.loader, self.indices, executor=self.executor,
                                  window=core.window(self.batch_size, self._decoders), logger=log)
        with records:
            for _, row in records:
                self.skipped = records.skipped
                rows.append(row)
                if len(rows) == self.batch_size:
                    yield self._batch(rows)
                    rows = []
            self.skipped = records.skipped
        if rows:
            yield self._batch(rows)

    def __len__(self) -> int:
        """Number of batches when no record is skipped."""
        return math.ceil(self.num_examples / self.batch_size)


def make_eval_dataset(
    spec: str,
    split: str,
    *,
    image_size: int,
    batch_size: int,
    label_space: str = "split",
    num_threads: int = 2,
    classnames: Sequence[str] | None = None,
    evenly_spaced: int | None = None,
    workers: int = 0,
    executor: core.ExecutorFactory | None = None,
) -> EvalDataset:
    """Eval batches of ``spec``/``split``. ``label_space="split"``: labels index ``get_classnames(spec, split)``
    (e.g. the 10 scenes held-out classes); ``"all"``: the dataset's global label ids. ``classnames``,
    ``evenly_spaced``, ``workers`` and ``executor`` as in ``EvalDataset``."""
    return EvalDataset(spec, split, image_size=image_size, batch_size=batch_size, label_space=label_space,
                       num_threads=num_threads, classnames=classnames, evenly_spaced=evenly_spaced,
                       workers=workers, executor=executor)
