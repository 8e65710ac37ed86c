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
import dataclasses
import json
import multiprocessing
import os
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

from tqdm import tqdm

from clipjax import cli, paths
from clipjax.data import records
from clipjax.data.ingest.plan import (  # noqa: F401  (the interface of clipjax.data.ingest)
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_TEMPLATE,
    FIRST_REASONS,
    IMAGE_EXTS,
    IngestError,
    Item,
    MANIFEST,
    REPORT,
    STATE_DIR,
    _fingerprint,
    _nothing_usable,
    is_pattern,
    list_tars,
    make_plan,
    plan_image_folder,
    plan_table,
    plan_tars,
    plan_webdataset,
    unit_count,
)
from clipjax.data.ingest.units import (  # noqa: F401  (the interface of clipjax.data.ingest)
    ListTask,
    UnitTask,
    _check_image,
    ingest_unit,
    list_unit,
    read_image_file,
)
from clipjax.data.ingest.beam import (  # noqa: F401  (the interface of clipjax.data.ingest)
    _beam,
    _key_and_tar,
    _later_tars,
    _write_unit,
    run_beam,
    run_beam_tars,
)
from clipjax.data.preprocess import oversized_image  # noqa: F401  (re-exported)
from clipjax.data.wds_names import (  # noqa: F401  (re-exported)
    WDS_IMAGE_EXTS,
    member_key,
    sample_captions,
    sample_image_ext,
)


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
