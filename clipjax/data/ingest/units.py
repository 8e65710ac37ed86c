"""The work of one ingestion unit, where it runs (a local worker process or a Beam worker): read its items' images
and captions, check them, and write its ArrayRecord shard and report."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import stat
import tarfile
import tempfile
from clipjax.data.ingest.plan import DEFAULT_MAX_IMAGE_BYTES, _plan_tar, _tar_groups, _tar_members, sample_captions


from clipjax import paths
from clipjax.data import records
from clipjax.data.preprocess import load_image
from clipjax.data.preprocess import oversized_image


# ----------------------------------------------------------------------------------------------- workers


def _check_image(data: bytes) -> str | None:
    """None if ``data`` decodes to a non-empty image, else the reason."""
    if not data:
        return "zero-size file"
    too_large = oversized_image(data)
    if too_large is not None:
        return too_large
    try:
        image = load_image(data)
    except Exception as e:
        return str(e)
    if image.width == 0 or image.height == 0:
        return "image has a zero side"
    return None


class _Shard:
    """A webdataset shard opened to read members by name without scanning past any damage (tarfile's own lookup by
    name reads the whole archive and fails on a truncated one)."""

    def __init__(self, path: str):
        self.members = {m.name: m for m in _tar_members(pathlib.Path(path))[0]}
        self.tar = tarfile.open(path, "r:")

    def read(self, name: str) -> bytes:
        return self.tar.extractfile(self.members[name]).read()

    def close(self) -> None:
        self.tar.close()


_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
               stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket"}


def _too_large(size: int, max_bytes: int) -> str:
    return f"{size:,} bytes, more than --max-image-bytes {max_bytes:,}"


def read_image_file(path: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> tuple[bytes | None, str | None]:
    """(the bytes of the image file ``path``, None) or (None, why it is not read): only a regular file (checked
    before it is opened, and again on the open file: /dev/zero would be read until memory runs out, a FIFO waits for
    a writer for ever) of at most ``max_bytes`` bytes."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "a special file")
            return None, f"{path} is {kind}, not a regular file"
        if info.st_size > max_bytes:
            return None, f"{path} is {_too_large(info.st_size, max_bytes)}"
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # never waits (a swapped FIFO)
        with open(fd, "rb", closefd=True) as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None, f"{path} is not a regular file"
            data = f.read(max_bytes + 1)
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror or e}"
    if len(data) > max_bytes:  # it grew since
        return None, f"{path} is {_too_large(len(data), max_bytes)}"
    return data, None


def _read_item(item: Item, shard: _Shard | None,
               max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> tuple[bytes | None, list[str], str | None]:
    """(image bytes, captions, error)."""
    if shard is None:
        data, error = read_image_file(item.image, max_bytes)
        return data, item.captions if error is None else [], error
    if not item.image:
        return None, [], "no image file (jpg/jpeg/png/webp) for this key"
    member = shard.members.get(item.image)
    if member is not None and member.size > max_bytes:
        return None, [], f"{item.image} is {_too_large(member.size, max_bytes)}"
    try:
        data = shard.read(item.image)
        txt = shard.read(item.txt) if item.txt else None
        meta = shard.read(item.json) if item.json and not item.txt else None
        captions = sample_captions(txt, meta)
    except (KeyError, tarfile.TarError, EOFError, OSError) as e:
        return None, [], f"cannot read {item.image} from the shard ({' '.join(str(e).split())})"
    return data, captions, None


@dataclasses.dataclass
class UnitTask:
    """One unit of work, the same for every driver (it pickles): write ``items`` as the ArrayRecord shard ``shard``,
    then the unit's report as the JSON file ``report``. Both are local paths or object-store URIs (gs://, s3://);
    ``classnames`` are the dataset's class names (None: no class label feature). A unit planned on the worker has
    no ``items`` but the webdataset shard ``tar`` (a local path or a URI) and ``drop``, its keys that an earlier
    tar holds (skipped as duplicates)."""

    items: list[Item]
    shard: str
    report: str
    classnames: list[str] | None = None
    tar: str | None = None
    drop: list[str] = dataclasses.field(default_factory=list)
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # larger image files are skipped, not read


@dataclasses.dataclass
class ListTask:
    """Stage "list" of a source planned on the workers: the keys of tar number ``index`` of the listing, ``tar``,
    kept in the JSON file ``keys`` (read from there when a run already listed it)."""

    index: int
    tar: str
    keys: str


def list_unit(task: ListTask) -> tuple[int, list[str]]:
    """(``task.index``, the sample keys of ``task.tar``): its complete samples in member order, by the rules of
    ``plan_webdataset`` (a damaged tar's samples before the damage, less the one the damage cuts). A tar in an object
    store is downloaded to a local temp file first, in one sequential read. The keys are written to ``task.keys``;
    when that file exists (an earlier run listed the tar) they are read from it and the tar is not read."""
    cached = paths.as_path(task.keys)
    with paths.storage_errors(task.keys, "read"):
        text = cached.read_text() if cached.exists() else None
    if text is not None:
        try:
            return task.index, json.loads(text)
        except json.JSONDecodeError:
            pass  # written by another program: listed again
    with paths.local_copy(task.tar) as tar:
        groups, _, _ = _tar_groups(tar, warn=False)  # the write stage warns
    keys = list(groups)
    paths.write_text(task.keys, json.dumps(keys))
    return task.index, keys


def ingest_unit(task: UnitTask) -> dict:
    """Writes one unit (``task``) and returns its report ``{"records", "image_bytes", "shard_bytes", "skipped"}``,
    also written to ``task.report`` once the shard is complete (a unit with both is done; a re-run redoes the
    others). A shard in an object store is written to a local temp file first, then uploaded in one request. A unit
    planned on the worker (``task.tar``) reads its tar (a tar in a store is downloaded to a local temp file first),
    plans it as ``plan_webdataset`` does with ``task.drop`` as the keys already seen, and adds ``"plan_skipped"``,
    what its planning skips, to the report."""
    remote = paths.is_remote(task.shard)
    tmp_dir = tempfile.mkdtemp(prefix="clipjax-ingest-") if remote else None
    local = os.path.join(tmp_dir, os.path.basename(task.shard)) if remote else task.shard
    try:
        if task.tar is None:
            report = _write_shard(task.items, local, task.classnames, max_image_bytes=task.max_image_bytes)
        else:
            with paths.local_copy(task.tar) as tar:
                items, planned = _plan_tar(tar, set(task.drop), source=task.tar)
                report = _write_shard(items, local, task.classnames, tar_file=tar,
                                      max_image_bytes=task.max_image_bytes)
        report["shard_bytes"] = os.path.getsize(local)
        if task.tar is not None:
            report["plan_skipped"] = planned
        if remote:
            paths.upload_file(local, paths.as_path(task.shard))
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    paths.write_text(task.report, json.dumps(report))
    return report


def _write_shard(unit: list[Item], out_path: str, features_spec: list[str] | None,
                 tar_file: os.PathLike | None = None, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> dict:
    """Writes `unit`'s usable items as the ArrayRecord shard `out_path`; webdataset items are read from their tar,
    or from the local file `tar_file` holding it."""
    feats = records.image_text_features(features_spec)
    skipped: list[dict] = []
    tar = tar_file if tar_file is not None else unit[0].tar if unit else None
    shard = _Shard(os.fspath(tar)) if unit and tar else None
    try:
        with records.ShardWriter(out_path, feats) as writer:
            for item in unit:
                source = item.tar or item.image
                data, captions, error = _read_item(item, shard, max_image_bytes)
                captions = [c for c in captions if c]
                if error is None:
                    error = _check_image(data)
                if error is None and not captions:
                    error = "empty caption"
                if error is not None:
                    skipped.append({"key": item.key, "source": source, "reason": error})
                    continue
                writer.write({"image": data, "captions": captions, "key": item.key, "label": item.label})
            report = {"records": writer.count, "image_bytes": writer.image_bytes, "skipped": skipped}
    finally:
        if shard is not None:
            shard.close()
    return report
