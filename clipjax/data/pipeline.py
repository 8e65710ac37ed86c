"""Host input pipeline: resumable, deterministic training batches and in-order eval batches.

Training stream (per host). Sample slots t = 0, 1, 2, ... are assigned, as pure functions of the seed:

    source     s(t)    from the mix weights, drawn in blocks of 4096 slots (one Generator per block)
    record     the n-th record drawn from source s, n = how many earlier slots chose s:
               epoch e = n // L, position n % L, where this host's epoch order is
               permutation_e(N)[process_index::process_count][:L],  L = N // process_count
    randomness crop and caption choice from ``default_rng([seed, process_index, t])``

so hosts read disjoint records in every epoch and together cover all but N mod process_count of them.
A batch is the next ``b`` slots whose record decodes and has a non-empty caption (and, with ``labels=True``, a
label); bad records (corrupt bytes, empty captions, no label) are skipped and counted. The state after a batch is
therefore just ``{"sample": t, "counts": [n_s], "skipped": k}`` (plus identity fields checked on restore), and a
restored iterator yields exactly the batches the uninterrupted one would.

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
``wds:`` specs (webdataset shards streamed in place) have their own iterator with the same interface,
``clipjax.data.wds``; a mix with streams among its sources, ``clipjax.data.mix`` (its slots' sources drawn as here).

Shapes: b per-host batch, S image size, C context length.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from clipjax.data import core
from clipjax.data import preprocess as pp
from clipjax.data import sources as src_lib
from clipjax.data.sources import get_classnames  # noqa: F401  (re-exported)

STATE_VERSION = 1
_BLOCK = 4096
_MAX_CONSECUTIVE_BAD = 1000
log = logging.getLogger(__name__)

Tokenizer = Callable[[Sequence[str], int], np.ndarray]


def _valid_captions(captions: Sequence[str]) -> list[str]:
    return [c for c in captions if c and c.strip()]


def _window(batch_size: int, decoders: int) -> int:
    """Records in flight: two batches, and enough to keep every decoding thread (of every worker) busy."""
    return max(2 * batch_size, 8 * decoders)


def _executor(executor: core.ExecutorFactory | None, workers: int, num_threads: int, name: str
              ) -> tuple[core.ExecutorFactory, int]:
    """(the executor factory, the number of decoding threads in all) for ``workers``/``num_threads``."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: threads in this process), got {workers}")
    return executor or core.make_executor(workers, num_threads, name), max(1, workers) * num_threads


# ============================================================================================ training

def source_choices(weights: np.ndarray, *, seed: int, process_index: int, block: int) -> np.ndarray:
    """The source of each slot of block ``block`` (slots ``block * 4096`` on) of a mix of ``weights``: int [4096]."""
    if len(weights) == 1:
        return np.zeros(_BLOCK, np.int64)
    rng = np.random.default_rng([seed, 0x313, process_index, block])
    return rng.choice(len(weights), size=_BLOCK, p=weights)


def epoch_order(n: int, *, seed: int, source: int, epoch: int, process_index: int, process_count: int
                ) -> np.ndarray:
    """This host's record indices for epoch ``epoch`` of source ``source`` (of ``n`` records): int64 [n // P]."""
    perm = np.random.default_rng([seed, 0x5EED, source, epoch]).permutation(n)  # [n]
    return perm[process_index::process_count][: n // process_count]


class Slot(NamedTuple):
    """One sample slot of the training stream: a work item of ``TrainLoader``."""

    t: int  # slot number
    source: int  # index into the specs
    index: int  # record index in that source's split
    counts: tuple[int, ...]  # records drawn from each source up to and including this slot


@dataclasses.dataclass
class TrainLoader:
    """Slot → (image uint8 [S,S,3], caption, label): the per-record work of training, picklable for workers.

    Raises ``core.BadRecord`` for a record that cannot be read or decoded, has no non-empty caption or (with
    ``num_classes``) no label in [0, num_classes).
    """

    sources: src_lib.SourceSet
    image_size: int
    scale: tuple[float, float]
    seed: int
    process_index: int
    num_classes: int | None = None  # labels required when set

    def __call__(self, slot: Slot) -> tuple[np.ndarray, str, int]:
        spec = self.sources.specs[slot.source]
        try:
            rec = self.sources[slot.source].record(slot.index)
        except Exception as e:  # a corrupt serialized record, an unreadable file
            raise core.BadRecord(f"record {slot.index} of {spec!r}: unreadable ({type(e).__name__}: {e})") from None
        captions = _valid_captions(rec.captions)
        if not captions:
            raise core.BadRecord(f"record {rec.key!r} of {spec!r}: no non-empty caption")
        if self.num_classes is not None and not 0 <= rec.label < self.num_classes:
            raise core.BadRecord(f"record {rec.key!r} of {spec!r}: no label (label {rec.label})")
        rng = np.random.default_rng([self.seed, self.process_index, slot.t])
        caption = captions[int(rng.integers(len(captions)))]
        try:
            image = pp.train_crop(rec.image, self.image_size, rng, scale=self.scale)  # uint8 [S, S, 3]
        except Exception as e:  # corrupt or undecodable image bytes
            raise core.BadRecord(f"record {rec.key!r} of {spec!r}: {e}") from None
        return image, caption, rec.label


class HostBatches(core.PrefetchedBatches):
    """What every training-batch iterator of a host shares (this module's, a ``wds:`` stream's, a mix with streams):
    its settings, checked, and its decoding executor."""

    def _configure(self, *, global_batch_size: int, image_size: int, context_length: int, tokenizer: Tokenizer,
                   seed: int, process_index: int, process_count: int, scale: tuple[float, float], num_threads: int,
                   prefetch: int, workers: int, executor: core.ExecutorFactory | None) -> None:
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
        if global_batch_size % process_count:
            raise ValueError(f"global batch {global_batch_size} not divisible by {process_count} processes")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale {tuple(scale)}: must be (MIN, MAX) with 0 < MIN <= MAX <= 1")
        self.batch_size, self.global_batch_size = global_batch_size // process_count, global_batch_size
        self.image_size, self.context_length, self.tokenizer = image_size, context_length, tokenizer
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.scale, self.num_threads, self.prefetch = tuple(scale), max(1, num_threads), max(1, prefetch)
        self.workers = int(workers)
        self.executor, self._decoders = _executor(executor, self.workers, self.num_threads, "clipjax-data")
        self._prefetcher: core.Prefetcher | None = None


class TrainIterator(HostBatches):
    """Infinite iterator of per-host training batches {"image": uint8 [b,S,S,3], "text": i32 [b,C]}, plus
    "label": i32 [b] with ``labels=True``. Images are the cropped pixels; ``preprocess.normalize`` (on the host) or
    ``clipjax.step.prepare_images`` (on the device) makes them the model's float32 input."""

    def __init__(
        self,
        specs: list[str],
        weights: list[float],
        *,
        split: str,
        global_batch_size: int,
        image_size: int,
        context_length: int,
        tokenizer: Tokenizer,
        seed: int,
        process_index: int,
        process_count: int,
        scale: tuple[float, float],
        num_threads: int,
        prefetch: int,
        labels: bool = False,
        workers: int = 0,
        executor: core.ExecutorFactory | None = None,
    ):
        self._configure(global_batch_size=global_batch_size, image_size=image_size, context_length=context_length,
                        tokenizer=tokenizer, seed=seed, process_index=process_index, process_count=process_count,
                        scale=scale, num_threads=num_threads, prefetch=prefetch, workers=workers, executor=executor)
        if labels and len(specs) != 1:
            raise src_lib.DatasetError(f"labels=True reads one labelled dataset, got a mix of {len(specs)}")
        self.specs, self.weights = specs, np.asarray(weights, np.float64)
        self.sources = [src_lib.open_source(s, split) for s in specs]
        for spec, source in zip(specs, self.sources):
            if len(source) < process_count:
                raise src_lib.DatasetError(
                    f"dataset {spec!r} split {split!r} has {len(source)} records, fewer than {process_count} hosts"
                )
        self.labels = bool(labels)
        self.classnames = src_lib.get_classnames(specs[0]) if labels else None  # what "label" indexes
        self.loader = TrainLoader(
            src_lib.SourceSet(specs, split, opened=self.sources), image_size, self.scale, seed, process_index,
            num_classes=len(self.classnames) if labels else None)
        self._state = {"sample": 0, "counts": [0] * len(specs), "skipped": 0, "skipped_by_source": [0] * len(specs)}
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    # -------------------------------------------------------------------------------------------- slots

    def _epoch_order(self, s: int, epoch: int) -> np.ndarray:
        """This host's record indices for epoch ``epoch`` of source ``s``: int64 [N // P]."""
        key = (s, epoch)
        if key not in self._perm_cache:
            order = epoch_order(len(self.sources[s]), seed=self.seed, source=s, epoch=epoch,
                                process_index=self.process_index, process_count=self.process_count)
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != s}
            self._perm_cache[key] = order
        return self._perm_cache[key]

    def _choices(self, block: int) -> np.ndarray:
        """Source index of each slot of ``block``: int [_BLOCK]."""
        return source_choices(self.weights, seed=self.seed, process_index=self.process_index, block=block)

    def _slots(self, state: dict) -> Iterator[Slot]:
        """The slots from ``state`` on."""
        t, counts = state["sample"], list(state["counts"])
        block, choices = -1, None
        while True:
            if t // _BLOCK != block:
                block = t // _BLOCK
                choices = self._choices(block)
            s = int(choices[t % _BLOCK])
            order_len = len(self.sources[s]) // self.process_count
            epoch, pos = divmod(counts[s], order_len)
            index = int(self._epoch_order(s, epoch)[pos])
            counts[s] += 1
            yield Slot(t, s, index, tuple(counts))
            t += 1

    # -------------------------------------------------------------------------------------------- batches

    def _batches(self, state: dict) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        """(batch, state after it) from ``state`` on; runs on the prefetch thread."""
        records = core.OrderedMap(self.loader, self._slots(state), executor=self.executor,
                                  window=_window(self.batch_size, self._decoders), skipped=state["skipped"],
                                  max_consecutive_bad=_MAX_CONSECUTIVE_BAD, logger=log)
        counts, by_source = list(state["counts"]), list(state["skipped_by_source"])
        with records:
            while True:
                rows = [next(records) for _ in range(self.batch_size)]  # [(slot, (image, caption, label))] * b
                last = rows[-1][0]
                # each source's slots up to the last row, less its rows, are the ones the map skipped
                taken = [after - before for after, before in zip(last.counts, counts)]
                for slot, _ in rows:
                    taken[slot.source] -= 1
                counts, by_source = list(last.counts), [k + n for k, n in zip(by_source, taken)]
                batch = {
                    "image": np.stack([r[1][0] for r in rows]),  # [b, S, S, 3]
                    "text": np.asarray(self.tokenizer([r[1][1] for r in rows], self.context_length), np.int32),
                }  # text: [b, C]
                if self.labels:
                    batch["label"] = np.asarray([r[1][2] for r in rows], np.int32)  # [b]
                yield batch, {"sample": last.t + 1, "counts": counts, "skipped": records.skipped,
                              "skipped_by_source": by_source}

    def get_state(self) -> dict:
        """JSON-able position after the last yielded batch."""
        return {
            "version": STATE_VERSION,
            "sample": self._state["sample"],
            "counts": list(self._state["counts"]),
            "skipped": self._state["skipped"],
            "skipped_by_source": list(self._state["skipped_by_source"]),
            "specs": list(self.specs),
            "seed": self.seed,
            "process_index": self.process_index,
            "process_count": self.process_count,
        }

    def set_state(self, state: dict) -> None:
        """Continues from ``state`` (from ``get_state`` of an iterator with the same specs/seed/hosts)."""
        core.check_state(state, self.get_state(), ("specs", "seed", "process_index", "process_count"),
                         what="an ArrayRecord iterator's")
        # "skipped_by_source" is absent from states saved before it was kept: a mix's per-source counts restart at 0
        by_source = state.get("skipped_by_source") or ([state["skipped"]] if len(self.specs) == 1 else
                                                       [0] * len(self.specs))
        if (len(state["counts"]) != len(self.specs) or sum(state["counts"]) != state["sample"]
                or len(by_source) != len(self.specs)
                or ("skipped_by_source" in state and sum(by_source) != state["skipped"])):
            raise ValueError(f"inconsistent data iterator state: sample={state['sample']} counts={state['counts']} "
                             f"skipped={state['skipped']} by source {state.get('skipped_by_source')}")
        self.close()
        self._state = {"sample": int(state["sample"]), "counts": [int(c) for c in state["counts"]],
                       "skipped": int(state["skipped"]), "skipped_by_source": [int(k) for k in by_source]}

    @property
    def skipped_by_source(self) -> dict[str, int]:
        """Of a mix: {spec: records skipped so far (up to the batches yielded)}; {} for one dataset."""
        return dict(zip(self.specs, self._state["skipped_by_source"])) if len(self.specs) > 1 else {}


def make_train_iterator(
    spec_or_mix: str | dict[str, float],
    *,
    global_batch_size: int,
    image_size: int,
    context_length: int,
    tokenizer: Tokenizer,
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
    """Training batches of ``spec_or_mix`` (a spec string or {spec: weight}) for this host.

    A ``wds:`` spec (webdataset shards) gets ``clipjax.data.wds``'s streaming iterator, with the same batches,
    ``get_state``/``set_state``/``skipped``/``close``; ``shuffle_buffer``: its samples shuffled in a buffer of that
    many (None: ``wds.DEFAULT_SHUFFLE_BUFFER``; ignored by other specs). A mix with ``wds:`` streams among its
    sources is ``clipjax.data.mix``'s iterator: the source of each slot drawn from the weights as here, a stream's
    slot taking that stream's next sample.

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
    if any(src_lib.source_kind(s) == "stream" for s in specs):
        from clipjax.data import mix, wds

        kw = dict(split=split, global_batch_size=global_batch_size, image_size=image_size,
                  context_length=context_length, tokenizer=tokenizer, seed=seed, process_index=process_index,
                  process_count=process_count, scale=scale, num_threads=num_threads, prefetch=prefetch,
                  workers=workers, executor=executor)
        if len(specs) == 1:
            return wds.make_stream_iterator(specs, labels=labels, shuffle_buffer=shuffle_buffer, **kw)
        if labels:
            raise src_lib.DatasetError(f"labels=True reads one labelled dataset, got a mix of {len(specs)}")
        return mix.MixTrainIterator(
            specs, weights, shuffle_buffer=wds.DEFAULT_SHUFFLE_BUFFER if shuffle_buffer is None else shuffle_buffer,
            **kw)
    return TrainIterator(
        specs, weights, split=split, global_batch_size=global_batch_size, image_size=image_size,
        context_length=context_length, tokenizer=tokenizer, seed=seed, process_index=process_index,
        process_count=process_count, scale=scale, num_threads=num_threads, prefetch=prefetch, labels=labels,
        workers=workers, executor=executor,
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
        self.executor, self._decoders = _executor(executor, self.workers, self.num_threads, "clipjax-eval")
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
                                  window=_window(self.batch_size, self._decoders), logger=log)
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
