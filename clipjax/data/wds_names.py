"""The webdataset naming rules that ``wds:`` streams (``clipjax.data.wds``) and ingestion
(``clipjax.data.ingest``) share: which shards a spec names, and how a shard's members group into samples.

Shards. ``shard_urls("wds:PATTERN")`` lists them: a brace pattern (``{A..B}`` numeric ranges, zero-padded as written,
and ``{x,y}`` alternatives, expanded in order by ``braceexpand`` as webdataset does, at most ``MAX_SHARD_NAMES``
names, counted before any is made), a
directory (its ``*.tar``, sorted by name), a glob (sorted) or one ``.tar``; the same on a filesystem of fsspec
(gs://, s3://, ...), read through fsspec and its implementation (gcsfs, s3fs, ...), imported only then.

Samples. Consecutive members ``KEY.EXT`` of one key are a sample (``member_key``); its image is the first of
``WDS_IMAGE_EXTS`` present (``sample_image_ext``), its captions its ``.txt`` member (a JSON list is several) or
the ``caption`` field of its ``.json`` member (``sample_captions``), as img2dataset writes them.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from typing import IO

import braceexpand

from clipjax import paths
from clipjax.data import sources as src_lib

log = logging.getLogger(__name__)

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_SHARD_NAMES = 1_000_000  # names a brace pattern may expand to (each is held in memory and, if local, stat'ed)
_READ_BUFFER = 1 << 20
_PROTOCOL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# ============================================================================================ shard listing

def _size(body: str) -> int | None:
    """How many names one brace's ``body`` stands for when it is a numeric range or a flat comma list, else None."""
    bounds = _RANGE.match(body)
    if bounds:
        return abs(int(bounds.group(2)) - int(bounds.group(1))) + 1
    return len(body.split(",")) if "," in body else None


def iter_braces(pattern: str) -> Iterator[str]:
    """The names of a brace pattern one at a time (``braceexpand``, the expansion webdataset and open_clip use, so a
    pattern names the same shards here as there), none held beyond the one yielded. A brace left unexpanded (``{b}``:
    neither a range nor a list) is a ValueError rather than a shard name."""
    for name in braceexpand.braceexpand(pattern):
        left = _BRACE.search(name)
        if left:
            raise ValueError(f"brace {left.group(0)} in {pattern!r} is neither a range {{A..B}} nor a list {{a,b}}")
        yield name


def count_braces(pattern: str, limit: int = MAX_SHARD_NAMES) -> int:
    """How many names ``pattern`` expands to: multiplied out when its braces are flat numeric ranges and comma
    lists, else (nested braces, letter ranges, steps) counted one name at a time, up to ``limit`` + 1."""
    sizes = [_size(body) for body in _BRACE.findall(pattern)]
    if "{" not in _BRACE.sub("", pattern) and None not in sizes:
        return math.prod(sizes)
    return sum(1 for _ in itertools.islice(iter_braces(pattern), limit + 1))


def expand_braces(pattern: str, limit: int = MAX_SHARD_NAMES) -> list[str]:
    """``a{00..02}b{x,y}`` → a00bx, a00by, a01bx, ...: numeric ranges (zero-padded to the wider bound when a bound is
    written with a leading zero) and comma lists, the leftmost brace varying slowest (as a shell expands them). More
    than ``limit`` names is a ValueError, raised before any is made (``{0..999}{0..999}{0..999}`` is 10^9 names)."""
    count = count_braces(pattern, limit)
    if count > limit:
        shown = f"{count:,}" if count > limit + 1 else f"more than {limit:,}"  # a nested pattern is counted to limit+1
        raise ValueError(f"brace pattern {pattern!r} names {shown} shards; a pattern may name at most "
                         f"{limit:,}: check the pattern, or split the data into a mix (data.mix)")
    return list(iter_braces(pattern))


def _protocol(path: str) -> str | None:
    m = _PROTOCOL.match(path)
    return m.group(1) if m else None


def _fsspec(spec: str, protocol: str):
    """fsspec, once its filesystem for ``protocol`` imports; a ``DatasetError`` naming what is missing otherwise."""
    try:
        import fsspec
    except ImportError:
        raise src_lib.DatasetError(f"dataset {spec!r}: reading {protocol}:// paths needs the fsspec package "
                                   f"(pip install fsspec)") from None
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:  # the implementation (gcsfs, s3fs, ...) is not installed; fsspec's message names it
        raise src_lib.DatasetError(f"dataset {spec!r}: cannot read {protocol}:// paths: {e}") from None
    except ValueError:
        raise src_lib.DatasetError(f"dataset {spec!r}: fsspec knows no filesystem {protocol!r}") from None
    return fsspec


def _local_shards(spec: str, path: str) -> list[str]:
    path = os.path.expanduser(path)
    if "{" in path:
        urls = expand_braces(path)
        present = sum(os.path.isfile(u) for u in urls)
        if not present:
            raise src_lib.DatasetError(f"dataset {spec!r}: none of its {len(urls)} shards exists (first: {urls[0]})")
        if present < len(urls):
            log.warning("dataset %r: %d of its %d shards do not exist; each is skipped and counted when its turn "
                        "comes", spec, len(urls) - present, len(urls))
        return urls
    if any(c in path for c in "*?["):
        return sorted(glob.glob(path))
    if os.path.isdir(path):
        return sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".tar") and not n.startswith("."))
    if os.path.isfile(path):
        return [path]
    raise src_lib.DatasetError(f"dataset {spec!r}: {path} is neither a directory, a .tar shard nor a pattern of "
                               f"shards ({{A..B}}, {{a,b}}, *)")


def _remote_shards(spec: str, path: str, protocol: str) -> list[str]:
    fsspec = _fsspec(spec, protocol)
    urls = expand_braces(path) if "{" in path else None  # without a request: listing 10^5 shards is slow
    try:  # an object store that does not answer fails here, in seconds, not shard by shard on the reading thread
        paths.check_reachable(path)
    except paths.StorageError as e:
        raise src_lib.DatasetError(f"dataset {spec!r}: {e.__cause__ or e}") from None
    if urls is not None:
        return urls
    fs, root = fsspec.core.url_to_fs(path)
    if any(c in root for c in "*?["):
        found = fs.glob(root)
    elif root.endswith(".tar"):
        return [path]
    else:
        found = fs.glob(root.rstrip("/") + "/*.tar")
    return sorted(fs.unstrip_protocol(p) for p in found)


def shard_urls(spec: str) -> list[str]:
    """The shards of a ``wds:`` spec in listing order (local paths, or URLs read through fsspec)."""
    path = spec[len(src_lib.WDS_PREFIX):]
    if not path:
        raise src_lib.DatasetError(f"dataset {spec!r}: name the shards, e.g. wds:/data/shards/{{00000..00099}}.tar")
    protocol = _protocol(path)
    try:
        if protocol is None or protocol == "file":
            urls = _local_shards(spec, path[len("file://"):] if protocol else path)
        else:
            urls = _remote_shards(spec, path, protocol)
    except src_lib.DatasetError:  # already names the spec
        raise
    except ValueError as e:  # a brace that is not a pattern
        raise src_lib.DatasetError(f"dataset {spec!r}: {e}") from None
    if not urls:
        raise src_lib.DatasetError(f"dataset {spec!r}: no .tar shards found")
    return urls


def open_shard(url: str) -> IO[bytes]:
    """A shard opened for reading: a local file, or through fsspec for a URL with a protocol."""
    if _protocol(url) is None:
        return open(url, "rb", buffering=_READ_BUFFER)
    import fsspec

    return fsspec.open(url, "rb").open()


# ============================================================================================ samples

def caption_list(value) -> list[str]:
    """The captions in a caption field's value: a string (a JSON list written as text is several), a list of them;
    anything else is none."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                return caption_list(json.loads(text))
            except json.JSONDecodeError:
                pass
        return [text]
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in caption_list(v)]
    return []  # a number, dict or bool is not a caption (its str() would be trained on): the sample has none


def member_key(name: str) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a webdataset member name: ``dir/KEY.EXT`` → (``dir/KEY``, ``ext``), the
    extension being everything after the first dot (``a.seg.png`` → ``seg.png``); None for a name without one."""
    base = os.path.basename(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return os.path.join(os.path.dirname(name), stem), ext.lower()


def sample_image_ext(exts) -> str | None:
    """The extension of a webdataset sample's image among its members' extensions (the first of
    ``WDS_IMAGE_EXTS`` present), or None."""
    return next((e for e in WDS_IMAGE_EXTS if e in exts), None)


def sample_captions(txt: bytes | None, meta: bytes | None) -> list[str]:
    """A webdataset sample's captions: its ``.txt`` member (UTF-8; a JSON list is read as several captions), else
    the ``caption`` field of its ``.json`` member; [] when neither gives one (empty strings are kept: callers drop
    them)."""
    if txt is not None:
        return caption_list(txt.decode("utf-8", errors="replace"))
    if meta is None:
        return []
    try:
        data = json.loads(meta)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []
    return caption_list(data.get("caption") if isinstance(data, dict) else None)
