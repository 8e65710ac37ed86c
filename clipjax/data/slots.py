"""The training stream of a host: sample slots → batches, for any sources, a mix of them or one.

Sources are random-access (ArrayRecord/TFDS datasets, ImageFolders: ``clipjax.data.sources``) or streams (``wds:``
webdataset shards: ``clipjax.data.wds``); one source is a mix of one. Sample slots t = 0, 1, 2, ... of a host's
stream are assigned, as pure functions of the seed:

    source     s(t)    from the mix weights, drawn in blocks of 4096 slots (one Generator per block)
    record     a random-access source: the n-th record drawn from source s, n = how many earlier slots chose s:
               epoch e = n // L, position n % L, where this host's epoch order is
               permutation_e(N)[process_index::process_count][:L],  L = N // process_count
    sample     a stream: its next sample (this host's shards, a seeded shuffle buffer of ``shuffle_buffer``
               samples; a stream in a mix keyed by its place there, so two streams are shuffled independently)
    randomness crop and caption choice from ``default_rng([seed, process_index, t])``, for both kinds

so hosts read disjoint records in every epoch and together cover all but N mod process_count of them, a stream gives
a share of the slots as close to its weight as a random-access source does, and a slot never waits for a particular
sample. A batch is the next ``b`` slots whose sample decodes and has a non-empty caption (and, with ``labels=True``,
one random-access source, a label); bad samples (corrupt bytes, empty captions, no label; a stream's damaged or
missing shards) are skipped and counted, in all (``skipped``) and by source (``skipped_by_source``, of a mix).
``clipjax.data.pipeline`` documents the batches; ``make_train_iterator`` there makes the iterator of a spec or mix.

Resume state (``get_state``, JSON, kind "slots", version 2): ``sample`` (the next slot t), ``counts`` (slots taken by
each source: records drawn, or samples taken from the stream), ``skipped``, ``skipped_by_source`` (a list in mix
order), ``streams`` ({spec: that stream's slots, position, buffer and read skips}, ``wds``; {} without streams), and the
specs, seed, hosts and (with streams) shuffle buffer, checked on restore. A restored iterator yields exactly the
batches the uninterrupted one would; the weights may change between runs (the counts stay valid). ``set_state`` reads
the states of the three iterators before this one as well (``upgrade``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from clipjax.data import core, wds
from clipjax.data import preprocess as pp
from clipjax.data import sources as src_lib

STATE_KIND, STATE_VERSION = "slots", 2
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
    """One sample slot of a random-access source: a work item of ``TrainLoader`` (a stream's slot is a
    ``wds.SampleItem``)."""

    t: int  # slot number
    source: int  # index into the loader's random-access sources (the mix's, in mix order)
    index: int  # record index in that source's split


@dataclasses.dataclass
class TrainLoader:
    """Slot or ``wds.SampleItem`` → (image uint8 [S,S,3], caption, label): the per-sample work of training, picklable
    for workers. A slot's record is read from ``sources``; a stream's sample brings its bytes (its label is -1).

    Raises ``core.BadRecord`` for a record that cannot be read or decoded, has no non-empty caption or (with
    ``num_classes``) no label in [0, num_classes), and for a sample whose image does not decode or whose header
    promises more pixels than PIL's decompression-bomb limit (never decoded).
    """

    sources: src_lib.SourceSet  # the random-access sources
    image_size: int
    scale: tuple[float, float]
    seed: int
    process_index: int
    num_classes: int | None = None  # labels required when set

    def __call__(self, item: Slot | wds.SampleItem) -> tuple[np.ndarray, str, int]:
        if isinstance(item, wds.SampleItem):
            what, image, captions, label = f"sample {item.where}", item.image, item.captions, -1
            too_large = pp.oversized_image(image)  # from the header: never decoded
            if too_large is not None:
                raise core.BadRecord(f"{what}: {too_large}")
        else:
            spec = self.sources.specs[item.source]
            try:
                rec = self.sources[item.source].record(item.index)
            except Exception as e:  # a corrupt serialized record, an unreadable file
                raise core.BadRecord(f"record {item.index} of {spec!r}: unreadable ({type(e).__name__}: {e})"
                                     ) from None
            what, image, captions, label = f"record {rec.key!r} of {spec!r}", rec.image, _valid_captions(
                rec.captions), rec.label
            if not captions:
                raise core.BadRecord(f"{what}: no non-empty caption")
            if self.num_classes is not None and not 0 <= label < self.num_classes:
                raise core.BadRecord(f"{what}: no label (label {label})")
        rng = np.random.default_rng([self.seed, self.process_index, item.t])
        caption = captions[int(rng.integers(len(captions)))]
        try:
            image = pp.train_crop(image, self.image_size, rng, scale=self.scale)  # uint8 [S, S, 3]
        except Exception as e:  # corrupt or undecodable image bytes
            raise core.BadRecord(f"{what}: {e}") from None
        return image, caption, label


class TrainIterator(core.PrefetchedBatches):
    """Infinite per-host training batches of any sources, a mix of them or one: {"image": uint8 [b,S,S,3], "text":
    i32 [b,C]}, plus "label": i32 [b] with ``labels=True`` (one random-access source). Images are the cropped pixels;
    ``preprocess.normalize`` (on the host) or ``clipjax.step.prepare_images`` (on the device) makes them the model's
    float32 input. A ``core.TrainData``; ``sources`` are the random-access sources when there is no stream (else []),
    ``streams`` {mix index: ``wds.Stream``}."""

    step_batch = None  # ``core.TrainData``: the batches are made here, on the host, and fed to the step

    def __init__(self, specs: Sequence[str], weights: Sequence[float], *, split: str, global_batch_size: int,
                 image_size: int, context_length: int, tokenizer: core.Tokenizer, seed: int, process_index: int,
                 process_count: int, scale: tuple[float, float], num_threads: int, prefetch: int,
                 labels: bool = False, workers: int = 0, executor: core.ExecutorFactory | None = None,
                 shuffle_buffer: int = wds.DEFAULT_SHUFFLE_BUFFER):
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
        self.executor, self._decoders = core.executor_for(executor, self.workers, self.num_threads, "clipjax-data")
        self.specs, self.weights = list(specs), np.asarray(weights, np.float64)
        n = len(self.specs)
        if labels and n != 1:
            raise src_lib.DatasetError(f"labels=True reads one labelled dataset, got a mix of {n}")
        streamed = [s for s, spec in enumerate(self.specs) if src_lib.source_kind(spec) == "stream"]
        if streamed and split != "train":
            raise src_lib.DatasetError(
                f"dataset {self.specs[0]!r} has no splits (got split {split!r}): point the pattern at the shards to "
                f"read" if n == 1 else f"dataset mix {self.specs}: its wds: streams have no splits (got split "
                f"{split!r}); train on the 'train' split")
        if streamed and labels:
            raise src_lib.DatasetError(f"dataset {self.specs[0]!r}: webdataset shards give captions, not class labels")
        self.shuffle_buffer = int(shuffle_buffer)
        self.streams = {s: wds.Stream(self.specs[s], seed=seed, process_index=process_index,
                                      process_count=process_count, shuffle_buffer=self.shuffle_buffer,
                                      key=() if n == 1 else (s,)) for s in streamed}
        record = [s for s in range(n) if s not in self.streams]
        opened = [src_lib.open_source(self.specs[s], split) for s in record]
        for s, source in zip(record, opened):
            if len(source) < process_count:
                raise src_lib.DatasetError(f"dataset {self.specs[s]!r} split {split!r} has {len(source)} records, "
                                           f"fewer than {process_count} hosts")
        self._record = {s: i for i, s in enumerate(record)}  # mix index → index among the random-access sources
        self._sizes = {s: len(source) for s, source in zip(record, opened)}
        self.sources: list = [] if self.streams else opened
        self.labels = bool(labels)
        self.classnames = src_lib.get_classnames(self.specs[0]) if labels else None  # what "label" indexes
        self.loader = TrainLoader(src_lib.SourceSet([self.specs[s] for s in record], split, opened=opened),
                                  image_size, self.scale, seed, process_index,
                                  num_classes=len(self.classnames) if labels else None)
        self._state = {"sample": 0, "counts": [0] * n, "skipped": 0, "skipped_by_source": [0] * n,
                       "streams": {s: dict(stream.start) for s, stream in self.streams.items()}}

    # -------------------------------------------------------------------------------------------- slots

    def _slots(self, state: dict, streams: dict[int, wds.SampleStream] | None = None,
               taken: collections.deque | None = None) -> Iterator[Slot | wds.SampleItem]:
        """The work items of the slots from ``state`` on (its streams' shuffled samples from ``streams``, else opened
        here); with ``taken``, each slot's (t, source, counts after it) is appended to it as its item is handed out."""
        own = streams is None
        if own:
            streams = {s: stream.stream(state["streams"][s]) for s, stream in self.streams.items()}
        counts = list(state["counts"])
        records = RecordOrders(self._sizes, seed=self.seed, process_index=self.process_index,
                               process_count=self.process_count)
        try:
            for t, s in slot_sources(self.weights, seed=self.seed, process_index=self.process_index,
                                     start=state["sample"]):
                if s in streams:
                    _, sample = next(streams[s])
                    item: Slot | wds.SampleItem = wds.SampleItem(t, sample.where, sample.image, sample.captions)
                else:
                    item = Slot(t, self._record[s], records(s, counts[s]))
                counts[s] += 1
                if taken is not None:
                    taken.append((t, s, tuple(counts)))
                yield item
        finally:
            if own:
                for stream in streams.values():
                    stream.reader.close()

    # -------------------------------------------------------------------------------------------- batches

    def _batches(self, state: dict) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        """(batch, state after it) from ``state`` on; runs on the prefetch thread."""
        streams: dict[int, wds.SampleStream] = {}
        try:
            for s, stream in self.streams.items():
                streams[s] = stream.stream(state["streams"][s])
            taken: collections.deque = collections.deque()
            records = core.OrderedMap(self.loader, self._slots(state, streams, taken), executor=self.executor,
                                      window=core.window(self.batch_size, self._decoders),
                                      max_consecutive_bad=core.MAX_CONSECUTIVE_BAD, logger=log)
            at = {s: dict(state["streams"][s]) for s in streams}  # each stream's state after the last batch
            read_before = {s: st["read_skipped"] for s, st in at.items()}
            decoded = [0] * len(self.specs)  # slots of each source the map skipped since ``state``
            with records:
                while True:
                    rows = [next(records) for _ in range(self.batch_size)]  # [(item, (image, caption, label))] * b
                    for item, _ in rows:
                        while taken[0][0] < item.t:  # slots the map skipped before this one
                            decoded[taken.popleft()[1]] += 1
                        counts = taken.popleft()[2]
                    batch = {
                        "image": np.stack([r[1][0] for r in rows]),  # [b, S, S, 3]
                        "text": np.asarray(self.tokenizer([r[1][1] for r in rows], self.context_length), np.int32),
                    }  # text: [b, C]
                    if self.labels:
                        batch["label"] = np.asarray([r[1][2] for r in rows], np.int32)  # [b]
                    for s, stream in streams.items():
                        if counts[s] != at[s]["sample"]:  # it gave slots in this batch
                            at[s] = stream.state_after(counts[s] - 1)
                            stream.forget_through(counts[s] - 1)
                    new = [n + (at[s]["read_skipped"] - read_before[s] if s in at else 0)  # skips since ``state``
                           for s, n in enumerate(decoded)]
                    yield batch, {"sample": rows[-1][0].t + 1, "counts": list(counts),
                                  "skipped": state["skipped"] + sum(new),
                                  "skipped_by_source": [k + d for k, d in zip(state["skipped_by_source"], new)],
                                  "streams": {s: dict(st) for s, st in at.items()}}
        finally:
            for stream in streams.values():
                stream.reader.close()

    # -------------------------------------------------------------------------------------------- state

    @property
    def skipped_by_source(self) -> dict[str, int]:
        """Of a mix: {spec: samples skipped so far (up to the batches yielded)}; {} for one source."""
        return dict(zip(self.specs, self._state["skipped_by_source"])) if len(self.specs) > 1 else {}

    def get_state(self) -> dict:
        """JSON-able position after the last yielded batch (the module docstring describes it)."""
        s = self._state
        return {"version": STATE_VERSION, "kind": STATE_KIND, "sample": s["sample"], "counts": list(s["counts"]),
                "skipped": s["skipped"], "skipped_by_source": list(s["skipped_by_source"]),
                "streams": {self.specs[i]: self.streams[i].state(st) for i, st in s["streams"].items()},
                "specs": list(self.specs), "seed": self.seed, "process_index": self.process_index,
                "process_count": self.process_count, "shuffle_buffer": self.shuffle_buffer if self.streams else None}

    def set_state(self, state: dict) -> None:
        """Continues from ``state``: ``get_state`` of an iterator with the same specs, seed, hosts (and, with streams,
        shuffle buffer; the weights may differ), or a state of the iterators before this one (``upgrade``)."""
        try:
            internal = self._internal(upgrade(state))
        except (KeyError, TypeError, AttributeError) as e:  # a field missing or of another type
            raise ValueError(f"inconsistent data iterator state ({type(e).__name__}: {e}) of "
                             f"{state.get('specs') if isinstance(state, dict) else state!r}") from None
        self.close()
        self._state = internal

    def _internal(self, state: dict) -> dict:
        """The internal state of ``state`` (in the current form), checked against this iterator."""
        mine = self.get_state()
        for field in ("specs", "seed", "process_index", "process_count") + (("shuffle_buffer",) if self.streams
                                                                             else ()):
            if state.get(field) != mine[field]:
                raise ValueError(f"data iterator state has {field}={state.get(field)!r}, this iterator "
                                 f"{mine[field]!r}")
        counts, by_source = [int(c) for c in state["counts"]], [int(k) for k in state["skipped_by_source"]]
        saved, n = state["streams"], len(self.specs)
        if (len(counts) != n or sum(counts) != state["sample"] or len(by_source) != n
                or sum(by_source) > state["skipped"] or min(counts + by_source) < 0
                or set(saved) != {self.specs[s] for s in self.streams}):
            raise ValueError(f"inconsistent data iterator state: sample={state['sample']} counts={counts}, "
                             f"skipped={state['skipped']} by source {by_source}, streams {sorted(saved)}")
        return {"sample": int(state["sample"]), "counts": counts, "skipped": int(state["skipped"]),
                "skipped_by_source": by_source,
                "streams": {s: stream.restore(saved[self.specs[s]], sample=counts[s], skipped=by_source[s])
                            for s, stream in self.streams.items()}}


def upgrade(state: dict) -> dict:
    """``state`` in the current form (kind "slots", version 2). States of the three iterators before it are read as
    they were written: an ArrayRecord dataset's or mix's (version 1, no kind; without "skipped_by_source" when saved
    before it was kept: then the skips count for one source, and restart at 0 by source in a mix), a ``wds:``
    stream's (kind "wds": its position at the top) and a mix's with streams (kind "mix": each stream's state, with
    its own slot and skip counts, by spec)."""
    kind, version = state.get("kind"), state.get("version")
    if (kind, version) != (STATE_KIND, STATE_VERSION) and (version != 1 or kind not in (None, "wds", "mix")):
        raise ValueError(f"data iterator state of {state.get('specs')!r} is not one of a training iterator (kind "
                         f"{kind!r}, version {version!r})")
    out = {**state, "kind": STATE_KIND, "version": STATE_VERSION}
    if "skipped_by_source" not in state and kind != "wds":  # saved before it was kept
        out["skipped_by_source"] = [state["skipped"]] if len(state["specs"]) == 1 else [0] * len(state["specs"])
    if kind is None:  # an ArrayRecord dataset's or mix's
        out["streams"], out["shuffle_buffer"] = {}, None
    elif kind == "wds":  # one stream
        out.update(counts=[state["sample"]], skipped_by_source=[state["skipped"]],
                   streams={state["specs"][0]: {k: state[k] for k in ("sample", "position", "buffer", "read_skipped")}
                            | {"shards": state.get("shards")}})
    elif kind == "mix":  # a mix with streams
        specs, streams = list(state["specs"]), dict(state.get("streams") or {})
        for spec, stream in streams.items():
            s = specs.index(spec) if spec in specs else None
            mix = None if s is None else (state["counts"][s], out["skipped_by_source"][s])
            if (stream["sample"], stream["skipped"]) != mix:
                raise ValueError(f"inconsistent data iterator state: stream {spec!r} gave {stream['sample']} samples "
                                 f"and skipped {stream['skipped']}, the mix counts {mix}")
            streams[spec] = {k: stream[k] for k in ("sample", "position", "buffer", "read_skipped")}
            streams[spec]["shards"] = stream.get("shards")
        out["streams"] = streams
    return out
