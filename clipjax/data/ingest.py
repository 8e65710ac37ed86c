"""Ingest user image-text data into a clipjax dataset directory (read back with the ``"dir:DIR"`` spec).

    python -m clipjax.data.ingest SRC --output DIR [--name NAME] [--split train] [--workers N]
    python -m clipjax.data.ingest SRC --output DIR --runner RUNNER [--beam_option=value ...]

SRC is one of

    *.csv / *.jsonl   UTF-8 text (a BOM is allowed). Columns (CSV header / JSONL object keys):
                        image      a local image file: a path relative to SRC's folder, or absolute. URLs are not
                                   downloaded (fetch them first, e.g. with img2dataset, and ingest its .tar shards)
                        caption    the caption (``captions`` is read too): a string; in JSONL also a list of
                                   strings; in CSV a JSON list ``["a", "b"]`` is read as a list
                      Other columns are ignored. Several captions per image: repeated rows or a list; rows with the
                      same image are merged.
    a folder of .tar  webdataset shards as img2dataset writes them: members ``KEY.jpg|jpeg|png|webp`` + ``KEY.txt``
                      (the caption) or ``KEY.json`` (its ``caption`` field). Keys are de-duplicated across shards
                      (the first shard in listing order keeps a key; the others report it as a duplicate). A
                      truncated or damaged shard keeps its samples before the damage (one warning line names the
                      shard and how many members were kept); the sample the damage cuts is lost with the rest, as
                      when the shard is streamed (``wds:``), and reported; the other shards are ingested as usual.
                      The shards may also be named as the ``wds:`` spec names them: a brace pattern
                      (``'/data/{00000..00099}.tar'``) or a glob (``'/data/*.tar'``), and they may be in an object
                      store (``gs://BUCKET/laion/``, ``'gs://BUCKET/laion/{00000..41455}.tar'``; ``s3://`` too).
                      Quote a pattern, as here: unquoted, the shell expands it into one argument per shard (refused).
    an ImageFolder    one subfolder per class; each image gets the caption ``--template`` ("a photo of a {}.")
                      with the folder name (``_`` read as a space) and the class index as label.

Every image is fully decoded (``preprocess.load_image``) only to check it; the bytes written are the file's own,
never re-encoded (an alpha channel stays in the file; decoding for training drops it as PIL's ``convert("RGB")``).
Skipped (and listed with the reason in ``DIR/ingest_report.json``): missing or zero-size files, paths that are not
regular files (a device such as /dev/zero, a FIFO: never opened for reading), files or tar members larger than
``--max-image-bytes`` (64 MiB; not read), images whose header promises more pixels than PIL's decompression-bomb limit
(never decoded), undecodable bytes or modes, images with a zero side, records without a non-empty caption, URLs,
duplicate keys. When every record is skipped no split is written (the reasons still go to ``DIR/ingest_report.json``)
and the command fails (status 2) with the count and the first reasons.

DIR must be new or empty, or a directory written by this command (it holds ``.ingest/manifest.json``): then a run
of the same SRC and ``--split`` resumes or completes it (finished shards are kept), and another ``--split`` adds
that split (with the same class names). A DIR holding anything else is refused and left untouched, as is a split
whose SRC has changed since it was ingested (use a new ``--output`` or ``--split``).

Work is cut into units (``--shard-size`` records, or one per input tar); ``ingest_unit`` writes one unit as one
ArrayRecord shard via a temp file, then the unit's report. ``DIR/.ingest/`` keeps the plan and one report per finished
unit, so a re-run after an interruption only does the missing units; the dataset metadata and ``ingest_report.json``
are written from the reports once every unit is done. A local source is planned here: every table row is read and
every tar's members are listed before any unit is written. A source in an object store is planned on the workers:
here only the tar names and sizes are listed (one listing request per folder); then

    list        per tar, on a worker (``list_unit``): the tar is downloaded to a local temp file (one sequential
                read) and its sample keys listed, by the same rules as here (the samples before any damage, less
                the one the damage cuts); they are kept in ``DIR/.ingest/SPLIT-NNNNN.keys.json``, so a re-run reads
                again only the tars it has not listed
    duplicates  a key held by several tars is kept by the first in listing order, dropped from the others
    write       per pending tar, on a worker (``ingest_unit``): the tar downloaded again, then the same work as for
                a planned unit, its duplicate keys reported as "duplicate key" and its damage as here

so each tar is read twice and no machine reads them all. Two drivers run the units, with the same output record for
record:

    local pool  (the default) ``--workers N`` processes on this machine (default: the CPU count); for a source in a
                store, the pool lists the tars, this process gathers their keys (it holds them all, as the planner
                of a local source does) to find the duplicates, and the pool writes the units
    Beam        ``--runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner`` (any Beam runner name): the pipeline
                ``Create(units) | Reshuffle | Map(ingest_unit)``; for a source in a store ``Create(tars) | Reshuffle
                | Map(list_unit)``, then (key, tar) pairs ``| GroupByKey`` giving the tars to drop each duplicate
                from, joined to the pending units with ``CoGroupByKey | Map(ingest_unit)``: the keys are grouped by
                the runner's shuffle, never on one machine. Every other ``--flag=value`` argument is a Beam
                pipeline option, e.g. for Dataflow ``--project=P --region=R --temp_location=gs://B/tmp
                --num_workers=N --max_num_workers=M`` (``pip install "clipjax[beam]"``)

The check that a resumed split has the same SRC compares a fingerprint of the plan: for a local source, of every
unit's items (each tar's members, each table row); for a source in a store, of the tar listing with each tar's size
(a tar rewritten in place with the same size is not noticed there).

DIR may be in an object store (``gs://BUCKET/DIR``, needs ``clipjax[gcs]``; ``s3://`` with ``clipjax[s3]``), with
either driver: a unit's shard is written to a local temp file and uploaded whole, then its report (a DataflowRunner
output must be in a bucket). A local SRC is read here and by the workers at the same path: local, or a file system
every worker mounts. Webdataset tars in a bucket are read by the workers where they are; a table or an ImageFolder
must be local (a table in a bucket is refused: copy it and its images here). Bad input prints one line
``error: ...`` on stderr and exits with status 2.

    python -m clipjax.data.ingest gs://bucket/laion/ --output gs://bucket/laion-ar --runner DataflowRunner \\
        --project=P --region=R --temp_location=gs://bucket/tmp --requirements_file=requirements-ingest.txt
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import pathlib
import re
import sys
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence

from tqdm import tqdm

from clipjax import cli, paths
from clipjax.data import records
from clipjax.data.preprocess import load_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_TEMPLATE = "a photo of a {}."
STATE_DIR = ".ingest"
MANIFEST = "manifest.json"
REPORT = "ingest_report.json"
FIRST_REASONS = 3  # reasons quoted in the error of an ingestion where every record was skipped
DEFAULT_MAX_IMAGE_BYTES = 64 << 20  # larger image files (or tar members) are skipped, never read (--max-image-bytes)
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class IngestError(ValueError):
    """Input that cannot be ingested (unreadable table, refused output directory, nothing usable)."""


@dataclasses.dataclass
class Item:
    key: str
    image: str  # file path, or member name inside ``tar``
    captions: list[str]
    label: int = -1
    tar: str | None = None  # webdataset: the shard, and the caption members inside it
    txt: str = ""
    json: str = ""


# ----------------------------------------------------------------------------------------------- planning


def _captions(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                return _captions(json.loads(text))
            except json.JSONDecodeError:
                pass
        return [text]
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in _captions(v)]
    return []  # a number, dict or bool is not a caption (its str() would be trained on): the sample has none


def _utf8_lines(src: pathlib.Path) -> Iterator[str]:
    """The lines of `src` decoded as UTF-8 (a leading BOM dropped); bytes that are not UTF-8 are an IngestError
    naming the file and the line."""
    with open(src, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise IngestError(f"{src}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                  f"{e.start + 1}); save the file as UTF-8") from None
            yield line.removeprefix("\ufeff") if line_no == 1 else line


def _table_rows(src: pathlib.Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a CSV or JSONL table."""
    if src.suffix.lower() == ".csv":
        reader = csv.DictReader(_utf8_lines(src))
        try:
            missing = {"image"} - set(reader.fieldnames or [])
            if missing or not {"caption", "captions"} & set(reader.fieldnames or []):
                raise IngestError(f"{src}: needs the columns 'image' and 'caption' (or 'captions'); found "
                                  f"{reader.fieldnames}")
            for row in reader:
                yield reader.line_num, row
        except csv.Error as e:
            raise IngestError(f"{src}:{reader.line_num}: malformed CSV ({e})") from None
        return
    for line_no, line in enumerate(_utf8_lines(src), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise IngestError(f"{src}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "image" not in row:
                raise IngestError(f"{src}:{line_no}: expected an object with an 'image' field")
            yield line_no, row


def _table_ref_problem(ref: str, line_no: int) -> str | None:
    """Why the image reference of a table row cannot be read (None when it may be)."""
    if not ref or ref == "None":
        return f"line {line_no}: no image path"
    if _URL.match(ref):
        return (f"line {line_no}: a URL; ingest reads local files only (download first, e.g. with img2dataset, "
                f"and ingest its .tar shards)")
    return None


def plan_table(src: pathlib.Path) -> tuple[list[Item], list[dict]]:
    """Items of a CSV/JSONL table (rows of one image merged) and the rows skipped while planning."""
    by_image: dict[str, Item] = {}
    skipped = []
    for line_no, row in _table_rows(src):
        ref = str(row.get("image") if row.get("image") is not None else "").strip()
        problem = _table_ref_problem(ref, line_no)
        if problem is not None:
            skipped.append({"key": ref, "source": os.fspath(src), "reason": problem})
            continue
        path = ref if os.path.isabs(ref) else os.fspath(src.parent / ref)
        caps = _captions(row.get("caption", row.get("captions")))
        if ref in by_image:
            by_image[ref].captions.extend(caps)
        else:
            by_image[ref] = Item(key=ref, image=path, captions=caps)
    return list(by_image.values()), skipped


def _tar_members(tar: pathlib.Path) -> tuple[list[tarfile.TarInfo], str | None, str | None]:
    """The complete members of `tar` up to any damage, a description of the damage (None if none), and the name of
    the member being read when the damage was met: the cut member, or the last member read before an unreadable
    header (None: none was, as after the last complete header, where tarfile stops quietly)."""
    size = tar.stat().st_size
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(tar, "r:") as tf:
            while (m := tf.next()) is not None:
                if m.isfile() and m.offset_data + m.size > size:
                    return members, f"member {m.name!r} is cut off at byte {size}", m.name
                members.append(m)
            end = tf.offset  # tarfile stops quietly at a bad header after the first: the rest must be padding
    except (tarfile.TarError, EOFError, OSError) as e:
        return members, " ".join(str(e).split()), members[-1].name if members else None
    junk = _first_nonzero(tar, end)
    return members, None if junk is None else f"unreadable data at byte {junk}", None


def _first_nonzero(path: pathlib.Path, start: int, chunk: int = 1 << 20) -> int | None:
    """Offset of the first non-zero byte of `path` from `start` on (None: only zeros, a tar's end padding)."""
    with open(path, "rb") as f:
        f.seek(start)
        while block := f.read(chunk):
            stripped = block.lstrip(b"\0")
            if stripped:
                return start + len(block) - len(stripped)
            start += len(block)
    return None


def _tar_groups(tar: pathlib.Path, name: str | None = None,
               warn: bool = True) -> tuple[dict[str, dict[str, str]], str | None, str | None]:
    """({key: {extension: member name}}, damage, lost key) of a webdataset shard's complete members. A damaged shard
    keeps the samples before the damage, with one warning line (naming the shard as `name`, default `tar`; none
    without `warn`); the sample being read when the damage was met (the key of the cut member, else of the last
    member read: it may have had more members) is lost with the rest, as ``clipjax.data.wds`` loses it when
    streaming the shard, and returned as the lost key (None: none was)."""
    members, damage, cut = _tar_members(tar)
    files = [m for m in members if m.isfile()]
    groups: dict[str, dict[str, str]] = {}
    last = None  # the key of the last member with one: the sample in progress
    for m in files:
        parts = member_key(m.name)
        if parts is not None:
            groups.setdefault(parts[0], {})[parts[1]] = m.name
            last = parts[0]
    lost = None
    if damage is not None:
        cut_key = member_key(cut) if cut is not None else None
        lost = None if cut is None else cut_key[0] if cut_key is not None else last
        if lost is not None and lost not in groups:
            lost = None  # cut in its first member: nothing of it was kept
        kept = len(files) - len(groups.pop(lost, {}))
        if warn:
            cli.warn(f"{name or tar}: truncated or damaged shard ({damage}): kept its {kept} complete members before the "
                     f"damage, the rest is lost")
    return groups, damage, lost


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
        return _captions(txt.decode("utf-8", errors="replace"))
    if meta is None:
        return []
    try:
        data = json.loads(meta)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []
    return _captions(data.get("caption") if isinstance(data, dict) else None)


def _plan_tar(tar: pathlib.Path, seen: set[str], source: str | None = None) -> tuple[list[Item], list[dict]]:
    """The items of one webdataset shard and what its listing skips: its damage, the sample the damage cuts, and its
    keys already in `seen` (duplicates: an earlier shard keeps them); its keys are added to `seen`. `source` names
    the shard in the items and reasons (default: `tar`, the file read)."""
    source = os.fspath(tar) if source is None else source
    groups, damage, lost = _tar_groups(tar, name=source)
    skipped = []
    if damage is not None:
        skipped.append({"key": None, "source": source,
                        "reason": f"damaged shard ({damage}): members after the damage are lost"})
    if lost is not None:
        skipped.append({"key": lost, "source": source,
                        "reason": "the shard's damage cuts this sample: its members before the damage are not used"})
    items = []
    for key, files in groups.items():
        ext = sample_image_ext(files)
        image = files[ext] if ext is not None else None
        if key in seen:
            skipped.append({"key": key, "source": source, "reason": "duplicate key"})
            continue
        seen.add(key)
        items.append(Item(key=key, image=image or "", captions=[], tar=source,
                          txt=files.get("txt", ""), json=files.get("json", "")))
    return items, skipped


def plan_webdataset(tars: list[pathlib.Path]) -> tuple[list[list[Item]], list[dict]]:
    """One unit per tar; duplicate keys (first occurrence kept) and damaged shards are reported."""
    units, skipped, seen = [], [], set()
    for tar in tars:
        items, tar_skipped = _plan_tar(tar, seen)
        units.append(items)
        skipped += tar_skipped
    return units, skipped


def is_pattern(src: str | os.PathLike) -> bool:
    """Whether `src` is a brace pattern or a glob of tars (``{A..B}``, ``{a,b}``, ``*``, ``?``, ``[...]``), as in
    the ``wds:`` spec."""
    return any(c in os.fspath(src) for c in "{*?[")


def list_tars(src: str) -> list[str]:
    """The tars of a webdataset source named as the ``wds:`` spec names them (``clipjax.data.wds.shard_urls``): a
    folder (its ``*.tar``, sorted), a glob (sorted) or a brace pattern (in its order), local or in an object store.
    Only names are listed (one listing request per folder in a store); every tar must exist."""
    from clipjax.data import sources, wds  # imported on use: wds imports this module

    spec = sources.WDS_PREFIX + src
    if paths.is_remote(src):
        paths.as_path(src)  # fsspec set up as for every clipjax path (fresh listings) before wds lists
    try:
        with paths.storage_errors(src, "list"):
            tars = wds.shard_urls(spec)
    except sources.DatasetError as e:
        raise IngestError(f"{src}: {str(e).removeprefix(f'dataset {spec!r}: ')}") from None
    if not paths.is_remote(src):
        missing = [t for t in tars if not os.path.isfile(t)]
        if missing:
            raise IngestError(f"{src}: {len(missing)} of its {len(tars)} tars do not exist (first: {missing[0]})")
    return tars


def _remote_sizes(src: str, tars: list[str]) -> list[int]:
    """The sizes of the tars `tars` in an object store, from one listing of each folder holding some; a tar not
    listed is an IngestError."""
    import fsspec

    sizes = {}
    with paths.storage_errors(src, "list"):
        fs, _ = fsspec.core.url_to_fs(tars[0])
        names = [fs._strip_protocol(t) for t in tars]
        for folder in dict.fromkeys(n.rsplit("/", 1)[0] for n in names):
            sizes.update((info["name"], info["size"]) for info in fs.ls(folder, detail=True)
                         if info.get("type") == "file")
    missing = [t for t, n in zip(tars, names) if n not in sizes]
    if missing:
        raise IngestError(f"{src}: {len(missing)} of its {len(tars)} tars do not exist (first: {missing[0]})")
    return [sizes[n] for n in names]


def plan_tars(src: str) -> dict:
    """The plan of a webdataset source in an object store: only its tars are listed here, with their sizes (one
    unit each); their members are read on the workers (``list_unit``, then ``ingest_unit``)."""
    try:
        tars = list_tars(src)
    except IngestError as e:
        if "no .tar shards" not in str(e):
            raise
        raise IngestError(f"{e}; only webdataset .tar shards are ingested from an object store, an ImageFolder is "
                          f"read on this machine (copy it here first)") from None
    return {"kind": "webdataset", "classnames": None, "tars": [list(t) for t in zip(tars, _remote_sizes(src, tars))],
            "skipped": []}


def plan_image_folder(src: pathlib.Path, template: str) -> tuple[list[Item], list[str]]:
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = []
    for label, name in enumerate(classes):
        caption = template.format(name.replace("_", " "))
        for path in sorted((src / name).rglob("*")):
            if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTS:
                rel = path.relative_to(src).as_posix()
                items.append(Item(key=rel, image=os.fspath(path), captions=[caption], label=label))
    return items, classes


def make_plan(src: pathlib.Path | str, shard_size: int, template: str) -> dict:
    """{"kind", "classnames", "units": [[Item...]], "skipped": [...]} for ``src``; for a source in an object store
    {"kind", "classnames", "tars": [[url, size]...], "skipped": []} (``plan_tars``)."""
    if paths.is_remote(src):
        return plan_tars(os.fspath(src))
    if is_pattern(src) and not src.exists():
        units, skipped = plan_webdataset([pathlib.Path(t) for t in list_tars(os.fspath(src))])
        kind, classnames = "webdataset", None
    elif src.is_file() and src.suffix.lower() in (".csv", ".jsonl", ".json"):
        items, skipped = plan_table(src)
        kind, classnames = "table", None
        units = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    elif src.is_dir() and sorted(src.glob("*.tar")):
        units, skipped = plan_webdataset(sorted(src.glob("*.tar")))
        kind, classnames = "webdataset", None
    elif src.is_dir():
        items, classnames = plan_image_folder(src, template)
        if not classnames:
            raise IngestError(f"{src}: no .tar shards and no class subfolders: not a dataset source")
        kind, skipped = "imagefolder", []
        units = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    else:
        raise IngestError(f"{src}: expected a .csv/.jsonl file, a folder of .tar shards or an ImageFolder")
    if not any(units):
        raise IngestError(_nothing_usable(src, skipped) if skipped else f"{src}: no records found")
    return {"kind": kind, "classnames": classnames, "units": units, "skipped": skipped}


def unit_count(plan: dict) -> int:
    return len(plan["tars"]) if "tars" in plan else len(plan["units"])


def _fingerprint(plan: dict) -> str:
    """A digest of what the plan reads: every unit's items (members of each tar, rows, files), or for a source in an
    object store (planned on the workers) the tar listing with the sizes."""
    if "tars" in plan:
        payload = json.dumps([["tars", plan["tars"]], plan["classnames"]])
    else:
        payload = json.dumps([[dataclasses.astuple(i) for i in u] for u in plan["units"]] + [plan["classnames"]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- workers


def oversized_image(data: bytes) -> str | None:
    """Why the image ``data`` must not be decoded, from its header alone: more pixels than PIL decodes without a
    decompression-bomb warning (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 M; a 30000² PNG of a few KB decodes to 2.7 GB).
    None when it may be (or when the header does not parse: decoding then says why)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as e:
        return f"decompression bomb: {e}"
    except Exception:  # not an image PIL knows: decoding reports it
        return None
    if limit and width * height > limit:
        return (f"decompression bomb: {width}x{height} = {width * height:,} pixels, more than PIL's limit of "
                f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS)")
    return None


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


# ----------------------------------------------------------------------------------------------- driver


@dataclasses.dataclass
class Summary:
    directory: pathlib.Path
    split: str
    records: int
    image_bytes: int
    skipped: int
    units_done: int
    units_reused: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.directory} [{self.split}]: {self.records} records, {self.image_bytes / 1e6:.1f} MB of images, "
                f"{self.skipped} skipped (see {REPORT}); {self.units_done} shards written, "
                f"{self.units_reused} reused, {self.seconds:.1f} s")


def _sanitize(name: str) -> str:
    clean = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
    return clean if clean and clean[0].isalpha() else f"ds_{clean}"


def _load_json(path: paths.Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IngestError(f"{path}: unreadable ({e}); it was written by an interrupted or other program") from None


def _nothing_usable(src: pathlib.Path | str, skipped: list[dict], report: paths.Path | None = None) -> str:
    """The one-line error of an ingestion where every record was skipped: the count and the first reasons."""
    first = "; ".join(f"{x['key'] if x['key'] is not None else x['source']}: {x['reason']}"
                      for x in skipped[:FIRST_REASONS])
    where = f"; every reason is in {report}" if report is not None else ""
    return f"{src}: nothing to ingest: all {len(skipped)} records were skipped (first: {first}){where}"


def check_output(out: paths.Path, src: pathlib.Path | str) -> None:
    """Refuse an --output that holds files this command did not write (see the module docstring)."""
    if out.exists() and not out.is_dir():
        raise IngestError(f"--output {out} is an existing file; give a new or empty directory")
    if not paths.is_remote(out) and not paths.is_remote(src) and src.is_dir() \
            and out.resolve().is_relative_to(src.resolve()):
        raise IngestError(f"--output {out} is inside the source {src}; choose a directory outside it")
    if not out.exists() or (out / STATE_DIR / MANIFEST).is_file():
        return
    present = sorted(p.name for p in out.iterdir())
    if present:
        raise IngestError(f"--output {out} holds files not written by clipjax.data.ingest (e.g. {present[0]!r}); "
                          f"choose a new or empty directory")


def _prepare(out: paths.Path, name: str | None, split: str, src: pathlib.Path | str, plan: dict) -> dict:
    """The manifest of `out` with `split` planned (written to `out`), after the checks that refuse mixing."""
    manifest_path = out / STATE_DIR / MANIFEST
    manifest = _load_json(manifest_path) or {"name": _sanitize(name or out.name), "splits": {}}
    if name is not None and _sanitize(name) != manifest["name"]:
        raise IngestError(f"{out} already holds dataset {manifest['name']!r}, not {_sanitize(name)!r}")
    fingerprint = _fingerprint(plan)
    previous = manifest["splits"].get(split)
    if previous and previous["fingerprint"] != fingerprint:
        raise IngestError(f"{out}: split {split!r} was ingested from a different source listing "
                          f"({previous['source']}); use a new --output or --split")
    for other, info in manifest["splits"].items():
        if other != split and info["classnames"] != plan["classnames"]:
            raise IngestError(f"{out}: split {split!r} has classes {plan['classnames']} but split {other!r} "
                              f"has {info['classnames']}")
    manifest["splits"][split] = {"source": os.fspath(src), "kind": plan["kind"], "fingerprint": fingerprint,
                                 "classnames": plan["classnames"], "units": unit_count(plan)}
    if "tars" in plan:  # its tars are listed by the workers, their keys kept in .ingest/SPLIT-NNNNN.keys.json
        manifest["splits"][split]["planned"] = "workers"
    paths.write_text(manifest_path, json.dumps(manifest, indent=1))
    return manifest


def ingest(
    src: str | os.PathLike,
    output: str | os.PathLike,
    *,
    name: str | None = None,
    split: str = "train",
    workers: int | None = None,
    shard_size: int = 2_000,
    template: str = DEFAULT_TEMPLATE,
    progress: bool = True,
    runner: str | None = None,
    pipeline_args: Sequence[str] = (),
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Summary:
    """Ingests ``src`` as split ``split`` of the dataset directory ``output`` (see the module docstring): the units
    are written by a local process pool of ``workers``, or with ``runner`` (a Beam runner name) by an Apache Beam
    pipeline with the options ``pipeline_args`` (``--flag=value`` strings). An image file or tar member larger than
    ``max_image_bytes`` is skipped (and reported) without being read."""
    start = time.time()
    if max_image_bytes < 1:
        raise IngestError(f"--max-image-bytes must be at least 1, got {max_image_bytes}")
    if paths.is_remote(src):
        src = os.fspath(src)
        if src.lower().endswith((".csv", ".jsonl", ".json")):
            raise IngestError(f"{src}: a table is read on this machine, with its images (copy it and them here "
                              f"first); only webdataset .tar shards are ingested from an object store")
    else:
        src = pathlib.Path(src).expanduser()
    name_of_src = pathlib.PurePosixPath(os.fspath(src)).name
    out = paths.as_path(output) if paths.is_remote(output) else pathlib.Path(output).expanduser()
    if runner is not None:
        if runner.lower().removesuffix("runner") == "dataflow" and not paths.is_remote(out):
            raise IngestError(f"--runner {runner} writes from cloud workers: --output must be in a bucket "
                              f"(gs://BUCKET/DIR), not {out}")
        _beam()  # fail before any work without Apache Beam
    if not paths.is_remote(src) and not is_pattern(src) and not src.exists():
        raise FileNotFoundError(f"ingest source not found: {src}")
    if "{}" not in template:
        raise IngestError(f"caption template must contain '{{}}', got {template!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", split or ""):
        raise IngestError(f"--split {split!r}: a split name is letters, digits, _ and - (it names the shard files)")
    with paths.storage_errors(out, "write"):
        check_output(out, src)
        plan = make_plan(src, shard_size, template)
        manifest = _prepare(out, name, split, src, plan)
        if "tars" in plan:
            done = _run_tars(out, manifest, split, plan, workers, progress, runner, pipeline_args, name_of_src,
                             max_image_bytes=max_image_bytes)
            return _finish(out, manifest, split, plan, done, start)
        tasks = list(_pending(out, manifest, split, plan, max_image_bytes).values())
        total = sum(len(u) for u in plan["units"])
        bar = tqdm(total=total, desc=f"ingesting {name_of_src}", unit="img",
                   disable=not progress or runner is not None)
        bar.update(total - sum(len(t.items) for t in tasks))
        if runner is not None:
            run_beam(tasks, runner, pipeline_args)
        else:
            _run_pool(tasks, workers, bar)
        bar.close()
        return _finish(out, manifest, split, plan, len(tasks), start)


def _unit_paths(out: paths.Path, manifest: dict, split: str, i: int, count: int) -> tuple[str, str]:
    """(shard, report) of unit `i` of `count`."""
    shard = out / records.shard_filename(manifest["name"], split, i, count)
    return os.fspath(shard), os.fspath(out / STATE_DIR / f"{split}-{i:05d}.json")


def _pending(out: paths.Path, manifest: dict, split: str, plan: dict,
             max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> dict[int, UnitTask]:
    """{unit index: task} of the units of `split` not yet done (a unit is done when its shard and its report
    exist)."""
    count = unit_count(plan)
    tasks = {}
    for i in range(count):
        shard, report = _unit_paths(out, manifest, split, i, count)
        if not (paths.as_path(shard).exists() and paths.as_path(report).exists()):
            if "tars" in plan:
                tasks[i] = UnitTask([], shard, report, plan["classnames"], tar=plan["tars"][i][0],
                                    max_image_bytes=max_image_bytes)
            else:
                tasks[i] = UnitTask(plan["units"][i], shard, report, plan["classnames"],
                                    max_image_bytes=max_image_bytes)
    return tasks


def _keys_file(out: paths.Path, split: str, i: int) -> paths.Path:
    return out / STATE_DIR / f"{split}-{i:05d}.keys.json"


def _run_tars(out: paths.Path, manifest: dict, split: str, plan: dict, workers: int | None, progress: bool,
              runner: str | None, pipeline_args: Sequence[str], name: str,
              max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> int:
    """Runs the units of a source planned on the workers (``plan_tars``): stage "list" (``list_unit``) for every tar
    (a tar listed by an earlier run is not read again), the duplicate keys across tars (the first tar in listing
    order keeps a key), then stage "write" (``ingest_unit``) for the units not done; returns their number."""
    pending = _pending(out, manifest, split, plan, max_image_bytes)
    if not pending:
        return 0
    listing = [ListTask(i, url, os.fspath(_keys_file(out, split, i))) for i, (url, _) in enumerate(plan["tars"])]
    if runner is not None:
        run_beam_tars(listing, pending, runner, pipeline_args)
    else:
        _run_pool_tars(listing, pending, workers, progress, name)
    return len(pending)


def _duplicates(listings: Sequence[Sequence[str]]) -> dict[int, list[str]]:
    """{tar index: its keys that an earlier tar holds} from each tar's keys, in listing order."""
    seen: set[str] = set()
    drops = {}
    for i, keys in enumerate(listings):
        dup = [k for k in keys if k in seen]
        if dup:
            drops[i] = dup
        seen.update(keys)
    return drops


def _pool_map(pool: cf.Executor | None, fn, tasks: Sequence, bar: tqdm, weight=lambda task: 1) -> Iterator:
    """``fn(task)`` for each of `tasks`, in this process (`pool` None) or on `pool`, in completion order."""
    if pool is None:
        for task in tasks:
            result = fn(task)
            bar.update(weight(task))
            yield result
        return
    futures = {pool.submit(fn, t): weight(t) for t in tasks}
    for done in cf.as_completed(futures):
        result = done.result()
        bar.update(futures[done])
        yield result


@contextlib.contextmanager
def _pool(workers: int | None, count: int) -> Iterator[cf.Executor | None]:
    """A pool of `workers` processes (default: the CPU count; no more than `count`), or None for 0 or 1."""
    workers = min(os.cpu_count() or 1, count) if workers is None else min(workers, count)
    if workers <= 1:
        yield None
        return
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def _run_pool(tasks: list[UnitTask], workers: int | None, bar: tqdm) -> None:
    """The local driver: `tasks` in this process (``workers`` 0 or 1) or a pool of worker processes."""
    with _pool(workers, len(tasks)) as pool:
        for _ in _pool_map(pool, ingest_unit, tasks, bar, lambda t: len(t.items)):
            pass


def _run_pool_tars(listing: list[ListTask], pending: dict[int, UnitTask], workers: int | None, progress: bool,
                   name: str) -> None:
    """The local driver for a source planned on the workers: the pool lists every tar, this process gathers the
    keys and finds the duplicates, the pool writes the pending units."""
    with _pool(workers, len(listing)) as pool:
        keys: list[list[str]] = [[] for _ in listing]
        with tqdm(total=len(listing), desc=f"listing {name}", unit="tar", disable=not progress) as bar:
            for i, tar_keys in _pool_map(pool, list_unit, listing, bar):
                keys[i] = tar_keys
        drops = _duplicates(keys)
        del keys
        tasks = [dataclasses.replace(t, drop=drops.get(i, [])) for i, t in pending.items()]
        with tqdm(total=len(listing), initial=len(listing) - len(tasks), desc=f"ingesting {name}", unit="tar",
                  disable=not progress) as bar:
            for _ in _pool_map(pool, ingest_unit, tasks, bar):
                pass


def _beam():
    """The ``apache_beam`` module, imported only for ``--runner``."""
    try:
        import apache_beam
    except ImportError:
        raise IngestError('--runner needs Apache Beam: pip install "clipjax[beam]"') from None
    return apache_beam


def _pipeline(runner: str, pipeline_args: Sequence[str]):
    """(the apache_beam module, a Pipeline on `runner` with the options `pipeline_args`), for ``with pipeline:``."""
    beam = _beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    return beam, beam.Pipeline(options=PipelineOptions(list(pipeline_args), runner=runner))


def run_beam(tasks: Sequence[UnitTask], runner: str, pipeline_args: Sequence[str] = ()) -> None:
    """The Beam driver: a pipeline ``Create(tasks) | Reshuffle | Map(ingest_unit)`` run to completion on ``runner``
    with the options ``pipeline_args`` (``--project=...``, ``--region=...``, ...: Beam's PipelineOptions). The
    reports are read back from the output afterwards, as for the local driver."""
    if not tasks:
        return
    beam, pipeline = _pipeline(runner, pipeline_args)
    with pipeline:
        _ = (pipeline
             | "units" >> beam.Create(list(tasks), reshuffle=False)
             | "spread over workers" >> beam.Reshuffle()
             | "ingest_unit" >> beam.Map(ingest_unit))


def _key_and_tar(listed: tuple[int, list[str]]) -> Iterator[tuple[str, int]]:
    index, keys = listed
    return ((key, index) for key in keys)


def _later_tars(key_tars: tuple[str, Sequence[int]]) -> Iterator[tuple[int, str]]:
    """(tar index, key) for every tar holding `key` but the first in listing order."""
    key, tars = key_tars
    return ((index, key) for index in sorted(set(tars))[1:])


def _write_unit(joined: tuple[int, dict]) -> dict | None:
    """``ingest_unit`` of a pending unit with the keys to drop that the pipeline found for its tar."""
    _, parts = joined
    units = list(parts["unit"])
    return ingest_unit(dataclasses.replace(units[0], drop=list(parts["drop"]))) if units else None


def run_beam_tars(listing: Sequence[ListTask], pending: dict[int, UnitTask], runner: str,
                  pipeline_args: Sequence[str] = ()) -> None:
    """The Beam driver for a source planned on the workers (``plan_tars``): a pipeline

        Create(listing) | Reshuffle | Map(list_unit)                  (tar index, its keys), every tar
          | FlatMap (key, tar index) | GroupByKey | FlatMap _later_tars   (tar index, key) to drop: duplicates
        {Create(pending units), drops} | CoGroupByKey | Map(_write_unit)   the pending units written

    so the keys are grouped by the runner's shuffle, never gathered on one machine."""
    if not pending:
        return
    beam, pipeline = _pipeline(runner, pipeline_args)
    with pipeline:
        drops = (pipeline
                 | "tars" >> beam.Create(list(listing), reshuffle=False)
                 | "spread tars over workers" >> beam.Reshuffle()
                 | "list_unit" >> beam.Map(list_unit)
                 | "key, tar" >> beam.FlatMap(_key_and_tar)
                 | "tars by key" >> beam.GroupByKey()
                 | "duplicates" >> beam.FlatMap(_later_tars))
        units = pipeline | "units" >> beam.Create(sorted(pending.items()), reshuffle=False)
        _ = ({"unit": units, "drop": drops}
             | "drops by unit" >> beam.CoGroupByKey()
             | "ingest_unit" >> beam.Map(_write_unit))


def _drop_split(out: paths.Path, manifest: dict, split: str) -> None:
    """Remove `split`'s shards, unit reports and manifest entry (a split with no records is not a dataset)."""
    state, dsname, count = out / STATE_DIR, manifest["name"], manifest["splits"][split]["units"]
    for i in range(count):
        (out / records.shard_filename(dsname, split, i, count)).unlink(missing_ok=True)
        (state / f"{split}-{i:05d}.json").unlink(missing_ok=True)
        if manifest["splits"][split].get("planned") == "workers":
            _keys_file(out, split, i).unlink(missing_ok=True)
    del manifest["splits"][split]
    paths.write_text(state / MANIFEST, json.dumps(manifest, indent=1))


def _finish(out: paths.Path, manifest: dict, split: str, plan: dict, done: int, start: float) -> Summary:
    state, dsname = out / STATE_DIR, manifest["name"]
    lengths, reports = {}, {}
    for s, info in manifest["splits"].items():
        unit_reports = [_load_json(state / f"{s}-{i:05d}.json") for i in range(info["units"])]
        if all(r is not None for r in unit_reports):  # a split of an interrupted run stays out until done
            lengths[s] = [r["records"] for r in unit_reports]
            reports[s] = unit_reports
    mine = reports[split]
    skipped = (plan["skipped"] + [x for r in mine for x in r.get("plan_skipped", ())]
               + [x for r in mine for x in r["skipped"]])
    report = _load_json(out / REPORT) or {}
    report[split] = {"source": manifest["splits"][split]["source"], "records": sum(lengths[split]),
                     "image_bytes": sum(r["image_bytes"] for r in mine), "skipped": skipped}
    paths.write_text(out / REPORT, json.dumps(report, indent=1))
    if not sum(lengths[split]):
        source = manifest["splits"][split]["source"]
        _drop_split(out, manifest, split)
        raise IngestError(_nothing_usable(source, skipped, out / REPORT))
    metadata = dict(
        name=dsname, features=records.image_text_features(plan["classnames"]), shard_lengths=lengths,
        description=f"Image-text data ingested by clipjax.data.ingest from {manifest['splits'][split]['source']}.",
        metadata={"ingest": {s: {k: v for k, v in i.items() if k != "classnames"}
                             for s, i in manifest["splits"].items() if s in lengths}},
    )
    if paths.is_remote(out):  # written here from the shards' sizes in the unit reports, then uploaded
        with tempfile.TemporaryDirectory(prefix="clipjax-ingest-") as tmp:
            shards = [records.shard_filename(dsname, s, i, len(n)) for s, n in lengths.items() for i in range(len(n))]
            for shard in shards:  # empty stand-ins: TFDS lists the shards' names
                (pathlib.Path(tmp) / shard).touch()
            records.write_metadata(tmp, **metadata,
                                   shard_bytes={s: [r["shard_bytes"] for r in reports[s]] for s in lengths})
            for shard in shards:
                (pathlib.Path(tmp) / shard).unlink()
            paths.upload_dir(pathlib.Path(tmp), out)
    else:
        records.write_metadata(out, **metadata)
    return Summary(out, split, report[split]["records"], report[split]["image_bytes"], len(skipped), done,
                   unit_count(plan) - done, time.time() - start)


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m clipjax.data.ingest", description=__doc__)
    parser.add_argument("src", help="a .csv/.jsonl file, a folder of webdataset .tar shards (or their brace pattern "
                                    "or glob, local or gs://, s3://), or an ImageFolder")
    parser.add_argument("--output", required=True,
                        help="dataset directory to write (read it with dir:DIR): new, empty, or an earlier output "
                             "of this command; gs://BUCKET/DIR (or s3://) writes it to an object store")
    parser.add_argument("--name", default=None, help="dataset name (default: the output folder's name)")
    parser.add_argument("--split", default="train", help="split name: letters, digits, _ and - (default train)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    parser.add_argument("--shard-size", type=int, default=2_000, help="records per shard (tables, ImageFolders)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="ImageFolder caption template")
    parser.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                        help=f"image files (and tar members) larger than this are skipped and reported, not read "
                             f"(default {DEFAULT_MAX_IMAGE_BYTES >> 20} MiB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--runner", default=None,
                        help="write the units with an Apache Beam pipeline on this runner (DirectRunner, "
                             "DataflowRunner, FlinkRunner, SparkRunner, ...) instead of the local process pool; "
                             "any other --flag=value is passed to Beam as a pipeline option (needs clipjax[beam])")
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse `argv` and ingest; bad input raises."""
    parser = _parser()
    args, pipeline_args = parser.parse_known_args(argv)
    stray = [a for i, a in enumerate(pipeline_args) if not a.startswith("-")
             and not (i and pipeline_args[i - 1].startswith("-") and "=" not in pipeline_args[i - 1])]
    if stray:  # e.g. an unquoted `/data/{00000..00099}.tar`: the shell made one source argument per shard
        parser.error(f"more than one source given ({args.src!r}, {stray[0]!r}{', ...' if len(stray) > 1 else ''}): "
                     f"quote a {{a..b}} or * pattern so that it reaches ingest as one argument")
    if pipeline_args and args.runner is None:
        parser.error(f"unrecognized arguments: {' '.join(pipeline_args)} (Beam pipeline options need --runner)")
    if args.shard_size < 1:
        raise IngestError(f"--shard-size must be at least 1, got {args.shard_size}")
    summary = ingest(args.src, args.output, name=args.name, split=args.split, workers=args.workers,
                     shard_size=args.shard_size, template=args.template, progress=not args.quiet,
                     runner=args.runner, pipeline_args=pipeline_args, max_image_bytes=args.max_image_bytes)
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: 0, or 2 after one `error: ...` line for bad input."""
    return cli.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
