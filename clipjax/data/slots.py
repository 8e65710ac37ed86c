"""The training stream of ArrayRecord datasets (and ImageFolders) and their mixes: sample slots → batches.

Sample slots t = 0, 1, 2, ... of a host's stream are assigned, as pure functions of the seed:

    source     s(t)    from the mix weights, drawn in blocks of 4096 slots (one Generator per block)
    record     the n-th record drawn from source s, n = how many earlier slots chose s:
               epoch e = n // L, position n % L, where this host's epoch order is
               permutation_e(N)[process_index::process_count][:L],  L = N // process_count
    randomness crop and caption choice from ``default_rng([seed, process_index, t])``

so hosts read disjoint records in every epoch and together cover all but N mod process_count of them.
A batch is the next ``b`` slots whose record decodes and has a non-empty caption (and, with ``labels=True``, a
label); bad records (corrupt bytes, empty captions, no label) are skipped and counted. The state after a batch is
therefore just ``{"sample": t, "counts": [n_s], "skipped": k}`` (plus identity fields checked on restore), and a
restored iterator yields exactly the batches the uninterrupted one would. ``clipjax.data.pipeline`` documents the
batches; ``make_train_iterator`` there chooses the iterator of a spec.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from clipjax.data import core
from clipjax.data import preprocess as pp
from clipjax.data import sources as src_lib

STATE_VERSION = 1
log = logging.getLogger(__name__)


def _valid_captions(captions) -> list[str]:
    return [c for c in captions if c and c.strip()]


def source_choices(weights: np.ndarray, *, seed: int, process_index: int, block: int) -> np.ndarray:
    """The source of each slot of block ``block`` (slots ``block * 4096`` on) of a mix of ``weights``: int [4096]."""
    if len(weights) == 1:
        return np.zeros(core.BLOCK, np.int64)
    rng = np.random.default_rng([seed, 0x313, process_index, block])
    return rng.choice(len(weights), size=core.BLOCK, p=weights)


def epoch_order(n: int, *, seed: int, source: int, epoch: int, process_index: int, process_count: int
                ) -> np.ndarray:
    """This host's record indices for epoch ``epoch`` of source ``source`` (of ``n`` records): int64 [n // P]."""
    perm = np.random.default_rng([seed, 0x5EED, source, epoch]).permutation(n)  # [n]
    return perm[process_index::process_count][: n // process_count]


def slot_sources(weights: np.ndarray, *, seed: int, process_index: int, start: int) -> Iterator[tuple[int, int]]:
    """(t, the source of slot t) for t = ``start``, ``start`` + 1, ...: ``source_choices`` block after block. The
    one assignment of slots to sources, of a mix of random-access sources and of a mix with streams alike."""
    t, block, choices = start, -1, None
    while True:
        if t // core.BLOCK != block:
            block = t // core.BLOCK
            choices = source_choices(weights, seed=seed, process_index=process_index, block=block)
        yield t, int(choices[t % core.BLOCK])
        t += 1


class RecordOrders:
    """``orders(s, n)``: the record index of the ``n``-th slot that chose random-access source ``s`` of a mix (of
    ``sizes[s]`` records): position n % L of this host's epoch-(n // L) order, L = N // process_count. Keeps each
    source's current epoch order."""

    def __init__(self, sizes: dict[int, int], *, seed: int, process_index: int, process_count: int):
        self.sizes, self.seed, self.process_index, self.process_count = dict(sizes), seed, process_index, process_count
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # source → (epoch, its host order)

    def __call__(self, s: int, n: int) -> int:
        epoch, pos = divmod(n, self.sizes[s] // self.process_count)
        if self._orders.get(s, (None,))[0] != epoch:
            self._orders[s] = (epoch, epoch_order(self.sizes[s], seed=self.seed, source=s, epoch=epoch,
                                                  process_index=self.process_index, process_count=self.process_count))
        return int(self._orders[s][1][pos])


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



class TrainIterator(core.HostBatches):
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
        tokenizer: core.Tokenizer,
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

    # -------------------------------------------------------------------------------------------- slots

    def _slots(self, state: dict) -> Iterator[Slot]:
        """The slots from ``state`` on."""
        counts = list(state["counts"])
        records = RecordOrders({s: len(source) for s, source in enumerate(self.sources)}, seed=self.seed,
                               process_index=self.process_index, process_count=self.process_count)
        for t, s in slot_sources(self.weights, seed=self.seed, process_index=self.process_index,
                                 start=state["sample"]):
            index = records(s, counts[s])
            counts[s] += 1
            yield Slot(t, s, index, tuple(counts))

    # -------------------------------------------------------------------------------------------- batches

    def _batches(self, state: dict) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        """(batch, state after it) from ``state`` on; runs on the prefetch thread."""
        records = core.OrderedMap(self.loader, self._slots(state), executor=self.executor,
                                  window=core.window(self.batch_size, self._decoders), skipped=state["skipped"],
                                  max_consecutive_bad=core.MAX_CONSECUTIVE_BAD, logger=log)
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
