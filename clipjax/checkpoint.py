"""Checkpoints with orbax: async saves, keep-N, atomic writes, verified restores onto any mesh.

A checkpoint step is a directory `<dir>/<step>` with three items:

    state   the train state pytree (params, optimizer state, step, rng, ...), each process writing its shards
    data    the JSON state of every process's input iterator, {"process_count": P, "per_process": [s_0, ...]},
            so a resumed run sees exactly the batches it would have seen
    meta    a fingerprint of every array of `state` (a sharding-independent 32-bit hash of its bits, per leaf)

Guarantees:
- Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a crash (even `kill -9`
  during an async write) never leaves a half-written step that looks complete; leftovers are removed on the next save.
- A state holding NaN or Inf is never written (`save` raises `NonFiniteStateError`).
- `restore` checks the fingerprint, so truncated, deleted or bit-flipped files are detected. A damaged step is
  reported, moved aside to `<step>.corrupt` (so the step number can be written again) and the previous step is used.
- Write failures (unwritable directory, disk full, quota) raise `CheckpointError` naming the step and the steps
  still on disk; earlier checkpoints are never deleted before a newer one is complete: `keep` is applied by clipjax
  (`_retain`), after a save's write returned and its step is complete in storage, not by orbax's max_to_keep
  (which deletes from its finalize thread, counting a step still in flight). A step being deleted first loses its
  completeness mark, so a deletion cut short never leaves a step that looks complete.

On gs:// (orbax writes the arrays through tensorstore's GCS driver, the rest through `etils.epath`) there is no
atomic rename: orbax writes a step in place and marks it complete with `<step>/commit_success.txt` last; a step
without that marker is never listed nor restored, and is removed when that step is written again. An unreachable
store (credentials, network, a missing bucket) is a `CheckpointError` naming the directory. s3:// is refused:
orbax-checkpoint writes arrays only to local paths and gs://.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax import paths

log = logging.getLogger(__name__)

FORMAT = 1
ITEMS = ("state", "data", "meta")
CORRUPT_SUFFIX = ".corrupt"
DELETING_SUFFIX = ".deleting"  # an old step being deleted (local disk): renamed first, so never half a step
COMMIT_FILE = "commit_success.txt"  # orbax's completeness marker of a step written in place (gs://)
# Storage-layer error texts that mean "the environment refused the write" (not a bug in the caller) → a short cause.
_IO_ERRORS = {"No space left": "No space left on device", "Read-only file system": "Read-only file system",
              "Permission denied": "Permission denied", "Disk quota": "Disk quota exceeded",
              "Operation not permitted": "Operation not permitted", "Input/output error": "Input/output error",
              "File too large": "File too large", "RESOURCE_EXHAUSTED": "storage resources exhausted",
              "PERMISSION_DENIED": "Permission denied", "UNAUTHENTICATED": "not authenticated (credentials)",
              "UNAVAILABLE": "storage service unavailable", "DEADLINE_EXCEEDED": "storage request timed out"}


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be written, a failed save, or no readable checkpoint."""


class NonFiniteStateError(CheckpointError, FloatingPointError):
    """The state to save holds NaN or Inf values; it is not written."""


# ============================================================================================ fingerprint

def _path_name(path: tuple) -> str:
    """("params", "visual", ...) from a key path of a dict, dataclass, list or namedtuple, as "params/visual/..."."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _words(x: jax.Array) -> jax.Array:
    """The bits of each element as uint32 (same shape; 64-bit values fold their two halves)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
        return halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x27D4EB2F))
    unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_hash(x: jax.Array) -> jax.Array:
    """Order- and sharding-independent hash: sum over elements of mix(bits, global flat index), mod 2^32."""
    w = _words(x)
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):  # flat index from broadcasted iotas: no reshape, so no resharding
        index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2 ** 32)
        stride *= w.shape[d]
    h = (w ^ (index * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    return jnp.sum(h, dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.array(True)


def _replicated_like(leaves: list) -> NamedSharding | None:
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, P())
    return None


def _hash_all(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    return jnp.stack([_leaf_hash(x) for x in leaves]), jnp.stack([_finite(x) for x in leaves])  # [n_leaves] each


@functools.lru_cache(maxsize=16)
def _hash_all_jit(out: NamedSharding | None):
    return jax.jit(_hash_all, out_shardings=(out, out) if out is not None else None)


def fingerprint(tree: Any) -> dict[str, tuple[str, str, bool]]:
    """{leaf path: (dtype, 8-hex-digit hash, all finite)} for every array of `tree` (computed on device)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = [_path_name(p) for p, _ in flat]
    leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
    if not leaves:
        return {}
    hashes, finite = jax.device_get(_hash_all_jit(_replicated_like(leaves))(leaves))  # [n_leaves] each
    return {n: (str(x.dtype), f"{int(h):08x}", bool(f)) for n, x, h, f in zip(names, leaves, hashes, finite)}


# ============================================================================================ multi-process helpers

def _allgather_json(obj: Any) -> list[Any]:
    """`obj` of every process, in process order (one small collective; a no-op with one process)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    longest = int(np.max(multihost_utils.process_allgather(np.int32(raw.size))))
    size = 1 << max(10, (longest - 1).bit_length())  # bucketed, so the gather rarely recompiles
    buf = np.zeros(size, np.uint8)
    buf[:raw.size] = raw
    rows = multihost_utils.process_allgather(buf)  # [P, size]
    return [json.loads(bytes(r).rstrip(b"\0")) for r in np.asarray(rows)]


def _all_processes(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _chain(e: BaseException | None):
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _reason(e: BaseException) -> str:
    """A one-line cause: an OS error in the chain, else a known storage error, else the first line of the message."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
        for marker, short in _IO_ERRORS.items():
            if marker in str(x):
                return short
    inner = list(_chain(e))[-1]  # the storage layer's own message is the most specific
    lines = str(inner).strip().splitlines()
    text = lines[0][:240] if lines else ""
    return text if text.split(":")[0].isupper() else f"{type(inner).__name__}: {text}"


def _is_io_failure(e: BaseException) -> bool:
    return any(isinstance(x, OSError) or any(m in str(x) for m in _IO_ERRORS) for x in _chain(e))


def check_supported(directory: str | os.PathLike) -> None:
    """Refuse a checkpoint directory that orbax cannot write arrays to (an object store other than gs://)."""
    if paths.scheme(directory) == "s3":
        raise CheckpointError(f"checkpoint directory {directory}: orbax-checkpoint writes arrays only to local paths "
                              f"and gs://; use a gs:// or local (or mounted) workdir")


def check_writable(directory: str | os.PathLike) -> None:
    """Create `directory` and write, sync and delete a probe file in it (root ignores permission bits, so only a real
    write tells a read-only mount or a full disk apart). On an object store, a probe object is written and deleted:
    credentials, network and bucket are checked before anything else is written."""
    check_supported(directory)
    directory = paths.as_path(directory)
    if paths.is_remote(directory):
        _check_writable_remote(directory)
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{jax.process_index()}-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"clipjax")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"checkpoint directory {directory} is not writable: {e.strerror or e}") from None


def _check_writable_remote(directory) -> None:
    probe = directory / f".write-probe-{jax.process_index()}-{os.getpid()}"
    try:
        with paths.storage_errors(directory, "write to"):
            probe.write_bytes(b"clipjax")
            probe.unlink()
    except OSError as e:  # a StorageError, or FileNotFoundError for a bucket that does not exist
        raise CheckpointError(f"checkpoint directory {directory} is not writable: {_remote_reason(e, directory)}") \
            from None


def _remote_reason(e: OSError, directory) -> str:
    return paths.describe(e.__cause__ if isinstance(e, paths.StorageError) and e.__cause__ else e, directory)


# ============================================================================================ checkpointer

class _ReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _read_only_notice_dropped():
    """Orbax warns "Given directory is read only=DIR" whenever a manager opens read-only, which clipjax does on
    purpose (evaluating or exporting a workdir): keep that warning off the console."""
    logger, notice = logging.getLogger("absl"), _ReadOnlyNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class Checkpointer:
    """Saves and restores train states (+ input iterator states) in `directory`, one sub-directory per step."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = paths.as_path(directory)
        if not paths.is_remote(self.directory):
            self.directory = self.directory.absolute()
        self.read_only = read_only
        check_supported(self.directory)
        with self._reachable():
            if read_only:
                if not self.directory.is_dir():
                    raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
            else:
                check_writable(self.directory)
            # read-only: the values orbax would otherwise set itself, with a warning each. Old steps are deleted
            # by `_retain`, not by orbax's max_to_keep (see there)
            options = ocp.CheckpointManagerOptions(max_to_keep=None,
                                                   save_interval_steps=0 if read_only else 1,
                                                   enable_async_checkpointing=async_save,
                                                   create=not read_only, read_only=read_only)
            with _read_only_notice_dropped():
                self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self.keep = None if read_only else keep
        self.async_save = async_save
        self.verified = ""  # what the last restore checked, in words ("fingerprints verified: all 42 arrays match")
        self._pending: int | None = None  # step of the save that may still be in flight
        self._failed = False  # a failed write was reported (orbax keeps re-raising it)
        if not read_only:
            self._remove_leftovers()

    @contextlib.contextmanager
    def _reachable(self):
        """A failure of the object store's client (credentials, network) as a CheckpointError naming the directory;
        local directories are left to the callers' own checks."""
        try:
            with paths.storage_errors(self.directory):
                yield
        except paths.StorageError as e:
            raise CheckpointError(f"checkpoint directory {self.directory}: {_remote_reason(e, self.directory)}") \
                from None

    # -------------------------------------------------------------------------------------------- save

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Write `state` and this process's `data_state` as `step` (asynchronously if configured).

        All processes must call it. Returns False when the manager's policy skips the step (not `force`).
        Raises NonFiniteStateError if `state` holds NaN/Inf, CheckpointError if this or the previous async write
        failed.
        """
        self.wait()
        leaves = fingerprint(state)
        bad = [name for name, (_, _, finite) in leaves.items() if not finite]
        if bad:
            raise NonFiniteStateError(f"refusing to checkpoint step {step}: {bad[0]} holds NaN or Inf "
                                      f"({len(bad)} arrays in all)")
        data = {"process_count": jax.process_count(), "per_process": _allgather_json(data_state or {})}
        meta = {"format": FORMAT, "step": int(step), "leaves": {n: [d, h] for n, (d, h, _) in leaves.items()}}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                                  meta=ocp.args.JsonSave(meta))
        try:
            saved = self.manager.save(step, args=args, force=force)
        except Exception as e:
            if not _is_io_failure(e):
                raise
            raise CheckpointError(f"writing checkpoint step {step} to {self.directory} failed ({_reason(e)}); "
                                  f"steps on disk: {self._steps_on_disk()}") from e
        if saved:
            self._pending = step
            if not self.async_save:
                self.wait()  # retention of the steps before it
        return saved

    def wait(self) -> None:
        """Block until an in-flight async save is committed; raise CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            if not _is_io_failure(e):
                raise
            self._failed = True
            raise CheckpointError(f"writing checkpoint step {self._pending} to {self.directory} failed "
                                  f"({_reason(e)}); steps on disk: {self._steps_on_disk()}") from e
        if self._pending is not None:
            step, self._pending = self._pending, None
            self._retain(step)

    # -------------------------------------------------------------------------------------------- retention

    def _retain(self, newest: int) -> None:
        """Delete the steps beyond the `keep` newest, once step `newest` is complete in storage.

        Orbax's own max_to_keep is not used: it counts a step whose asynchronous write is still in flight and deletes
        older steps from its finalize thread, which on an object store (no atomic rename, a step is written in place)
        leaves a window in which the older steps are going or gone while the newer one is not complete. Here a step
        is deleted only after the write of `newest` returned without error and its directory, commit marker and items
        are in storage; a step being deleted loses its completeness mark first (gs://: the commit marker; local: the
        directory is renamed), so a deletion cut short never leaves a step that looks complete."""
        if self.keep is None:
            return
        if jax.process_index() == 0:
            try:
                with paths.storage_errors(self.directory, "delete old steps in"):
                    complete = self._steps_on_disk()
                    if newest in complete and self._items_complete(newest):
                        for s in [s for s in complete[:-self.keep] if s < newest]:
                            self._delete(s)
                    else:
                        log.warning("checkpoint step %d is not complete in %s after its write: older steps kept",
                                    newest, self.directory)
            except OSError as e:  # the run goes on; older steps are deleted after a later save
                log.warning("could not delete old checkpoints in %s: %s", self.directory, e.strerror or e)
        ocp.multihost.sync_global_processes(f"clipjax_retain_{newest}")
        self.manager.reload()

    def _items_complete(self, step: int) -> bool:
        d = self.directory / str(step)
        if not all((d / item).is_dir() for item in ITEMS) or not (d / "state" / "_METADATA").exists():
            return False
        return not paths.is_remote(d) or all((d / item / COMMIT_FILE).exists() for item in ITEMS)

    def _delete(self, step: int) -> None:
        src = self.directory / str(step)
        if paths.is_remote(src):
            (src / COMMIT_FILE).unlink()  # first: from now on the step is not listed
            src.rmtree(missing_ok=True)
            if src.exists():  # orbax does the same: a directory placeholder can hold up the first pass
                src.rmtree(missing_ok=True)
        else:
            dst = self.directory / f"{step}{DELETING_SUFFIX}"
            if dst.exists():
                shutil.rmtree(dst)
            src.rename(dst)
            shutil.rmtree(dst)
        log.info("deleted checkpoint step %d (keeping the newest %d)", step, self.keep)

    def _remove_leftovers(self) -> None:
        """Process 0, at start-up: remove what deletions cut short left (`<step>.deleting` directories; on gs://,
        step directories without their commit marker that are older than a complete step)."""
        if jax.process_index() != 0:
            return
        try:
            with paths.storage_errors(self.directory, "list"):
                names = [p.name for p in self.directory.iterdir()]
                complete = self._steps_on_disk()
                for name in names:
                    path = self.directory / name
                    cut_short = name.endswith(DELETING_SUFFIX) and name[:-len(DELETING_SUFFIX)].isdigit()
                    if paths.is_remote(path):  # on gs://: a step without its marker, older than a complete one
                        cut_short = name.isdigit() and bool(complete) and int(name) < complete[-1] \
                            and int(name) not in complete
                    if not cut_short:
                        continue
                    if paths.is_remote(path):
                        path.rmtree(missing_ok=True)
                    else:
                        shutil.rmtree(path)
                    log.info("removed %s (a deletion of an old checkpoint step that was cut short)", path)
        except OSError as e:
            log.warning("could not clean up %s: %s", self.directory, e.strerror or e)

    def close(self) -> None:
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001 — the failure was reported by wait()
                log.debug("closing the checkpoint manager: %s", e)

    # -------------------------------------------------------------------------------------------- listing

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def _steps_on_disk(self) -> list[int]:
        """Complete steps in the directory (on gs://, those whose commit marker was written)."""
        try:
            with paths.storage_errors(self.directory, "list"):
                return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and self._complete(p))
        except OSError:
            return []

    def _complete(self, step_dir) -> bool:
        """A local step directory is complete once renamed to its number; a gs:// one once its marker is written."""
        return not paths.is_remote(step_dir) or (step_dir / COMMIT_FILE).exists()

    # -------------------------------------------------------------------------------------------- restore

    def restore(self, abstract_state: Any | None = None, step: int | None = None) -> tuple[int, Any, dict] | None:
        """Restore the newest readable step (or `step`) onto the shardings of `abstract_state`.

        Returns (step, state, data_state of this process) or None when there is no checkpoint. Without
        `abstract_state` arrays keep their saved shardings when the devices exist, else land on one local device.
        A newest step that fails to read or to match its fingerprint is reported, moved aside to
        `<step>.corrupt`, and the one before it is tried; CheckpointError if none is readable.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        damaged: list[int] = []
        last_error = ""
        for s in candidates:
            try:
                state, data, meta = self._read(s, abstract_state)
                problem, verified = self._verify(state, meta)
                if meta is None and self._expects_fingerprints(s):
                    problem = "its fingerprints (the meta item) are missing"
                error = None
            except Exception as e:  # noqa: BLE001 — any read failure means this step is unusable
                state = data = None
                problem, error = _reason(e), e
            if not _all_processes(problem is None):
                problem = problem or "unreadable on another process"
            if problem is None:
                if damaged:
                    self._quarantine(damaged)
                self.verified = verified
                return s, state, self._local_data_state(data, s)
            if step is not None:
                raise CheckpointError(f"checkpoint step {s} in {self.directory} is unusable: {problem}") from error
            log.warning("checkpoint step %d in %s is unusable (%s); trying the previous one", s, self.directory,
                        problem)
            damaged.append(s)
            last_error = problem
        if candidates:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: steps {candidates} are all unusable "
                                  f"(last: {last_error})")
        return None

    def _read(self, s: int, abstract_state: Any | None) -> tuple[Any, dict, dict | None]:
        if abstract_state is not None:
            state_args = ocp.args.StandardRestore(abstract_state)
        else:  # saved shardings if their devices exist here, else one local device
            state_args = ocp.args.StandardRestore(
                fallback_sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        items = {"state": state_args, "data": ocp.args.JsonRestore()}
        has_meta = (self.directory / str(s) / "meta").is_dir()
        if has_meta:
            items["meta"] = ocp.args.JsonRestore()
        out = self.manager.restore(s, args=ocp.args.Composite(**items))
        return out["state"], dict(out["data"] or {}), (dict(out["meta"]) if has_meta else None)

    @staticmethod
    def _verify(state: Any, meta: dict | None) -> tuple[str | None, str]:
        """(problem, what was checked): problem None if every restored array whose path and dtype were saved has
        its saved fingerprint; what was checked in words, for the log."""
        if meta is None:
            return None, "not verified: the step holds no fingerprints"
        saved = meta.get("leaves", {})
        restored = fingerprint(state)
        checked = 0
        for name, (dtype, digest, finite) in restored.items():
            if name not in saved or saved[name][0] != dtype:
                continue  # restored into another dtype or structure: nothing to compare
            checked += 1
            if saved[name][1] != digest:
                return f"{name} does not match its saved fingerprint", ""
            if not finite:
                return f"{name} holds NaN or Inf", ""
        if saved and not checked:
            log.warning("restored state shares no array path with the saved fingerprints; not verified")
            return None, "not verified: the restored state shares no array with the saved fingerprints"
        if checked == len(restored) == len(saved):
            return None, f"fingerprints verified: all {checked} arrays match"
        return None, (f"fingerprints verified: {checked} of {len(restored)} restored arrays match ({len(saved)} saved; "
                      f"the others were restored into another dtype or structure)")

    def _expects_fingerprints(self, step: int) -> bool:
        """Whether `step` was written with fingerprints: its orbax metadata lists the meta item, or another step of
        the directory has one (a step without them is then damaged, not of an older format)."""
        try:
            with paths.storage_errors(self.directory, "read"):
                record = json.loads(paths.read_text(self.directory / str(step) / "_CHECKPOINT_METADATA"))
            if "meta" in (record.get("item_handlers") or {}):
                return True
        except (OSError, ValueError, AttributeError):
            pass  # no readable orbax metadata: judged by the other steps
        try:
            with paths.storage_errors(self.directory, "list"):
                return any((self.directory / str(s) / "meta").is_dir() for s in self._steps_on_disk() if s != step)
        except OSError:
            return False

    def _quarantine(self, steps: list[int]) -> None:
        """Move damaged steps aside so their step numbers can be written again (kept for inspection)."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            for s in steps:
                src = self.directory / str(s)
                dst = self.directory / f"{s}{CORRUPT_SUFFIX}-{time.strftime('%Y%m%d-%H%M%S')}"
                try:
                    with paths.storage_errors(src, "move"):  # in a store: copied, then deleted
                        src.rename(dst)
                    log.warning("moved damaged checkpoint step %d to %s", s, dst)
                except OSError as e:
                    log.warning("could not move damaged checkpoint step %d aside: %s", s, e.strerror or e)
        ocp.multihost.sync_global_processes(f"clipjax_quarantine_{'_'.join(map(str, steps))}")
        self.manager.reload()

    @staticmethod
    def _local_data_state(data: dict, step: int) -> dict:
        """This process's input iterator state from the `data` item."""
        if "per_process" not in data:
            return data  # a single state shared by all processes
        states, n = data["per_process"], jax.process_count()
        if len(states) == n:
            return dict(states[jax.process_index()])
        if all(s == states[0] for s in states):
            return dict(states[0])
        log.warning("checkpoint step %d was written by %d processes, this run has %d: the input pipeline cannot "
                    "continue from the saved position and starts from its first batch", step, len(states), n)
        return {}
