"""One training run per workdir: a lock file `WORKDIR/.lock` held by the run's process 0 from start-up to exit.

Two trainers on one workdir would write the same checkpoint steps and metrics rows over each other (and orbax's
start-up removes the other run's checkpoint in progress), so a second run is refused with one line naming the
holder (host, pid, start time) and how to proceed. The lock holds JSON: host, boot id, pid namespace, pid, process
start time, a random token, start time and a heartbeat timestamp.

Local disk (also NFS): an exclusive `flock` on the file, which the kernel releases when the holder dies (even by
`kill -9`); a file left with a dead holder's record is taken over with a warning naming it. Where `flock` is not
supported, the object-store protocol below is used on the file instead.

Object stores (gs://): the lock object is created only if absent (a generation precondition, atomic in the store),
or, where the client cannot do that, written and read back after a pause: a later writer's token wins and the other
run is refused. A daemon thread refreshes the heartbeat every `HEARTBEAT_S` seconds and checks that the token is
still this run's. A lock is stale, and taken over with a warning, when its holder is known dead:
    same host and boot, same pid namespace: the pid is not running (or runs another process, by its start time);
    same host name, another boot id: the machine was restarted;
    otherwise: its heartbeat is older than `STALE_S` seconds.

Only process 0 of a multi-process run takes the lock; the others learn its outcome from one collective, so every
process of a refused run stops with the same error. The lock is removed at exit, normal or not (SIGTERM, errors).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from clipjax import paths
from clipjax.checkpoint import CheckpointError, check_supported, check_writable

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0  # the holder refreshes its heartbeat this often
STALE_S = 300.0  # a lock of another host whose heartbeat is older than this is taken over
SETTLE_S = 2.0  # written-then-read-back locks: the pause before reading back (a later writer wins)


class WorkdirLockedError(CheckpointError):
    """The workdir is in use by another training run (or its lock cannot be taken)."""


# ============================================================================================ identity

def _read_first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The start time of process `pid` in clock ticks since boot ("" when unknown): tells a reused pid apart."""
    stat = _read_first_line(f"/proc/{pid}/stat")
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _me(token: str) -> dict[str, Any]:
    now = time.time()
    return {"host": socket.gethostname(), "boot": _read_first_line("/proc/sys/kernel/random/boot_id"),
            "pidns": _pid_namespace(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "token": token, "started": now, "heartbeat": now}


def _pid_running(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it runs
    return not start or not _process_start(pid) or _process_start(pid) == start


def stale_reason(holder: dict[str, Any], now: float | None = None, stale_s: float = STALE_S) -> str | None:
    """Why the lock of `holder` is stale (its run is gone), or None while it may still run."""
    now = time.time() if now is None else now
    me = _me("")
    same_host = holder.get("host") == me["host"]
    if same_host and holder.get("boot") and me["boot"] and holder["boot"] != me["boot"]:
        return "its host was restarted since"
    if same_host and holder.get("boot") == me["boot"] and holder.get("pidns") == me["pidns"]:
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid == os.getpid() or not _pid_running(pid, str(holder.get("pid_start", ""))):
            return f"process {pid} is no longer running"
        return None
    beat = holder.get("heartbeat")
    if not isinstance(beat, (int, float)):
        return "it holds no heartbeat"
    if now - beat > stale_s:
        return f"its last heartbeat was {now - beat:.0f} s ago (more than {stale_s:.0f} s)"
    return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a run whose lock could not be read"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"


def _parse(data: bytes | None) -> dict[str, Any] | None:
    try:
        holder = json.loads(data) if data else None
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


# ============================================================================================ storage

class _File:
    """The lock as a whole file or object: create-if-absent, read, overwrite, delete."""

    def __init__(self, path: paths.Path):
        self.path = path
        self.remote = paths.is_remote(path)

    def create(self, data: bytes) -> bool | None:
        """Write `data` only if there is no lock: True if written, False if one exists, None if the storage cannot
        create atomically (the caller writes and reads back)."""
        if not self.remote:
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                tmp.write_bytes(data)
                os.link(tmp, self.path)  # atomic; fails if the lock exists
                return True
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    return None  # no hard links here
                raise
            finally:
                tmp.unlink(missing_ok=True)
        import fsspec

        fs, key = fsspec.core.url_to_fs(str(self.path))
        with paths.storage_errors(self.path, "write"):
            try:
                fs.pipe_file(key, data, mode="create")  # gcsfs: ifGenerationMatch=0
            except FileExistsError:
                return False
            except TypeError:  # a client without exclusive writes
                return None
        return True

    def read(self) -> bytes | None:
        try:
            with paths.storage_errors(self.path, "read"):
                return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def write(self, data: bytes) -> None:
        paths.write_text(self.path, data.decode())

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError), paths.storage_errors(self.path, "delete"):
            self.path.unlink()


# ============================================================================================ the lock

class WorkdirLock:
    """The lock of one workdir; `acquire()` raises WorkdirLockedError naming the holder, `release()` removes it."""

    def __init__(self, workdir: str | os.PathLike, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 settle_s: float = SETTLE_S):
        self.workdir = paths.as_path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
        self.token = uuid.uuid4().hex
        self.record = _me(self.token)
        self.lost: str | None = None  # set when another run took the lock over while this one held it
        self._fd: int | None = None  # local: the flock'ed file
        self._by_heartbeat = False  # the lock is a file or object judged by its holder's pid and heartbeat
        self._file = _File(self.path)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------------------------- acquire

    def acquire(self) -> None:
        if not paths.is_remote(self.path) and self._acquire_flock():
            return
        self._acquire_file()
        self._thread = threading.Thread(target=self._beat, name="clipjax-workdir-lock", daemon=True)
        self._thread.start()

    def _refuse(self, holder: dict[str, Any] | None) -> WorkdirLockedError:
        how = ("wait for it to finish or stop it (SIGTERM checkpoints and exits), or train in another --workdir")
        if holder and self._by_heartbeat and holder.get("host") != self.record["host"]:
            how += (f"; if that run is gone, its lock is taken over once its heartbeat is {self.stale_s:.0f} s old, "
                    f"or delete {self.path}")
        return WorkdirLockedError(f"workdir {self.workdir} is in use by another training run ({_describe(holder)}): "
                                  f"{how}")

    def _acquire_flock(self) -> bool:
        """Local disk: True once this process holds the flock; False where flock is not supported."""
        import fcntl

        for _ in range(20):  # the file may be replaced between open and lock by a releasing run: retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._refuse(self._read_holder()) from None
                if e.errno in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                    log.info("%s: flock is not supported here (%s); using a lock file with a heartbeat", self.path,
                             e.strerror)
                    return False
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # removed by the run that held it, after we opened it: lock the new file
                os.close(fd)
                continue
            previous = _parse(os.pread(fd, 1 << 16, 0))
            if previous and previous.get("token") != self.token:
                log.warning("took over the stale lock %s of an earlier run (%s): it is no longer running", self.path,
                            _describe(previous))
            data = json.dumps(self.record).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            self._fd = fd
            return True
        raise WorkdirLockedError(f"workdir {self.workdir}: could not lock {self.path} (it keeps being replaced)")

    def _read_holder(self) -> dict[str, Any] | None:
        """The holder's record; retried briefly, as a run that just took the lock may not have written it yet."""
        for _ in range(10):
            holder = _parse(self._file.read())
            if holder:
                return holder
            time.sleep(0.1)
        return None

    def _acquire_file(self) -> None:
        self._by_heartbeat = True
        data = json.dumps(self.record).encode()
        for _ in range(5):
            created = self._file.create(data)
            if created:
                return
            raw = self._file.read()
            if raw is not None:
                holder = _parse(raw)
                reason = stale_reason(holder, stale_s=self.stale_s) if holder else self._unreadable_stale()
                if reason is None:
                    raise self._refuse(holder)
                log.warning("taking over the stale lock %s (%s): %s", self.path, _describe(holder), reason)
            elif created is False:
                continue  # released in between: try again
            self._file.write(data)  # over a stale lock, or where the store cannot create exclusively
            time.sleep(self.settle_s)
            now = _parse(self._file.read())
            if not now or now.get("token") != self.token:  # a run that wrote after this one holds it
                raise self._refuse(now)
            return
        raise WorkdirLockedError(f"workdir {self.workdir}: could not take the lock {self.path}")

    def _unreadable_stale(self) -> str | None:
        try:
            with paths.storage_errors(self.path, "read"):
                age = time.time() - self.path.stat().st_mtime
        except (OSError, AttributeError):
            return None
        return f"it is unreadable and {age:.0f} s old" if age > self.stale_s else None

    # -------------------------------------------------------------------------------------------- heartbeat

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = _parse(self._file.read())
                if not holder or holder.get("token") != self.token:
                    self.lost = f"another run ({_describe(holder)}) took over its lock {self.path}"
                    log.error("workdir %s: %s; this run and that one now write the same workdir", self.workdir,
                              self.lost)
                    return
                self.record["heartbeat"] = time.time()
                self._file.write(json.dumps(self.record).encode())
            except OSError as e:  # a passing storage failure: the next beat tries again
                log.warning("could not refresh the lock %s: %s", self.path, e)

    # -------------------------------------------------------------------------------------------- release

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._fd is not None:
            try:
                os.unlink(self.path)  # while still locked: a waiting run re-checks the file it locked
            except OSError as e:
                log.warning("could not remove the lock %s: %s", self.path, e.strerror or e)
            finally:
                os.close(self._fd)
                self._fd = None
            return
        if self.lost is None:
            try:
                holder = _parse(self._file.read())
                if holder and holder.get("token") == self.token:
                    self._file.delete()
            except OSError as e:
                log.warning("could not remove the lock %s: %s", self.path, e)


# ============================================================================================ for train()

@contextlib.contextmanager
def held(workdir: paths.Path) -> Iterator[WorkdirLock | None]:
    """The workdir's lock for the duration of a training run: taken by process 0 (after checking that the checkpoint
    directory is writable), the outcome shared with every process, released at exit. Raises WorkdirLockedError on
    every process when another run holds it."""
    import jax

    from clipjax.checkpoint import _allgather_json

    check_supported(workdir)
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            check_writable(paths.as_path(workdir) / "checkpoints")
            lock = WorkdirLock(workdir)
            lock.acquire()
        except OSError as e:  # the lock file itself cannot be written or read
            error = WorkdirLockedError(f"workdir {workdir}: cannot take the lock {lock.path if lock else workdir}: "
                                       f"{getattr(e, 'strerror', None) or e}")
            lock = None
        except Exception as e:  # noqa: BLE001 — reported on every process below
            lock, error = None, e
    messages = _allgather_json(None if error is None else str(error))
    if error is not None:
        raise error
    if messages[0] is not None:
        raise WorkdirLockedError(messages[0])
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
    if lock is not None and lock.lost:
        raise WorkdirLockedError(f"workdir {workdir}: {lock.lost} during this run: check its checkpoints")
