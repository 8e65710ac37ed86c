"""A ``data.mix`` with ``wds:`` streams among its sources, e.g.

    {"wds:gs://bucket/laion/{00000..41455}.tar": 0.8, "dir:/data/cc12m": 0.2}

Slot t of a host's training stream (``clipjax.data.pipeline``, P hosts):

    source     s(t)    drawn from the weights exactly as in a mix of ArrayRecord datasets (blocks of 4096 slots)
    sample     an ArrayRecord source: its n-th record, n = how many earlier slots chose it, in its per-epoch host
               order (as there); a ``wds:`` stream: its next sample (``clipjax.data.wds``: this host's shards, a
               seeded shuffle buffer of ``shuffle_buffer`` samples), the stream's shard orders and buffer choices
               keyed by its place in the mix as well, so two streams of a mix are shuffled independently
    randomness crop and caption from ``default_rng([seed, process_index, t])``, for both kinds

so a stream gives a share of the slots as close to its weight as an ArrayRecord source does, and a slot never waits
for a particular sample. Batches are the same format (uint8 images, the tokenizer's text) and the same for any
number of threads or worker processes. A mix without a stream is ``slots.TrainIterator``: its batches and state
are unchanged.

Skipped samples are counted per source (``skipped_by_source``, {spec: n}) and in all (``skipped``): for an
ArrayRecord source its bad records, for a stream what its reader skipped (samples without image or caption, damaged
or missing shards) and its images that do not decode.

Resume state (``get_state``, JSON): ``sample`` (the next slot t), ``counts`` (slots taken by each source: records
drawn, or samples taken from the stream), ``skipped``, ``skipped_by_source`` (a list in mix order), ``streams``
({spec: that stream's state in ``wds``'s form}, its ``sample`` the slots it gave) and the specs, seed, hosts and
shuffle buffer, checked on restore. A restored iterator yields exactly the batches of the uninterrupted one. The
weights may change between runs (the counts stay valid), as in an ArrayRecord mix.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from clipjax.data import core, slots, wds
from clipjax.data import sources as src_lib

log = logging.getLogger(__name__)

STATE_KIND = "mix"
STATE_VERSION = 1

Item = slots.Slot | wds.SampleItem


@dataclasses.dataclass
class MixLoader:
    """Slot or SampleItem → (image uint8 [S,S,3], caption, label): an ArrayRecord slot through ``records`` (its
    ``source`` indexes ``records.sources``, the mix's ArrayRecord sources in mix order), a stream's sample through
    ``samples``; picklable for worker processes."""

    records: slots.TrainLoader
    samples: wds.SampleLoader

    def __call__(self, item: Item) -> tuple[np.ndarray, str, int]:
        return self.samples(item) if isinstance(item, wds.SampleItem) else self.records(item)


class MixTrainIterator(core.HostBatches):
    """Infinite per-host training batches of a mix with streams: {"image": uint8 [b,S,S,3], "text": i32 [b,C]}, with
    ``get_state``/``set_state``/``skipped``/``close`` as ``slots.TrainIterator``, and ``skipped_by_source``.
    ``sources`` is empty (the size of a stream is not known before reading it)."""

    def __init__(self, specs: Sequence[str], weights: Sequence[float], *, split: str, global_batch_size: int,
                 image_size: int, context_length: int, tokenizer: core.Tokenizer, seed: int, process_index: int,
                 process_count: int, scale: tuple[float, float], num_threads: int, prefetch: int, workers: int = 0,
                 executor: core.ExecutorFactory | None = None, shuffle_buffer: int = wds.DEFAULT_SHUFFLE_BUFFER):
        self._configure(global_batch_size=global_batch_size, image_size=image_size, context_length=context_length,
                        tokenizer=tokenizer, seed=seed, process_index=process_index, process_count=process_count,
                        scale=scale, num_threads=num_threads, prefetch=prefetch, workers=workers, executor=executor)
        self.specs, self.weights = list(specs), np.asarray(weights, np.float64)
        kinds = [src_lib.source_kind(s) for s in self.specs]
        if split != "train":
            raise src_lib.DatasetError(f"dataset mix {self.specs}: its wds: streams have no splits (got split "
                                       f"{split!r}); train on the 'train' split")
        stream_kw = dict(global_batch_size=global_batch_size, image_size=image_size, context_length=context_length,
                         tokenizer=tokenizer, seed=seed, process_index=process_index, process_count=process_count,
                         scale=scale, num_threads=num_threads, prefetch=prefetch, shuffle_buffer=shuffle_buffer)
        self.streams = {s: wds.StreamTrainIterator(spec, member=s, **stream_kw)
                        for s, spec in enumerate(self.specs) if kinds[s] == "stream"}  # checks hosts, batch, buffer
        record_specs = [spec for s, spec in enumerate(self.specs) if s not in self.streams]
        opened = [src_lib.open_source(spec, split) for spec in record_specs]
        for spec, source in zip(record_specs, opened):
            if len(source) < process_count:
                raise src_lib.DatasetError(
                    f"dataset {spec!r} split {split!r} has {len(source)} records, fewer than {process_count} hosts")
        self._record = {}  # mix index → (index among the ArrayRecord sources, its source)
        for s in range(len(self.specs)):
            if s not in self.streams:
                self._record[s] = (len(self._record), opened[len(self._record)])
        self.sources: list = []
        self.labels, self.classnames = False, None
        self.shuffle_buffer = int(shuffle_buffer)
        self.loader = MixLoader(
            slots.TrainLoader(src_lib.SourceSet(record_specs, split, opened=opened), image_size, self.scale, seed,
                                 process_index),
            wds.SampleLoader(image_size, self.scale, seed, process_index))
        n = len(self.specs)
        self._state = {"sample": 0, "counts": [0] * n, "skipped": 0, "skipped_by_source": [0] * n,
                       "streams": {s: dict(m._state) for s, m in self.streams.items()}}

    # -------------------------------------------------------------------------------------------- slots

    def _items(self, state: dict, streams: dict[int, wds.SampleStream], taken: collections.deque) -> Iterator[Item]:
        """The work items of the slots from ``state`` on; each slot's (t, source, counts after it) is appended to
        ``taken`` as its item is handed out."""
        counts = list(state["counts"])
        records = slots.RecordOrders({s: len(source) for s, (_, source) in self._record.items()}, seed=self.seed,
                                     process_index=self.process_index, process_count=self.process_count)
        for t, s in slots.slot_sources(self.weights, seed=self.seed, process_index=self.process_index,
                                       start=state["sample"]):
            if s in streams:
                _, sample = next(streams[s])
                item: Item = wds.SampleItem(t, sample.where, sample.image, sample.captions)
            else:
                item = slots.Slot(t, self._record[s][0], records(s, counts[s]), ())
            counts[s] += 1
            taken.append((t, s, tuple(counts)))
            yield item

    # -------------------------------------------------------------------------------------------- batches

    def _batches(self, state: dict) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        """(batch, state after it) from ``state`` on; runs on the prefetch thread."""
        streams: dict[int, wds.SampleStream] = {}
        try:
            for s, member in self.streams.items():
                streams[s] = member.stream(state["streams"][s])
            stream_states = {s: dict(state["streams"][s]) for s in streams}
            # what each source skipped while decoding (a stream's read skips are in its state)
            decoded = [n - stream_states[s]["read_skipped"] if s in streams else n
                       for s, n in enumerate(state["skipped_by_source"])]
            taken: collections.deque = collections.deque()
            records = core.OrderedMap(self.loader, self._items(state, streams, taken), executor=self.executor,
                                      window=core.window(self.batch_size, self._decoders),
                                      skipped=sum(decoded), max_consecutive_bad=core.MAX_CONSECUTIVE_BAD,
                                      logger=log)
            with records:
                while True:
                    rows = [next(records) for _ in range(self.batch_size)]  # [(item, (image, caption, -1))] * b
                    for item, _ in rows:
                        while taken[0][0] < item.t:  # slots the map skipped before this one
                            decoded[taken.popleft()[1]] += 1
                        counts = taken.popleft()[2]
                    batch = {
                        "image": np.stack([r[1][0] for r in rows]),  # [b, S, S, 3]
                        "text": np.asarray(self.tokenizer([r[1][1] for r in rows], self.context_length), np.int32),
                    }  # text: [b, C]
                    for s, stream in streams.items():
                        if counts[s] != stream_states[s]["sample"]:  # it gave slots in this batch
                            stream_states[s] = stream.state_after(counts[s] - 1)
                            stream.forget_through(counts[s] - 1)
                    by_source = [n + stream_states[s]["read_skipped"] if s in streams else n
                                 for s, n in enumerate(decoded)]
                    for s in streams:
                        stream_states[s]["skipped"] = by_source[s]
                    yield batch, {"sample": rows[-1][0].t + 1, "counts": list(counts), "skipped": sum(by_source),
                                  "skipped_by_source": by_source,
                                  "streams": {s: dict(st) for s, st in stream_states.items()}}
        finally:
            for stream in streams.values():
                stream.reader.close()

    # -------------------------------------------------------------------------------------------- state

    @property
    def skipped_by_source(self) -> dict[str, int]:
        """Samples skipped so far (up to the batches yielded), by source spec."""
        return dict(zip(self.specs, self._state["skipped_by_source"]))

    def get_state(self) -> dict:
        """JSON-able position after the last yielded batch (see the module docstring)."""
        s = self._state
        return {"version": STATE_VERSION, "kind": STATE_KIND, "sample": s["sample"], "counts": list(s["counts"]),
                "skipped": s["skipped"], "skipped_by_source": list(s["skipped_by_source"]),
                "streams": {self.specs[i]: self.streams[i].export_state(st) for i, st in s["streams"].items()},
                "specs": list(self.specs), "seed": self.seed, "process_index": self.process_index,
                "process_count": self.process_count, "shuffle_buffer": self.shuffle_buffer}

    def set_state(self, state: dict) -> None:
        """Continues from ``state`` (from ``get_state`` of an iterator with the same specs, seed, hosts and shuffle
        buffer; the weights may differ)."""
        core.check_state(state, self.get_state(), ("specs", "seed", "process_index", "process_count",
                                                   "shuffle_buffer"), what="a mix with wds: streams'", kind=STATE_KIND)
        counts, by_source = [int(c) for c in state["counts"]], [int(k) for k in state["skipped_by_source"]]
        saved = state.get("streams") or {}
        if (len(counts) != len(self.specs) or sum(counts) != state["sample"] or len(by_source) != len(self.specs)
                or sum(by_source) != state["skipped"] or set(saved) != {self.specs[s] for s in self.streams}):
            raise ValueError(f"inconsistent data iterator state: sample={state['sample']} counts={counts}, "
                             f"skipped={state['skipped']} by source {by_source}, streams {sorted(saved)}")
        streams = {}
        for s, member in self.streams.items():
            streams[s] = member.import_state(saved[self.specs[s]])
            if streams[s]["sample"] != counts[s] or streams[s]["skipped"] != by_source[s]:
                raise ValueError(f"inconsistent data iterator state: stream {self.specs[s]!r} gave "
                                 f"{streams[s]['sample']} samples and skipped {streams[s]['skipped']}, the mix counts "
                                 f"{counts[s]} and {by_source[s]}")
        self.close()
        self._state = {"sample": int(state["sample"]), "counts": counts, "skipped": int(state["skipped"]),
                       "skipped_by_source": by_source, "streams": streams}
