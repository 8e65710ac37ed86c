"""Executors of record functions: threads of this process, or worker processes of their own.

An executor factory takes ``fn`` once and returns an ``Executor`` (``submit(item) -> Future``, ``close()``).
``threads(n)`` runs ``fn`` on ``n`` threads of this process (PIL and NumPy release the GIL). ``processes(n, t)`` runs
it in ``n`` worker processes of ``t`` threads each, for hosts where one GIL is the limit (``ProcessExecutor``): ``fn``
is pickled once to each worker and ``item``/result per call, so ``fn`` and the items must be picklable and importable
by module name (not defined in ``__main__``): ``fn`` is a small "loader" object holding specs, split and sizes that
opens its readers on first use in each process (and drops them when pickled), never a closure over open readers;
items are plain tuples of ints; results are arrays and strings. ``close()`` stops everything the executor started:
pending work is cancelled, threads are joined and worker processes are ended and reaped.

Worker processes (``ProcessExecutor``). Each is a fresh interpreter (``sys.executable``; never a fork of this
process, which may hold JAX's threads and devices) that imports only ``clipjax.data`` modules: the ``clipjax``
package is entered without running its ``__init__`` (which imports JAX), so a worker costs ~0.5 s to start and
holds no JAX. Its lifetime is tied to two pipes: tasks in, results out. It ends when the tasks pipe closes, which is
also what happens when this process dies in any way (``close()``, an exception, SIGTERM, Ctrl-C, SIGKILL), and when
it sees its parent change (orphaned). It ignores SIGINT and SIGTERM, which a terminal (Ctrl-C) or a scheduler
(preemption) may send to the whole process group: the parent handles them, e.g. saves a checkpoint, and the workers
keep serving it until it closes them or exits. A worker that dies (crash, ``os._exit``, the out-of-memory killer)
fails every pending and later ``submit`` with one ``DataWorkerError`` naming the worker, its exit status or signal
and the item it was working on: the map stops with that error rather than waiting for results that will never come.

This module imports nothing of clipjax: a worker process starts from it alone.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import functools
import itertools
import logging
import multiprocessing.connection as mpc
import os
import pathlib
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

RecordFn = Callable[[Any], Any]

class BadRecord(Exception):
    """Raised by a record function for a record to skip; the message names the record (spec, key or index) and
    why it is bad."""


class TooManyBadRecords(RuntimeError):
    """Too many consecutive bad records: the data, not a few records, is broken."""


class DataWorkerError(RuntimeError):
    """A data worker process died or could not start; the input pipeline cannot go on."""



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


def processes(num_workers: int, threads_per_worker: int = 1, name: str = "clipjax-data") -> ExecutorFactory:
    """The factory of a ``ProcessExecutor``: ``num_workers`` processes of ``threads_per_worker`` threads each."""
    return functools.partial(ProcessExecutor, num_workers=max(1, num_workers),
                             threads_per_worker=max(1, threads_per_worker), name=name)


def make_executor(workers: int, num_threads: int, name: str = "clipjax-data") -> ExecutorFactory:
    """``threads(num_threads)`` when ``workers`` is 0, else ``processes(workers, num_threads)``."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: threads in this process), got {workers}")
    return processes(workers, num_threads, name) if workers else threads(num_threads, name)


# ============================================================================================ worker processes

_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parents[1])  # the clipjax package folder
_WORKER_MAIN = """\
import sys, types
package = types.ModuleType("clipjax")  # the package without its __init__, which imports JAX
package.__path__ = [sys.argv[1]]
sys.modules["clipjax"] = package
from clipjax.data import workers
workers.worker_main(int(sys.argv[2]), int(sys.argv[3]))
"""
_ORPHAN_CHECK_S = 1.0


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process (set as its ``__cause__``)."""

    def __init__(self, text: str):
        super().__init__(text)

    def __str__(self) -> str:
        return "\n" + self.args[0]


def _portable_error(error: BaseException) -> tuple[BaseException, str]:
    """(the exception, or a RuntimeError naming it when it does not survive pickling; its traceback text)."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        pickle.loads(pickle.dumps(error))
        return error, text
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}"), text


def _write_all(fd: int, parts: list) -> None:
    """Writes every byte of ``parts`` (bytes-like) to ``fd``, however the pipe splits them."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _read_into(fd: int, view: memoryview) -> None:
    """Fills ``view`` from ``fd``; EOFError when the pipe closes first (the writer died)."""
    while len(view):
        n = os.readv(fd, [view])
        if n == 0:
            raise EOFError("pipe closed")
        view = view[n:]


def _read(fd: int, size: int) -> bytearray:
    buf = bytearray(size)
    _read_into(fd, memoryview(buf))
    return buf


_HEAD = struct.Struct("<QQ")  # pickle length, number of out-of-band buffers; then one <Q length per buffer


def encode_message(obj: Any) -> list:
    """``obj`` as the parts ``send_message`` writes: pickle protocol 5 with arrays out of band, so that their bytes
    are written from where they lie and read straight into the receiving array (no intermediate copies)."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = _HEAD.pack(len(data), len(raws)) + struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
    return [head, data, *raws]


def send_message(fd: int, obj: Any) -> None:
    """Writes ``obj`` to pipe ``fd`` (``recv_message`` reads it)."""
    _write_all(fd, encode_message(obj))


def recv_message(fd: int) -> Any:
    """The next object ``send_message`` wrote to pipe ``fd``; EOFError when the pipe closed."""
    size, count = _HEAD.unpack(_read(fd, _HEAD.size))
    lengths = struct.unpack(f"<{count}Q", _read(fd, 8 * count)) if count else ()
    data = _read(fd, size)
    return pickle.loads(data, buffers=[_read(fd, n) for n in lengths])


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_ORPHAN_CHECK_S)
    os._exit(0)


def worker_main(task_fd: int, result_fd: int) -> None:
    """A worker process: reads (sys.path, threads, pickled fn), then (id, item) tasks until the pipe closes, and
    answers each with (id, True, fn(item)) or (id, False, (exception, traceback)); a failed start is answered
    with id None. Results are sent from the worker's threads as they finish, in any order."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # sent to the whole process group too: the parent decides
        signal.signal(sig, signal.SIG_IGN)
    sys.stdout = sys.stderr  # the parent's stdout may be a protocol (JSON lines)
    tasks = mpc.Connection(task_fd, writable=False)
    lock = threading.Lock()
    parent = os.getppid()
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()

    def answer(task_id: Any, ok: bool, payload: Any) -> None:
        try:
            parts = encode_message((task_id, ok, payload))
        except Exception as e:  # an unpicklable result
            parts = encode_message((task_id, False, _portable_error(e)))
        with lock:
            _write_all(result_fd, parts)

    try:
        sys_path, num_threads, blob = tasks.recv()
        sys.path[:] = sys_path
        fn = pickle.loads(blob)
    except EOFError:
        os._exit(0)
    except BaseException as e:  # reported to the parent, which raises it
        answer(None, False, _portable_error(e))
        os._exit(1)

    def run(task_id: int, item: Any) -> None:
        try:
            result = fn(item)
        except BaseException as e:  # BadRecord, or a bug: the parent decides
            answer(task_id, False, _portable_error(e))
            return
        answer(task_id, True, result)

    pool = cf.ThreadPoolExecutor(num_threads, thread_name_prefix="clipjax-worker")
    while True:
        try:
            task = tasks.recv()
        except (EOFError, OSError):
            break
        pool.submit(run, *task)
    os._exit(0)  # without waiting for work in flight: nobody will read it


def _exit_cause(returncode: int | None) -> str:
    if returncode is None:
        return "closed its pipe but is still running; it was killed"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        oom = " (killed: out of memory, or by someone)" if -returncode == signal.SIGKILL else ""
        return f"signal {-returncode}, {name}{oom}"
    return f"exit status {returncode}"


_F_SETPIPE_SZ = 1031  # Linux fcntl: a pipe's buffer size
_PIPE_BYTES = 1 << 20  # room for a few 224-px images: a result goes through in one write, not in 64 KiB steps


def _widen(fd: int) -> None:
    """Grows the pipe's buffer where the system allows (Linux, up to /proc/sys/fs/pipe-max-size)."""
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, OSError):  # not Linux, or above the limit for unprivileged users: the default works too
        pass


class _Worker:
    """One worker process and its two pipes."""

    def __init__(self, index: int, init: tuple[list[str], int, bytes]):
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        _widen(result_r)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_MAIN, _PACKAGE_DIR, str(task_r), str(result_w)],
                pass_fds=(task_r, result_w), stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            for fd in (task_r, task_w, result_r, result_w):
                os.close(fd)
            raise
        os.close(task_r)
        os.close(result_w)
        self.index = index
        self.tasks = mpc.Connection(task_w, readable=False)
        self.results = result_r  # raw fd: ``recv_message``
        self.pending: dict[int, tuple[Any, cf.Future]] = {}  # task id → (item, future)
        self.send_lock = threading.Lock()
        try:
            self.tasks.send(init)
        except OSError:  # died at once; its pipe tells the collector
            pass

    def describe(self) -> str:
        return f"data worker process {self.index} (pid {self.proc.pid})"


class ProcessExecutor:
    """``fn`` in ``num_workers`` worker processes of ``threads_per_worker`` threads each (see the module docstring).

    A task goes to the worker with the fewest tasks in flight; results come back on one collector thread.
    ``pids``: the worker processes' ids.
    """

    def __init__(self, fn: RecordFn, *, num_workers: int, threads_per_worker: int = 1, name: str = "clipjax-data",
                 close_timeout_s: float = 5.0):
        init = (list(sys.path), max(1, threads_per_worker), pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL))
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._error: str | None = None
        self._closed = False
        self._close_timeout_s = close_timeout_s
        self._workers: list[_Worker] = []
        try:
            for i in range(max(1, num_workers)):
                self._workers.append(_Worker(i, init))
        except BaseException:
            self._stop_workers()
            for w in self._workers:
                os.close(w.results)
            raise
        self._collector = threading.Thread(target=self._collect, daemon=True, name=f"{name}-results")
        self._collector.start()
        _OPEN_EXECUTORS.add(self)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    # -------------------------------------------------------------------------------------------- submit

    def submit(self, item: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("submit on a closed ProcessExecutor")
            if self._error is not None:
                future.set_exception(DataWorkerError(self._error))
                return future
            task_id = next(self._ids)
            worker = min(self._workers, key=lambda w: len(w.pending))
            worker.pending[task_id] = (item, future)
        try:
            with worker.send_lock:
                worker.tasks.send((task_id, item))
        except OSError:  # the worker is gone: the collector sees its pipe close and fails the futures
            pass
        return future

    # -------------------------------------------------------------------------------------------- results

    def _collect(self) -> None:
        """Collector thread: routes each answer to its future; a closed results pipe is a dead worker."""
        live = {w.results: w for w in self._workers}  # results fd → worker
        while live:
            for fd in mpc.wait(list(live)):
                worker = live[fd]
                try:
                    answer = recv_message(fd)
                except (EOFError, OSError):
                    del live[fd]
                    self._lost(worker)
                    continue
                except Exception as e:  # a result that does not unpickle here
                    self._fail(f"{worker.describe()} sent a result this process cannot read: "
                               f"{type(e).__name__}: {e}")
                    continue
                self._deliver(worker, *answer)

    def _deliver(self, worker: _Worker, task_id: int | None, ok: bool, payload: Any) -> None:
        if task_id is None:  # the worker could not start: its error is everybody's
            error, text = payload
            log.error("%s could not start:\n%s", worker.describe(), text)
            self._fail(f"{worker.describe()} could not start: {type(error).__name__}: {error}")
            return
        with self._lock:
            _, future = worker.pending.pop(task_id, (None, None))
        if future is None:
            return
        try:
            if ok:
                future.set_result(payload)
            else:
                error, text = payload
                if not isinstance(error, BadRecord):
                    error.__cause__ = _RemoteTraceback(text)
                future.set_exception(error)
        except cf.InvalidStateError:  # cancelled meanwhile
            pass

    def _lost(self, worker: _Worker) -> None:
        """``worker``'s results pipe closed: expected while closing, otherwise it died."""
        if self._closed:
            return
        try:
            returncode = worker.proc.wait(timeout=self._close_timeout_s)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            returncode = None
        with self._lock:
            doing = [repr(item) for item, _ in worker.pending.values()]
        where = ""
        if doing:
            shown = ", ".join(doing[:4]) + (f" and {len(doing) - 4} more" if len(doing) > 4 else "")
            where = f" while working on {shown}" if len(doing) == 1 else f" while working on one of {shown}"
        self._fail(f"{worker.describe()} died ({_exit_cause(returncode)}){where}; the input pipeline cannot go on "
                   f"(a record that crashes the decoder, or too little memory for the workers)")

    def _fail(self, message: str) -> None:
        """Fails every pending and later submit with ``DataWorkerError(message)``; the first failure wins."""
        with self._lock:
            if self._error is None:
                self._error = message
            message = self._error
            pending = [f for w in self._workers for _, f in w.pending.values()]
            for w in self._workers:
                w.pending.clear()
        for future in pending:
            try:
                future.set_exception(DataWorkerError(message))
            except cf.InvalidStateError:
                pass

    # -------------------------------------------------------------------------------------------- close

    def _stop_workers(self) -> None:
        """Closes the task pipes (each worker exits), waits for the workers, kills any that do not exit."""
        for w in self._workers:
            w.tasks.close()
        for w in self._workers:
            try:
                w.proc.wait(timeout=self._close_timeout_s)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                try:
                    w.proc.wait(timeout=self._close_timeout_s)
                except subprocess.TimeoutExpired:  # unkillable for now (in the kernel): not worth a hang
                    log.warning("%s did not end after SIGKILL", w.describe())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = [f for w in self._workers for _, f in w.pending.values()]
            for w in self._workers:
                w.pending.clear()
        for future in pending:
            future.cancel()
        self._stop_workers()
        # The collector ends as soon as the workers' result pipes close. Never wait on it without bound: close() also
        # runs from atexit (where sys.is_finalizing() is still False) and from finalizers, where daemon threads may
        # be frozen mid-call; an exit must not turn into a hang.
        self._collector.join(timeout=0 if sys.is_finalizing() else self._close_timeout_s)
        if not self._collector.is_alive():
            for w in self._workers:
                os.close(w.results)
        elif not sys.is_finalizing():
            log.warning("the result collector of data workers %s did not end within %.0f s of closing them",
                        self.pids, self._close_timeout_s)


_OPEN_EXECUTORS: weakref.WeakSet[ProcessExecutor] = weakref.WeakSet()


@atexit.register
def _close_open_executors() -> None:
    """Interpreter exit (an uncaught exception, Ctrl-C, sys.exit): ends the workers of executors left open, each
    within its close timeout (killed after it), while this process's threads can still run."""
    for executor in list(_OPEN_EXECUTORS):
        try:
            executor.close()
        except Exception:
            log.debug("closing a data executor at exit failed", exc_info=True)
