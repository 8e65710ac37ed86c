"""Ingestion plans: the items of a source (a .csv/.jsonl table, webdataset tars, an ImageFolder) grouped into
units, one output shard each (``python -m clipjax.data.ingest``; see ``clipjax.data.ingest``)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import tarfile
from collections.abc import Iterator

from clipjax import cli, paths
from clipjax.data import sources, wds_names
from clipjax.data.wds_names import (  # noqa: F401  (re-exported)
    WDS_IMAGE_EXTS,
    caption_list,
    member_key,
    sample_captions,
    sample_image_ext,
)



IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
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


def _nothing_usable(src: pathlib.Path | str, skipped: list[dict], report: paths.Path | None = None) -> str:
    """The one-line error of an ingestion where every record was skipped: the count and the first reasons."""
    first = "; ".join(f"{x['key'] if x['key'] is not None else x['source']}: {x['reason']}"
                      for x in skipped[:FIRST_REASONS])
    where = f"; every reason is in {report}" if report is not None else ""
    return f"{src}: nothing to ingest: all {len(skipped)} records were skipped (first: {first}){where}"



# ----------------------------------------------------------------------------------------------- planning


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
        caps = caption_list(row.get("caption", row.get("captions")))
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
    spec = sources.WDS_PREFIX + src
    if paths.is_remote(src):
        paths.as_path(src)  # fsspec set up as for every clipjax path (fresh listings) before wds lists
    try:
        with paths.storage_errors(src, "list"):
            tars = wds_names.shard_urls(spec)
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
