"""Ingest user image-text data into a clipjax dataset directory (read back with the ``"dir:DIR"`` spec).

    python -m clipjax.data.ingest SRC --output DIR [--name NAME] [--split train] [--workers N]

SRC is one of

    *.csv / *.jsonl   columns ``image`` (path, relative to the file or absolute) and ``caption`` (a string;
                      in JSONL also a list; in CSV a JSON list ``["a", "b"]`` is read as a list). Several
                      captions per image: repeated rows or a list. Rows with the same image are merged.
    a folder of .tar  webdataset shards as img2dataset writes them: ``KEY.jpg|jpeg|png|webp`` + ``KEY.txt``
                      (or a ``caption`` field in ``KEY.json``). Keys are de-duplicated across shards.
    an ImageFolder    one subfolder per class; each image gets the caption ``--template`` ("a photo of a {}.")
                      with the folder name (``_`` read as a space) and the class index as label.

Every image is fully decoded (``preprocess.load_image``: any PIL mode, converted to RGB) to check it; the
bytes written are the file's own, never re-encoded. Skipped (and listed with the reason in
``DIR/ingest_report.json``): missing or zero-size files, undecodable bytes or modes, images with a zero
side, records without a non-empty caption, duplicate keys.

Work is cut into units (``--shard-size`` records, or one per input tar), each written by a worker process
as one ArrayRecord shard via a temp file; ``DIR/.ingest/`` keeps the plan and one report per finished unit,
so a re-run after an interruption only does the missing units (and refuses if SRC changed meanwhile).
Running again with another ``--split`` adds that split to the same directory.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import re
import sys
import tarfile
import time
from collections.abc import Iterator

from tqdm import tqdm

from clipjax.data import records
from clipjax.data.preprocess import load_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_TEMPLATE = "a photo of a {}."
STATE_DIR = ".ingest"
REPORT = "ingest_report.json"


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
    return [str(value).strip()]


def _table_rows(src: pathlib.Path) -> Iterator[tuple[int, dict]]:
    if src.suffix.lower() == ".csv":
        with open(src, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{src}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
            yield from enumerate(reader, start=2)
        return
    with open(src, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{src}:{line_no}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict) or "image" not in row:
                    raise ValueError(f"{src}:{line_no}: expected an object with an 'image' field")
                yield line_no, row


def plan_table(src: pathlib.Path) -> list[Item]:
    by_image: dict[str, Item] = {}
    for _, row in _table_rows(src):
        ref = str(row["image"]).strip()
        path = ref if os.path.isabs(ref) else os.fspath(src.parent / ref)
        caps = _captions(row.get("caption", row.get("captions")))
        if ref in by_image:
            by_image[ref].captions.extend(caps)
        else:
            by_image[ref] = Item(key=ref, image=path, captions=caps)
    return list(by_image.values())


def plan_webdataset(tars: list[pathlib.Path]) -> tuple[list[list[Item]], list[dict]]:
    """One unit per tar; duplicate keys (first occurrence kept) are reported."""
    units, dupes, seen = [], [], set()
    for tar in tars:
        groups: dict[str, dict[str, str]] = {}
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)
                key = os.path.join(os.path.dirname(m.name), stem)
                groups.setdefault(key, {})[ext.lower()] = m.name
        items = []
        for key, files in groups.items():
            image = next((files[e] for e in WDS_IMAGE_EXTS if e in files), None)
            if key in seen:
                dupes.append({"key": key, "source": os.fspath(tar), "reason": "duplicate key"})
                continue
            seen.add(key)
            items.append(Item(key=key, image=image or "", captions=[], tar=os.fspath(tar),
                              txt=files.get("txt", ""), json=files.get("json", "")))
        units.append(items)
    return units, dupes


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


def make_plan(src: pathlib.Path, shard_size: int, template: str) -> dict:
    """{"kind", "classnames", "units": [[Item...]], "skipped": [...]} for ``src``."""
    if src.is_file() and src.suffix.lower() in (".csv", ".jsonl", ".json"):
        items = plan_table(src)
        kind, classnames, skipped = "table", None, []
        units = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    elif src.is_dir() and sorted(src.glob("*.tar")):
        units, skipped = plan_webdataset(sorted(src.glob("*.tar")))
        kind, classnames = "webdataset", None
    elif src.is_dir():
        items, classnames = plan_image_folder(src, template)
        if not classnames:
            raise ValueError(f"{src}: no .tar shards and no class subfolders: not a dataset source")
        kind, skipped = "imagefolder", []
        units = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    else:
        raise ValueError(f"{src}: expected a .csv/.jsonl file, a folder of .tar shards or an ImageFolder")
    if not any(units):
        raise ValueError(f"{src}: no records found")
    return {"kind": kind, "classnames": classnames, "units": units, "skipped": skipped}


def _fingerprint(plan: dict) -> str:
    payload = json.dumps([[dataclasses.astuple(i) for i in u] for u in plan["units"]] + [plan["classnames"]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- workers


def _check_image(data: bytes) -> str | None:
    """None if ``data`` decodes to a non-empty image, else the reason."""
    if not data:
        return "zero-size file"
    try:
        image = load_image(data)
    except Exception as e:
        return str(e)
    if image.width == 0 or image.height == 0:
        return "image has a zero side"
    return None


def _read_item(item: Item, tar: tarfile.TarFile | None) -> tuple[bytes | None, list[str], str | None]:
    """(image bytes, captions, error)."""
    if tar is None:
        try:
            with open(item.image, "rb") as f:
                return f.read(), item.captions, None
        except OSError as e:
            return None, [], f"cannot read {item.image}: {e.strerror or e}"
    if not item.image:
        return None, [], "no image file (jpg/jpeg/png/webp) for this key"
    data = tar.extractfile(item.image).read()
    captions = []
    if item.txt:
        captions = _captions(tar.extractfile(item.txt).read().decode("utf-8", errors="replace"))
    elif item.json:
        try:
            meta = json.loads(tar.extractfile(item.json).read())
            captions = _captions(meta.get("caption") if isinstance(meta, dict) else None)
        except json.JSONDecodeError:
            captions = []
    return data, captions, None


def _ingest_unit(unit: list[Item], out_path: str, report_path: str, features_spec: list[str] | None) -> dict:
    feats = records.image_text_features(features_spec)
    skipped: list[dict] = []
    tar = tarfile.open(unit[0].tar) if unit and unit[0].tar else None
    try:
        with records.ShardWriter(out_path, feats) as writer:
            for item in unit:
                source = item.tar or item.image
                data, captions, error = _read_item(item, tar)
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
        if tar is not None:
            tar.close()
    tmp = report_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, report_path)
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


def _load_json(path: pathlib.Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


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
) -> Summary:
    """Ingests ``src`` as split ``split`` of the dataset directory ``output`` (see the module docstring)."""
    start = time.time()
    src, out = pathlib.Path(src).expanduser(), pathlib.Path(output).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"ingest source not found: {src}")
    if "{}" not in template:
        raise ValueError(f"caption template must contain '{{}}', got {template!r}")
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    manifest_path = state / "manifest.json"
    manifest = _load_json(manifest_path) or {"name": _sanitize(name or out.name), "splits": {}}
    if name is not None and _sanitize(name) != manifest["name"]:
        raise ValueError(f"{out} already holds dataset {manifest['name']!r}, not {_sanitize(name)!r}")
    plan = make_plan(src, shard_size, template)
    fingerprint = _fingerprint(plan)
    previous = manifest["splits"].get(split)
    if previous and previous["fingerprint"] != fingerprint:
        raise ValueError(f"{out}: split {split!r} was ingested from a different source listing "
                         f"({previous['source']}); use a new --output or --split")
    for other, info in manifest["splits"].items():
        if other != split and info["classnames"] != plan["classnames"]:
            raise ValueError(f"{out}: split {split!r} has classes {plan['classnames']} but split {other!r} "
                             f"has {info['classnames']}")
    manifest["splits"][split] = {"source": os.fspath(src), "kind": plan["kind"], "fingerprint": fingerprint,
                                 "classnames": plan["classnames"], "units": len(plan["units"])}
    manifest_path.write_text(json.dumps(manifest, indent=1))

    dsname, count = manifest["name"], len(plan["units"])
    tasks = []
    for i, unit in enumerate(plan["units"]):
        shard = out / records.shard_filename(dsname, split, i, count)
        report = state / f"{split}-{i:05d}.json"
        if not (shard.exists() and report.exists()):
            tasks.append((unit, os.fspath(shard), os.fspath(report), plan["classnames"]))
    total = sum(len(u) for u in plan["units"])
    bar = tqdm(total=total, desc=f"ingesting {src.name}", unit="img", disable=not progress)
    bar.update(total - sum(len(t[0]) for t in tasks))
    workers = min(os.cpu_count() or 1, len(tasks)) if workers is None else min(workers, len(tasks))
    if workers <= 1:
        for task in tasks:
            _ingest_unit(*task)
            bar.update(len(task[0]))
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_ingest_unit, *t): len(t[0]) for t in tasks}
            for done in cf.as_completed(futures):
                done.result()
                bar.update(futures[done])
    bar.close()
    return _finish(out, manifest, split, plan, len(tasks), start)


def _finish(out: pathlib.Path, manifest: dict, split: str, plan: dict, done: int, start: float) -> Summary:
    state, dsname = out / STATE_DIR, manifest["name"]
    lengths, reports = {}, {}
    for s, info in manifest["splits"].items():
        unit_reports = [_load_json(state / f"{s}-{i:05d}.json") for i in range(info["units"])]
        if all(r is not None for r in unit_reports):  # a split of an interrupted run stays out until done
            lengths[s] = [r["records"] for r in unit_reports]
            reports[s] = unit_reports
    mine = reports[split]
    skipped = plan["skipped"] + [x for r in mine for x in r["skipped"]]
    report = _load_json(out / REPORT) or {}
    report[split] = {"source": manifest["splits"][split]["source"], "records": sum(lengths[split]),
                     "image_bytes": sum(r["image_bytes"] for r in mine), "skipped": skipped}
    (out / REPORT).write_text(json.dumps(report, indent=1))
    records.write_metadata(
        out, dsname, records.image_text_features(plan["classnames"]), lengths,
        description=f"Image-text data ingested by clipjax.data.ingest from {manifest['splits'][split]['source']}.",
        metadata={"ingest": {s: {k: v for k, v in i.items() if k != "classnames"}
                             for s, i in manifest["splits"].items() if s in lengths}},
    )
    return Summary(out, split, report[split]["records"], report[split]["image_bytes"], len(skipped), done,
                   len(plan["units"]) - done, time.time() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipjax.data.ingest", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="a .csv/.jsonl file, a folder of webdataset .tar shards, or an ImageFolder")
    parser.add_argument("--output", required=True, help="dataset directory to write (read it with dir:DIR)")
    parser.add_argument("--name", default=None, help="dataset name (default: the output folder's name)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    parser.add_argument("--shard-size", type=int, default=2_000, help="records per shard (tables, ImageFolders)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="ImageFolder caption template")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        summary = ingest(args.src, args.output, name=args.name, split=args.split, workers=args.workers,
                         shard_size=args.shard_size, template=args.template, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
