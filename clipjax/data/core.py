"""The one data engine: an ordered, record-skipping parallel map, and a background prefetcher.

Every clipjax loader (training batches, eval batches, ImageFolders) is the same loop::

    work items ──► executor runs fn(item) ──► results in input order ──► batches
                   (a bounded window in flight)  (bad records skipped, counted)

``OrderedMap(fn, items, executor=threads(n), window=w)`` keeps at most ``w`` items submitted and not yet
yielded, yields ``(item, fn(item))`` in the order of ``items`` (finite or infinite), and turns a record that
``fn`` rejects with ``BadRecord(reason)`` into a skip: counted in ``skipped``, the first ``log_first`` logged
with their reason, and ``max_consecutive_bad`` skips in a row raise ``TooManyBadRecords`` with the last reason.
Any other exception from ``fn`` is a bug, not a bad record: it ends the map and reaches the caller. Results
depend only on ``fn`` and the items, never on the executor or the window, so batches are identical for any
number of threads.

Executors (``clipjax.data.workers``, re-exported here). An executor factory takes ``fn`` once and returns an
``Executor`` (``submit(item) -> Future``, ``close()``): ``threads(n)`` runs ``fn`` on ``n`` threads of this process,
``processes(n, t)`` in ``n`` worker processes (fresh interpreters without JAX) of ``t`` threads each.

``Prefetcher(make_iterator, depth)`` runs an iterator on a background thread and keeps ``depth`` of its items
ready (finished batches ahead of the training step); errors reach the consumer on its next ``next()``.

``close()`` on any of them stops everything it started: pending work is cancelled, threads are joined and worker
processes are ended and reaped.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from clipjax.data.workers import (  # noqa: F401  (re-exported: the executors are part of the engine's interface)
    BadRecord,
    DataWorkerError,
    Executor,
    ExecutorFactory,
    ProcessExecutor,
    RecordFn,
    ThreadExecutor,
    TooManyBadRecords,
    make_executor,
    processes,
    threads,
    worker_main,
)

log = logging.getLogger(__name__)


# ============================================================================================ ordered map

class OrderedMap(Iterator[tuple[Any, Any]]):
    """``(item, fn(item))`` for each good item of ``items``, in input order; bad records skipped and counted.

    ``window``: items in flight (submitted, not yet yielded). ``skipped``: the count to start from (a resumed
    stream keeps counting). Closed on exhaustion, on error, by ``close()`` or as a context manager.
    """

    def __init__(self, fn: RecordFn, items: Iterable[Any], *, executor: ExecutorFactory, window: int,
                 skipped: int = 0, max_consecutive_bad: int = 1000, log_first: int = 10,
                 logger: logging.Logger = log):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.skipped, self.window = int(skipped), int(window)
        self.max_consecutive_bad, self.log_first, self._log = max_consecutive_bad, log_first, logger
        self._items = iter(items)
        self._executor: Executor | None = executor(fn)
        self._pending: collections.deque[tuple[Any, cf.Future]] = collections.deque()
        self._bad_run = 0
        self._logged = 0

    def _fill(self) -> None:
        while len(self._pending) < self.window:
            try:
                item = next(self._items)
            except StopIteration:
                return
            self._pending.append((item, self._executor.submit(item)))

    def _skip(self, reason: str) -> None:
        self.skipped += 1
        self._bad_run += 1
        if self._logged < self.log_first:
            self._logged += 1
            more = " (further skips are counted, not logged)" if self._logged == self.log_first else ""
            self._log.warning("skipping %s%s", reason, more)
        if self._bad_run >= self.max_consecutive_bad:
            raise TooManyBadRecords(f"{self._bad_run} consecutive bad records; last: {reason}")

    def __next__(self) -> tuple[Any, Any]:
        if self._executor is None:
            raise StopIteration
        try:
            while True:
                self._fill()
                if not self._pending:
                    raise StopIteration
                item, future = self._pending.popleft()
                try:
                    result = future.result()
                except BadRecord as e:
                    self._skip(str(e))
                    continue
                self._bad_run = 0
                return item, result
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Cancels the work in flight and stops the executor (joins its threads). Idempotent."""
        executor, self._executor = self._executor, None
        if executor is not None:
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()
            executor.close()

    def __enter__(self) -> OrderedMap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ============================================================================================ prefetch

_DONE = object()


class Prefetcher(Iterator[Any]):
    """The items of ``make_iterator()``, produced on a daemon thread up to ``depth`` ahead of the consumer.

    The iterator is created and closed on that thread (``close()`` of a generator runs its ``finally``, so an
    ``OrderedMap`` inside it is closed too). An exception in the producer is raised by the next ``next()``.
    """

    def __init__(self, make_iterator: Callable[[], Iterator[Any]], *, depth: int, name: str = "clipjax-prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = threading.Thread(
            target=self._produce, args=(make_iterator,), daemon=True, name=name)
        self._thread.start()

    def _put(self, value: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self, make_iterator: Callable[[], Iterator[Any]]) -> None:
        it = None
        try:
            it = make_iterator()
            for value in it:
                if not self._put((value, None)):
                    return
            self._put((_DONE, None))
        except BaseException as e:  # handed to the consumer
            self._put((None, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # the consumer already has the first error, or stopped
                    log.debug("closing the prefetched iterator failed", exc_info=True)

    def __next__(self) -> Any:
        if self._thread is None:
            raise StopIteration
        value, error = self._queue.get()
        if error is not None or value is _DONE:
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        return value

    def close(self) -> None:
        """Stops the producer thread and waits for it (and for what it started). Idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            # At interpreter exit (a finalizer) the daemon producer may be frozen mid-call: joining it would hang.
            thread.join(timeout=0 if sys.is_finalizing() else None)


class PrefetchedBatches:
    """The iterator protocol of a resumable batch stream: `_batches(state)` yields (batch, state after it) and runs on
    a `Prefetcher` started at the first `next`; `close()` stops it and the next `next` restarts from the last yielded
    batch. Subclasses set `self._state` (a dict with "skipped") and `self.prefetch`."""

    _state: dict
    prefetch: int
    _prefetcher: Prefetcher | None = None

    def _batches(self, state: dict) -> Iterator[tuple[Any, dict]]:
        raise NotImplementedError

    def close(self) -> None:
        """Stops the background threads and worker processes (the iterator can be resumed: the next batch restarts
        them)."""
        prefetcher, self._prefetcher = self._prefetcher, None
        if prefetcher is not None:
            prefetcher.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __iter__(self):
        return self

    def __next__(self):
        if self._prefetcher is None:
            state = dict(self._state)
            self._prefetcher = Prefetcher(lambda: self._batches(state), depth=self.prefetch,
                                          name="clipjax-data-producer")
        try:
            batch, after = next(self._prefetcher)
        except BaseException:
            self.close()
            raise
        self._state = after
        return batch

    @property
    def skipped(self) -> int:
        """Bad records skipped so far (up to the batches yielded)."""
        return self._state["skipped"]


# ============================================================================================ training batches

@runtime_checkable
class TrainData(Protocol):
    """The training data the trainer's loop reads (``clipjax.train``): every per-host training iterator
    (``pipeline.make_train_iterator``'s, ``synthetic.SyntheticIterator``, ``phases.PhasedData`` around them).

    ``next()`` is the next per-host batch ({field: array}); ``get_state()`` the JSON-able position after the last
    batch yielded, which ``set_state`` continues from (an iterator of other data refuses it with a ValueError);
    ``skipped`` counts the bad records skipped up to that batch, ``skipped_by_source`` the same by source spec for a
    mix ({} for one source); ``sources`` are the random-access sources read (their sizes known; [] when there are
    none, or streams among them); ``close()`` stops the threads and worker processes (the next ``next()`` starts
    them again, from the position). ``step_batch`` is None, or (synthetic data) a traceable ``k → global batch k``
    that the train step calls to make its own batch, ``next()`` then yielding an empty one."""

    sources: list
    step_batch: Callable[[Any], dict] | None

    def __iter__(self) -> Iterator[dict]: ...

    def __next__(self) -> dict: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...

    @property
    def skipped(self) -> int: ...

    @property
    def skipped_by_source(self) -> dict[str, int]: ...

    def close(self) -> None: ...


BLOCK = 4096  # slots whose sources (or a stream's buffer choices) one generator draws
MAX_CONSECUTIVE_BAD = 1000  # bad records in a row that end a training stream (TooManyBadRecords)

Tokenizer = Callable[[Sequence[str], int], Any]  # texts, context length → int32 [N, C]


def window(batch_size: int, decoders: int) -> int:
    """Records in flight: two batches, and enough to keep every decoding thread (of every worker) busy."""
    return max(2 * batch_size, 8 * decoders)


def executor_for(executor: ExecutorFactory | None, workers: int, num_threads: int, name: str
              ) -> tuple[ExecutorFactory, int]:
    """(the executor factory, the number of decoding threads in all) for ``workers``/``num_threads``."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: threads in this process), got {workers}")
    return executor or make_executor(workers, num_threads, name), max(1, workers) * num_threads

