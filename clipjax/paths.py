"""Paths of workdirs, checkpoints, metrics and model files: local paths and object stores (gs://, s3://) alike.

`as_path(p)` is the one constructor: a local path stays a `pathlib.Path` (local behaviour is exactly that of
pathlib and `os`), a `gs://` or `s3://` URI becomes an `etils.epath.Path`, which reads and writes through fsspec
(gcsfs: `pip install 'clipjax[gcs]'`; s3fs: `'clipjax[s3]'`). Both have the same pathlib methods (`/`, `exists`,
`is_dir`, `iterdir`, `mkdir`, `read_text`, `write_bytes`, `unlink`, `rename`, ...).

What object stores cannot do, and what is done instead:
- append to an object or rename it atomically: an object is written whole, in one upload, and appears only when the
  upload completed (`write_object`), so a reader never sees a half-written file;
- hand a local file name to libraries that need one (safetensors, the torch pickle reader, TensorBoard's writer):
  `local_copy` downloads an object into a temporary file, `upload_file` uploads one;
- keep directories: a "directory" exists while objects under it exist; `mkdir` does nothing.

Failures of the object store's client (no credentials, network down, permission denied, a missing bucket, gcsfs
not installed) are raised as `StorageError`, an OSError whose one-line message names the path. Before the first
request to a store, its endpoint is probed once per process (`check_reachable`: one HTTP request, at most
`PROBE_TIMEOUT_S` seconds): an endpoint that does not answer (no network, a name that does not resolve, a refused
connection) is one `StorageError` within seconds, not after the client's retries (about 30 s per request).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from etils import epath

_REMOTE = re.compile(r"^(gs|s3):/+")  # also "gs:/b/x": what pathlib makes of "gs://b/x"
# Modules of the object-store clients: their exceptions are storage failures, not bugs of the caller.
_CLIENT_MODULES = ("gcsfs", "s3fs", "fsspec", "google", "aiohttp", "requests", "urllib3", "botocore", "aiobotocore")
_CLIENTS = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}  # scheme → (fsspec package, clipjax extra)
PROBE_TIMEOUT_S = 5.0  # how long the first probe of an object store's endpoint may take
PROBE_AGAIN_S = 60.0  # a failed probe is repeated after this long (an answer is kept for the process's life)
_probed: dict[str, tuple[BaseException | None, float]] = {}  # endpoint URL → (why it cannot be reached, when)
_probe_lock = threading.Lock()

Path = Union[pathlib.Path, "epath.Path"]  # epath is imported (at run time) only for remote paths


class StorageError(OSError):
    """An object store that refused or failed a request (credentials, network, permissions, missing bucket)."""


def scheme(path: str | os.PathLike) -> str | None:
    """"gs" or "s3" for an object-store URI, None for a local path."""
    match = _REMOTE.match(os.fspath(path))
    return match.group(1) if match else None


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object in a store (gs://, s3://) rather than a local file."""
    return scheme(path) is not None


def as_path(path: str | os.PathLike) -> Path:
    """`path` as a `pathlib.Path` (local) or an `etils.epath.Path` (gs://, s3://)."""
    kind = scheme(path)
    if kind is None:
        return pathlib.Path(path)
    from etils import epath

    _no_listing_cache(kind)
    _quiet_client_tracebacks()
    return epath.Path(_REMOTE.sub(f"{kind}://", os.fspath(path), count=1))


def _no_listing_cache(kind: str) -> None:
    """Listings are read fresh: checkpoints are written by tensorstore and by other processes, which fsspec's
    directory cache would not see (a user's own fsspec setting is kept)."""
    import fsspec.config

    for protocol in ({"gs": ("gs", "gcs"), "s3": ("s3", "s3a")}[kind]):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


class _NoTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _quiet_client_tracebacks() -> None:
    """gcsfs and s3fs log a traceback for a request that failed for good; clipjax reports that failure itself, in one
    line naming the path, so only their message is kept (all of it with CLIPJAX_DEBUG=1)."""
    if os.environ.get("CLIPJAX_DEBUG", "") not in ("", "0"):
        return
    for name in ("gcsfs", "s3fs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTraceback) for f in logger.filters):
            logger.addFilter(_NoTraceback())


# ============================================================================================ errors

def _from_client(e: BaseException) -> bool:
    """Whether `e` (or an exception it was raised from) comes from an object-store client or the network; clipjax's
    own errors never do."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen and not type(e).__module__.startswith("clipjax"):
        seen.add(id(e))
        if isinstance(e, (OSError, ImportError, TimeoutError)) or type(e).__module__.startswith(_CLIENT_MODULES):
            return True
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None and any(f"{os.sep}{m}{os.sep}" in tb.tb_frame.f_code.co_filename for m in _CLIENT_MODULES):
            return True
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False


def describe(e: BaseException, path: str | os.PathLike) -> str:
    """A one-line cause of a failed object-store request on `path`."""
    kind = scheme(path)
    if isinstance(e, ImportError) and kind:
        package, extra = _CLIENTS[kind]
        return f"{kind}:// paths need {package} (pip install 'clipjax[{extra}]')"
    if isinstance(e, FileNotFoundError):
        return "no such object or bucket"
    text = " ".join(str(e).split())[:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _endpoint(kind: str) -> str:
    """The URL the client of `kind` ("gs", "s3") sends its requests to (an emulator's, when one is configured)."""
    import fsspec.config

    conf = {"gs": fsspec.config.conf.get("gcs", {}) or fsspec.config.conf.get("gs", {}),
            "s3": fsspec.config.conf.get("s3", {})}[kind]
    if kind == "gs":
        url = os.environ.get("STORAGE_EMULATOR_HOST") or conf.get("endpoint_url") or "https://storage.googleapis.com"
    else:
        url = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or conf.get("endpoint_url")
               or (conf.get("client_kwargs") or {}).get("endpoint_url") or "https://s3.amazonaws.com")
    return url if "://" in url else f"http://{url}"


def _probe(url: str, timeout: float) -> BaseException | None:
    """None when `url` answers an HTTP request (any status, or a TLS error: the server is there), else the reason.
    The request runs on a thread of its own, so name resolution cannot outlast `timeout` and a signal handler of the
    caller's (e.g. the trainer's SIGTERM) runs while it waits."""
    import ssl
    import urllib.error
    import urllib.request

    result: list[BaseException | None] = []

    def request() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append(None)
        except urllib.error.HTTPError:  # an answer
            result.append(None)
        except urllib.error.URLError as e:
            reason = e.reason if isinstance(e.reason, BaseException) else OSError(str(e.reason))
            result.append(None if isinstance(reason, ssl.SSLError) else reason)
        except ssl.SSLError:
            result.append(None)
        except (OSError, ValueError) as e:  # a timeout, a reset connection, a malformed URL
            result.append(e)

    worker = threading.Thread(target=request, name="clipjax-storage-probe", daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout + 1.0
    while worker.is_alive() and time.monotonic() < deadline:
        worker.join(0.1)
    return result[0] if result else TimeoutError(f"no answer within {timeout:g} s")


def check_reachable(path: str | os.PathLike) -> None:
    """Raise `StorageError` naming `path` when the endpoint of its object store does not answer (probed once per
    process and endpoint, `_probe`; a failure again after `PROBE_AGAIN_S`). Local paths, and stores whose client is not installed (their own error says
    so), are left alone."""
    import importlib.util

    kind = scheme(path)
    if kind is None or importlib.util.find_spec(_CLIENTS[kind][0]) is None:
        return
    url = _endpoint(kind)
    with _probe_lock:
        error, when = _probed.get(url, (None, None))
        if when is None or (error is not None and time.monotonic() - when > PROBE_AGAIN_S):
            error = _probe(url, PROBE_TIMEOUT_S)
            _probed[url] = (error, time.monotonic())
    if error is not None:
        reason = " ".join(str(error).split()) or type(error).__name__
        cause = ConnectionError(f"Cannot connect to {url} ({reason}); check the network connection")
        raise StorageError(f"cannot reach {path}: {cause}") from cause


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike, action: str = "access") -> Iterator[None]:
    """Re-raise a failure of the object-store client on remote `path` as a one-line `StorageError` naming it
    (FileNotFoundError, which callers test for, passes through); an endpoint that does not answer is one before any
    request (`check_reachable`). Local paths are left alone."""
    check_reachable(path)
    try:
        yield
    except (StorageError, FileNotFoundError):
        raise
    except Exception as e:
        if not is_remote(path) or not _from_client(e):
            raise
        raise StorageError(f"cannot {action} {path}: {describe(e, path)}") from e


# ============================================================================================ reading and writing

def write_object(path: Path, data: bytes | str) -> None:
    """Write `data` as the whole object `path` in one call (the object appears only once the upload completed)."""
    with storage_errors(path, "write"):
        if isinstance(data, str):
            data = data.encode("utf-8")
        path.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`text` (UTF-8) as the whole file `path`, atomically (see `write_bytes`)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`data` as the whole file `path`, atomically: a local file (its folder made, the umask's mode) through a
    temporary file in the same folder renamed over it (a failed write leaves any previous file intact), an object in a
    store in one upload."""
    if is_remote(path):
        write_object(as_path(path), data)
        return
    local = pathlib.Path(path)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)


def read_bytes(path: Path) -> bytes:
    with storage_errors(path, "read"):
        return path.read_bytes()


def read_text(path: Path) -> str:
    return read_bytes(path).decode("utf-8")


def upload_file(local: str | os.PathLike, path: Path) -> None:
    """Copy the local file `local` to the remote object `path`. The file is read whole first: a client's file object
    commits what it holds when closed, even after an error, so only a write of complete data is started."""
    write_object(path, pathlib.Path(local).read_bytes())


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A local file with the contents of `path`: `path` itself when local, else a temporary copy of the object
    (same file name, removed afterwards)."""
    if not is_remote(path):
        yield pathlib.Path(path)
        return
    remote = as_path(path)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="clipjax-"))
    try:
        local = tmp / remote.name
        with storage_errors(remote, "read"), remote.open("rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_dir(local: pathlib.Path, remote: Path) -> list[str]:
    """Upload every file directly in the local directory `local` to `remote/<name>`, each in one upload, in sorted
    order; returns the names."""
    names = sorted(f.name for f in local.iterdir() if f.is_file())
    for name in names:
        upload_file(local / name, remote / name)
    return names


def exists(path: Path) -> bool:
    with storage_errors(path):
        return path.exists()


def is_dir(path: Path) -> bool:
    with storage_errors(path):
        return path.is_dir()


def is_file(path: Path) -> bool:
    with storage_errors(path):
        return path.is_file()
