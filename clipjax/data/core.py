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

Executors. An executor factory takes ``fn`` once and returns an ``Executor`` (``submit(item) -> Future``,
``close()``). ``threads(n)`` runs ``fn`` on ``n`` threads of this process (PIL and NumPy release the GIL).
A process executor plugs in the same way: it ships ``fn`` to each worker once (e.g. as the initializer
argument of a ``ProcessPoolExecutor``) and ``item``/result per call, so ``fn`` and the items must be picklable
or reconstructible in a worker: ``fn`` is a small "loader" object holding specs, split and sizes that opens
its readers on first use in each process (and drops them when pickled), never a closure over open readers;
items are plain tuples of ints; results are arrays and strings.

``Prefetcher(make_iterator, depth)`` runs an iterator on a background thread and keeps ``depth`` of its items
ready (finished batches ahead of the training step); errors reach the consumer on its next ``next()``.

``close()`` on either stops everything it started: pending work is cancelled and the threads are joined.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

log = logging.getLogger(__name__)

RecordFn = Callable[[Any], Any]


class BadRecord(Exception):
    """Raised by a record function for a record to skip; the message names the record (spec, key or index) and
    why it is bad."""


class TooManyBadRecords(RuntimeError):
    """Too many consecutive bad records: the data, not a few records, is broken."""


# ============================================================================================ executors

class Executor(Protocol):
    """Runs one record function on work items."""

    def submit(self, item: Any) -> cf.Future:
        """Schedules ``fn(item)``; the future holds its result or exception."""

    def close(self) -> None:
        """Cancels what has not started, waits for what has, and releases the workers."""


ExecutorFactory = Callable[[RecordFn], Executor]


class ThreadExecutor:
    """``fn`` on ``num_threads`` threads of this process."""

    def __init__(self, fn: RecordFn, *, num_threads: int, name: str = "clipjax-data"):
        self._fn = fn
        self._pool = cf.ThreadPoolExecutor(max(1, num_threads), thread_name_prefix=name)

    def submit(self, item: Any) -> cf.Future:
        return self._pool.submit(self._fn, item)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def threads(num_threads: int, name: str = "clipjax-data") -> ExecutorFactory:
    """The factory of a ``ThreadExecutor`` with ``num_threads`` threads named ``name_<i>``."""
    return functools.partial(ThreadExecutor, num_threads=max(1, num_threads), name=name)


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
            thread.join()
