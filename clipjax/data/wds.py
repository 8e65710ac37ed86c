"""Webdataset shards streamed in place as training data: the ``wds:PATTERN`` spec.

    wds:/data/shards/{00000..00099}.tar       a brace pattern: ``{A..B}`` numeric ranges (zero-padded as written) and
                                              ``{x,y}`` alternatives, expanded in order (at most MAX_SHARD_NAMES,
                                              10^6 names, counted before any is made)
    wds:/data/shards                          a directory: every ``*.tar`` in it, sorted by name
    wds:/data/shards/*.tar                    a glob, sorted; ``wds:/data/shards/00000.tar``: one shard
    wds:gs://bucket/laion/{00000..41455}.tar  the same on a filesystem of fsspec (gs://, s3://, ...), read through
                                              fsspec and its implementation (gcsfs, s3fs, ...), imported only then

A shard holds img2dataset's samples: consecutive members ``KEY.jpg|jpeg|png|webp`` with ``KEY.txt`` (the caption)
or ``KEY.json`` (its ``caption`` field), grouped and read by the rules of ``clipjax.data.wds_names`` (``member_key``,
``sample_image_ext``, ``sample_captions``). Shards are read front to back in one pass (``tarfile`` stream mode: no
seeks, no index), so a remote shard is one sequential download.

The stream of one host (P hosts), a source of the training slots (``clipjax.data.slots``: a mix draws which slots
are a stream's; a stream alone has them all):

    shards     shard i of the listing is this host's when i mod P == process_index (fewer shards than hosts is
               refused); in epoch e the host reads them in the order ``permutation_e`` (from the seed, the host, e
               and, in a mix, the stream's place in it), epoch after epoch, without end
    shuffle    a buffer of K samples (``shuffle_buffer``): once full, the stream's n-th slot takes buffer[j_n], j_n
               uniform in [0, K) from (seed, host, n, the place in a mix), and the next sample read takes its place
    slot t     crop and caption from ``default_rng([seed, process_index, t])``, as for ArrayRecord sources: the same
               ``train_crop`` (uint8), tokenizer and batch format

Skipped and counted in ``skipped`` (the first reasons logged): a sample without an image member or without a
non-empty caption, an image member over 64 MiB (passed over unread), an image that does not decode or whose header
promises more pixels than PIL's decompression-bomb limit (never decoded), the member where a shard is truncated or
damaged (the samples before it are read, the rest of that shard is lost), and a shard that cannot be opened (deleted
since it was listed, an error of remote storage). When the first 4 shards a host reads (or all, if fewer) cannot be
opened and none could yet, the spec or the storage is wrong (a bucket, a path, credentials, the network): one
``DatasetError`` with the reason, at once rather than after retrying every shard; a store whose endpoint does not
answer at all is that error when the spec is listed (``clipjax.paths.check_reachable``), in seconds.

A stream's part of the resume state (``slots.TrainIterator.get_state``, JSON, under "streams" by spec): ``sample``
(the slots it gave); ``position`` [epoch, shard, member] (the next sample to read: its epoch, its shard's place in
that epoch's order, its index among the shard's samples); ``buffer``, the identity [epoch, shard, member] of each
buffered sample in buffer order; ``read_skipped`` (the skips counted while reading, part of the stream's
``skipped_by_source``) and ``shards``, the number listed. A restored stream re-reads the buffered samples from the
shards that hold them (each read up to its last buffered sample), then reads on from ``position``: its batches are
bit-identical to the uninterrupted stream's. A buffered sample whose shard has gone by then is skipped and counted,
its slot refilled from the stream. A spec that lists another number of shards than when the state was saved (a
directory that lost one) goes on from the start of the state's epoch, with a warning.

Reading the shards runs on the producer thread of this process; decoding on the executor of ``workers`` and
``num_threads`` as for ArrayRecord sources (worker processes get each sample's bytes, ``SampleItem``).
"""

from __future__ import annotations

import collections
import logging
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, NamedTuple

import numpy as np

from clipjax.data import core
from clipjax.data.wds_names import (  # noqa: F401  (re-exported)
    MAX_SHARD_NAMES,
    WDS_IMAGE_EXTS,
    _protocol,
    count_braces,
    expand_braces,
    iter_braces,
    member_key,
    open_shard,
    sample_captions,
    sample_image_ext,
    shard_urls,
)
from clipjax.data import sources as src_lib

log = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER = 1000
_BLOCK = 4096  # buffer choices drawn per generator
_LOG_FIRST = 10  # skips logged with their reason while reading (further ones are counted)
_FIRST_OPENS = 4  # shards that cannot be opened before any could: the spec or the storage is wrong, not a shard
MAX_MEMBER_BYTES = 64 << 20  # a larger tar member is passed over unread (ingest's --max-image-bytes default)

SampleId = tuple[int, int, int]  # (epoch, shard position in that epoch's order, sample index in the shard)


# ============================================================================================ tar reading

class ShardDamaged(Exception):
    """A shard that ends in damage (a truncated member, an unreadable header): the samples before it were read."""


def iter_groups(fileobj: IO[bytes], max_member_bytes: int = MAX_MEMBER_BYTES,
                ) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {extension: bytes}) of each run of consecutive members with one key (``wds_names.member_key``), in one
    pass; a member larger than ``max_member_bytes`` is passed over unread (its bytes: None). Raises ``ShardDamaged``
    where the tar is cut or unreadable, after the complete samples before the damage."""
    key, files = None, {}
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|")
        while (member := tar.next()) is not None:
            tar.members = []  # stream mode: keep no list of the members read
            parts = member_key(member.name) if member.isfile() else None
            if parts is None:
                continue
            if parts[0] != key:
                if key is not None:
                    yield key, files
                key, files = parts[0], {}
            files[parts[1]] = tar.extractfile(member).read() if member.size <= max_member_bytes else None
    except Exception as e:  # tarfile's errors, and remote storage's; it stops quietly at a cut header after the first
        where = f" in sample {key!r}" if key is not None else ""
        raise ShardDamaged(f"{' '.join(str(e).split())}{where}") from None
    if key is not None:
        yield key, files


def _image_and_captions(files: dict[str, bytes | None]) -> tuple[bytes, list[str]] | str:
    """(image bytes, non-empty captions) of a sample's members, or why it cannot be used."""
    ext = sample_image_ext(files)
    if ext is None:
        return f"no image member ({'/'.join(WDS_IMAGE_EXTS)})"
    if files[ext] is None:
        return f"image member .{ext} too large to read (over MAX_MEMBER_BYTES, {MAX_MEMBER_BYTES:,} bytes)"
    captions = [c for c in sample_captions(files.get("txt"), files.get("json")) if c and c.strip()]
    if not captions:
        return "no caption (.txt, or 'caption' in .json)"
    return files[ext], captions


class Sample(NamedTuple):
    id: SampleId
    where: str  # "SHARD:KEY", for messages
    image: bytes
    captions: list[str]


class ShardReader(Iterator[Sample]):
    """The usable samples of this host's shards in stream order (epoch after epoch, each in its shard order), from
    ``position`` on; the others are skipped and counted in ``skipped``. ``position`` is the next sample to read."""

    def __init__(self, spec: str, urls: Sequence[str], *, seed: int, process_index: int,
                 position: SampleId = (0, 0, 0), skipped: int = 0, key: tuple[int, ...] = ()):
        self.spec, self.urls, self.seed, self.process_index = spec, list(urls), seed, process_index
        self.key = tuple(key)  # (member,) for a stream in a mix: its own shard orders
        self.position, self.skipped = tuple(position), int(skipped)
        self._orders: dict[int, np.ndarray] = {}
        self._bad_run = self._logged = self._barren = 0
        self._unopened: list[str] | None = []  # why shards could not be opened before the first one was (then None)
        self._it = self._run()

    def order(self, epoch: int) -> np.ndarray:
        """This host's shards (indices into ``urls``) in their epoch-``epoch`` order: int [n]."""
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, 0x5EED, self.process_index, epoch, *self.key])
                            .permutation(len(self.urls))}
        return self._orders[epoch]

    def url(self, epoch: int, pos: int) -> str:
        return self.urls[int(self.order(epoch)[pos])]

    def skip(self, reason: str, *, quiet: bool = False) -> None:
        """Counts a skipped sample or shard (the first ``_LOG_FIRST`` logged with ``reason``, unless ``quiet``); too
        many in a row raise ``core.TooManyBadRecords``."""
        self.skipped += 1
        self._bad_run += 1
        if not quiet:
            self._log_skip(reason)
        if self._bad_run >= core.MAX_CONSECUTIVE_BAD:
            raise core.TooManyBadRecords(f"{self._bad_run} consecutive bad samples or shards; last: {reason}")

    def _log_skip(self, reason: str) -> None:
        if self._logged < _LOG_FIRST:
            self._logged += 1
            more = " (further skips are counted, not logged)" if self._logged == _LOG_FIRST else ""
            log.warning("skipping %s%s", reason, more)

    def _cannot_open(self, url: str, error: Exception) -> None:
        """A shard that cannot be opened: skipped and counted. While none has been opened yet, the skip is logged
        only once one is; ``_FIRST_OPENS`` such shards (or all of them, if fewer) raise one ``DatasetError`` with
        the reason: a wrong bucket or path, missing credentials or no network, not one lost shard."""
        reason = f"shard {url}: cannot be opened ({type(error).__name__}: {' '.join(str(error).split())})"
        if self._unopened is None:
            self.skip(reason)
            return
        self._unopened.append(reason)
        self.skip(reason, quiet=True)
        if len(self._unopened) >= min(len(self.urls), _FIRST_OPENS):
            where = "the path, the bucket and the credentials" if _protocol(url) else "the path"
            raise src_lib.DatasetError(f"dataset {self.spec!r}: the first {len(self._unopened)} shards this host "
                                       f"read cannot be opened; check {where} (last: {reason})")

    def _opened(self) -> None:
        """A shard opened: the open failures before it were single shards after all, logged now."""
        if self._unopened is not None:
            for reason in self._unopened:
                self._log_skip(reason)
            self._unopened = None

    def _shard(self, epoch: int, pos: int, start: int) -> Iterator[Sample]:
        """The usable samples of shard ``pos`` of epoch ``epoch`` from sample ``start`` on."""
        url = self.url(epoch, pos)
        try:
            f = open_shard(url)
        except Exception as e:  # deleted since it was listed, or an error of remote storage
            self._cannot_open(url, e)
            return
        self._opened()
        with f:
            groups = iter_groups(f)
            try:
                for index, (key, files) in enumerate(groups):
                    if index < start:
                        continue
                    self.position = (epoch, pos, index + 1)
                    got = _image_and_captions(files)
                    if isinstance(got, str):
                        self.skip(f"sample {key!r} of {url}: {got}")
                        continue
                    self._bad_run = self._barren = 0
                    yield Sample((epoch, pos, index), f"{url}:{key}", *got)
            except ShardDamaged as e:
                self.skip(f"shard {url}: truncated or damaged ({e}); the samples before the damage were read")
            finally:
                groups.close()

    def _run(self) -> Iterator[Sample]:
        epoch, pos, start = self.position
        while True:
            while pos < len(self.urls):
                self._barren += 1
                yield from self._shard(epoch, pos, start)
                if self._barren >= 2 * len(self.urls):  # a whole epoch of shards without a usable sample
                    raise src_lib.DatasetError(
                        f"dataset {self.spec!r}: none of this host's {len(self.urls)} shards holds a usable sample "
                        f"(missing, damaged, or no image with a caption; the first reasons are logged above)")
                pos, start = pos + 1, 0
            epoch, pos = epoch + 1, 0

    def __next__(self) -> Sample:
        return next(self._it)

    def fetch(self, ids: Iterable[SampleId]) -> dict[SampleId, Sample]:
        """The samples ``ids`` read again from their shards (each up to its last wanted sample), nothing counted; an
        id whose shard or sample is gone is missing from the result."""
        wanted: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
        for epoch, pos, index in ids:
            wanted[(epoch, pos)].add(index)
        found: dict[SampleId, Sample] = {}
        for (epoch, pos), indices in sorted(wanted.items()):
            url, last = self.url(epoch, pos), max(indices)
            try:
                f = open_shard(url)
            except Exception:  # gone: its samples are missing
                continue
            with f:
                groups = iter_groups(f)
                try:
                    for index, (key, files) in enumerate(groups):
                        got = _image_and_captions(files) if index in indices else None
                        if isinstance(got, tuple):
                            found[(epoch, pos, index)] = Sample((epoch, pos, index), f"{url}:{key}", *got)
                        if index >= last:
                            break
                except ShardDamaged:
                    pass
                finally:
                    groups.close()
        return found

    def close(self) -> None:
        """Closes the shard being read."""
        self._it.close()


# ============================================================================================ shuffled slots

class SampleStream(Iterator[tuple[int, Sample]]):
    """Slots (t, sample) of the shuffle buffer over ``reader``, and the resume state after any slot not yet
    forgotten: each slot is journalled (buffer place, sample taken out, reader position and skips after it), so the
    state after slot t is the current buffer with the later slots undone."""

    def __init__(self, reader: ShardReader, *, size: int, seed: int, process_index: int, sample: int):
        self.reader, self.size, self.seed, self.process_index = reader, size, seed, process_index
        self.key = reader.key
        self.t = int(sample)
        self.slots: list[Sample] = []
        self._journal: collections.deque = collections.deque()  # (t, j, id taken out, position, read skips)
        self._block, self._choices = -1, np.zeros(0, np.int64)

    def restore(self, ids: Sequence[SampleId]) -> None:
        """Refills the buffer with the samples ``ids`` (in buffer order), read again from their shards; a sample
        that is gone is skipped and counted, its place taken by the next sample read."""
        found = self.reader.fetch(ids)
        for i in ids:
            if i not in found:
                self.reader.skip(f"buffered sample {list(i)}: no longer in {self.reader.url(i[0], i[1])}")
        self.slots = [found[i] if i in found else next(self.reader) for i in ids]

    def _choice(self, t: int) -> int:
        if t // _BLOCK != self._block:
            self._block = t // _BLOCK
            rng = np.random.default_rng([self.seed, 0xB0F, self.process_index, self._block, *self.key])
            self._choices = rng.integers(0, self.size, _BLOCK)
        return int(self._choices[t % _BLOCK])

    def __next__(self) -> tuple[int, Sample]:
        while len(self.slots) < self.size:
            self.slots.append(next(self.reader))
        t, j = self.t, self._choice(self.t)
        out = self.slots[j]
        self.slots[j] = next(self.reader)
        self._journal.append((t, j, out.id, self.reader.position, self.reader.skipped))
        self.t += 1
        return t, out

    def state_after(self, t: int) -> dict:
        """{"sample", "position", "buffer", "read_skipped"} as they were right after slot ``t`` was taken."""
        ids = [s.id for s in self.slots]
        for u, j, taken, position, read_skipped in reversed(self._journal):
            if u == t:
                return {"sample": t + 1, "position": list(position), "buffer": [list(i) for i in ids],
                        "read_skipped": read_skipped}
            ids[j] = taken
        raise KeyError(f"slot {t} is not in the journal")

    def forget_through(self, t: int) -> None:
        """Drops the journal of slots up to ``t`` (their state is no longer asked for)."""
        while self._journal and self._journal[0][0] <= t:
            self._journal.popleft()


# ============================================================================================ the source

class SampleItem(NamedTuple):
    """One slot's work for the training loader (``slots.TrainLoader``): plain data, picklable for worker processes."""

    t: int
    where: str
    image: bytes
    captions: list[str]

    def __repr__(self) -> str:  # named in errors without its bytes
        return f"SampleItem(t={self.t}, {self.where})"


class Stream:
    """A ``wds:`` source of a host's training slots (``slots.TrainIterator``): this host's shards of ``spec`` and the
    shuffle buffer over them. ``key`` is () for a stream read alone, (s,) for source s of a mix: it keys the shard
    orders and buffer choices, so two streams of a mix are shuffled independently.

    Its part of the resume state (``state``) is {"sample", "position", "buffer", "read_skipped", "shards"}: see the
    module docstring."""

    def __init__(self, spec: str, *, seed: int, process_index: int, process_count: int, shuffle_buffer: int,
                 key: tuple[int, ...] = ()):
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 (1: stream order), got {shuffle_buffer}")
        self.urls = shard_urls(spec)
        if len(self.urls) < process_count:
            raise src_lib.DatasetError(
                f"dataset {spec!r} has {len(self.urls)} shards, fewer than {process_count} hosts: each host reads "
                f"whole shards (shard i goes to host i mod {process_count}); write the data in more shards")
        self.spec, self.seed, self.process_index, self.process_count = spec, seed, process_index, process_count
        self.shuffle_buffer, self.key = int(shuffle_buffer), tuple(key)
        self.start = {"sample": 0, "position": [0, 0, 0], "buffer": [], "read_skipped": 0}

    def reader(self, state: dict | None = None) -> ShardReader:
        """This host's shard reader at ``state``'s position (the start by default)."""
        state = state or self.start
        return ShardReader(self.spec, self.urls[self.process_index :: self.process_count], seed=self.seed,
                           process_index=self.process_index, position=tuple(state["position"]),
                           skipped=state["read_skipped"], key=self.key)

    def stream(self, state: dict | None = None) -> SampleStream:
        """The shuffled slots from ``state`` on (the start by default), its buffer restored."""
        state = state or self.start
        stream = SampleStream(self.reader(state), size=self.shuffle_buffer, seed=self.seed,
                              process_index=self.process_index, sample=state["sample"])
        stream.restore([tuple(i) for i in state["buffer"]])
        return stream

    def state(self, s: dict) -> dict:
        """The saved form of the internal state ``s``."""
        return {"sample": s["sample"], "position": list(s["position"]), "buffer": [list(i) for i in s["buffer"]],
                "read_skipped": s["read_skipped"], "shards": len(self.urls)}

    def restore(self, saved: dict, *, sample: int, skipped: int) -> dict:
        """The internal state of ``saved`` (``state``'s form) after ``sample`` slots of this stream and ``skipped``
        samples skipped in all (checked). When the spec now lists another number of shards (a directory that lost
        one), the stream goes on from the start of the saved epoch, with a warning: positions in the old listing mean
        nothing."""
        position, buffer = list(saved["position"]), [list(i) for i in saved["buffer"]]
        if (len(position) != 3 or len(buffer) not in (0, self.shuffle_buffer) or any(len(i) != 3 for i in buffer)
                or not 0 <= saved["read_skipped"] <= skipped or saved["sample"] != sample):
            raise ValueError(f"inconsistent data iterator state of {self.spec!r}: position={position}, {len(buffer)} "
                             f"buffered samples for a buffer of {self.shuffle_buffer}, {saved['sample']} slots given "
                             f"(the mix counts {sample}), skipped={skipped} read_skipped={saved['read_skipped']}")
        if saved.get("shards") != len(self.urls):  # shards assigned and ordered otherwise: positions mean nothing
            log.warning("dataset %r lists %d shards, %s when its state was saved: the stream goes on from the start "
                        "of epoch %d, not from the exact sample", self.spec, len(self.urls), saved.get("shards"),
                        position[0])
            position, buffer = [position[0], 0, 0], []
        return {"sample": int(sample), "position": [int(p) for p in position],
                "buffer": [[int(v) for v in i] for i in buffer], "read_skipped": int(saved["read_skipped"])}
