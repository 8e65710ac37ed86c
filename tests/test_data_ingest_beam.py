"""The two ingest drivers, the local process pool and an Apache Beam pipeline (here on the DirectRunner), write the
same dataset from the same input, record by record; a Beam re-run redoes only the missing units; both write to a
bucket (a local GCS emulator); and a truncated tar keeps the same samples in ingest as when streamed with ``wds:``; tars in a bucket, planned on the
workers, give the same records as the same tars in a local folder, planned here."""

from __future__ import annotations

import importlib.util
import io
import json
import pathlib
import re
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clipjax import paths
from clipjax.data import ingest, sources, wds
from gcs_emulator import BUCKET, needs_emulator, running_emulator

needs_beam = pytest.mark.skipif(importlib.util.find_spec("apache_beam") is None,
                                reason="needs Apache Beam (pip install -e \".[dev,beam]\"; .ci/run's second stage)")
BEAM = ["--runner", "DirectRunner", "--direct_num_workers=1", "--quiet"]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: pathlib.Path, members) -> pathlib.Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _cut(path: pathlib.Path, member: str, into: int) -> None:
    """Truncates the tar `path` `into` bytes into the data of `member` (negative: that far into its header)."""
    with tarfile.open(path) as tf:
        m = tf.getmember(member)
    at = m.offset_data + into if into >= 0 else m.offset - into
    path.write_bytes(path.read_bytes()[:at])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(folder of webdataset tars, a CSV): a duplicate key across tars, a bad image, a sample without a caption, and
    a tar truncated inside the last member of a complete-looking sample."""
    root = tmp_path_factory.mktemp("beamsrc")
    shards = root / "wds"
    shards.mkdir()
    _tar(shards / "00000.tar", [m for i in range(4) for m in ((f"a{i}.png", _png(i)), (f"a{i}.txt", b"a %d" % i))])
    _tar(shards / "00001.tar", [("a1.png", _png(50)), ("a1.txt", b"duplicate"), ("b0.png", _png(51)),
                                ("b0.json", b'{"caption": "b zero"}'), ("b1.png", b"not an image"), ("b1.txt", b"x"),
                                ("b2.png", _png(52)), ("b3.png", _png(53)), ("b3.txt", b'["b three", "b 3"]')])
    _tar(shards / "00002.tar", [("c0.png", _png(60)), ("c0.txt", b"c zero"), ("c1.png", _png(61)),
                                ("c1.txt", b"c one"), ("c1.json", b'{"caption": "c one json", "pad": "' + b"x" * 900
                                                                   + b'"}'), ("c2.png", _png(62)), ("c2.txt", b"c2")])
    _cut(shards / "00002.tar", "c1.json", 300)
    (root / "pics").mkdir()
    rows = ["image,caption"]
    for i in range(7):
        (root / "pics" / f"{i}.png").write_bytes(_png(100 + i) if i != 3 else b"broken")
        rows.append(f"pics/{i}.png,picture {i}")
    rows.append("pics/0.png,another caption of 0")
    (root / "table.csv").write_text("\n".join(rows) + "\n")
    return shards, root / "table.csv"


def _records(out) -> list[tuple]:
    """Every record of split train in index order: (key, image bytes, captions, label)."""
    src = sources.open_source(f"dir:{out}", "train")
    return [(r.key, r.image, list(r.captions), r.label) for r in (src.record(i) for i in range(len(src)))]


def _json(path) -> dict:
    """A JSON file, with the object addresses that PIL's errors quote (``<_io.BytesIO object at 0x...>``) blanked."""
    return json.loads(re.sub(r" at 0x[0-9a-f]+", " at 0x", pathlib.Path(path).read_text()))


def _unit_reports(out) -> list[dict]:
    return [_json(p) for p in sorted((pathlib.Path(out) / ingest.STATE_DIR).glob("train-*.json"))]


def _assert_same_dataset(a, b) -> None:
    assert _records(a) == _records(b)
    assert _unit_reports(a) == _unit_reports(b)
    assert _json(pathlib.Path(a) / ingest.REPORT) == _json(pathlib.Path(b) / ingest.REPORT)
    split_a = tfds.builder_from_directory(str(a)).info.splits["train"]
    split_b = tfds.builder_from_directory(str(b)).info.splits["train"]
    assert split_a.shard_lengths == split_b.shard_lengths and split_a.num_bytes == split_b.num_bytes


@needs_beam
def test_pool_and_beam_write_the_same_records(inputs, tmp_path):
    shards, table = inputs
    for src, extra in ((shards, []), (table, ["--shard-size", "2"])):
        pool, beam = tmp_path / f"{src.stem}-pool", tmp_path / f"{src.stem}-beam"
        assert ingest.main([str(src), "--output", str(pool), "--workers", "2", "--quiet", *extra]) == 0
        assert ingest.main([str(src), "--output", str(beam), *BEAM, *extra]) == 0
        _assert_same_dataset(pool, beam)
    keys = [r[0] for r in _records(tmp_path / "wds-beam")]
    assert keys == ["a0", "a1", "a2", "a3", "b0", "b3", "c0"]  # c1 is cut by the damage, c2 lies after it
    skipped = json.loads((tmp_path / "wds-beam" / ingest.REPORT).read_text())["train"]["skipped"]
    expected = {None: "damaged shard", "c1": "the shard's damage cuts this sample", "a1": "duplicate key",
                "b1": "cannot decode image", "b2": "empty caption"}
    assert len(skipped) == len(expected) and all(x["reason"].startswith(expected[x["key"]]) for x in skipped)
    assert len(_records(tmp_path / "table-beam")) == 6


@needs_beam
def test_beam_rerun_redoes_only_the_missing_unit(inputs, tmp_path):
    _, table = inputs
    out = tmp_path / "out"
    args = [str(table), "--output", str(out), "--shard-size", "2"]
    first = ingest.ingest(table, out, shard_size=2, runner="DirectRunner", progress=False)
    assert (first.units_done, first.units_reused) == (4, 0)
    shards = sorted(out.glob("*.array_record-*"))
    before, records = {p: p.stat().st_mtime_ns for p in shards}, _records(out)
    shards[1].unlink()  # as if its worker died before finishing
    again = ingest.ingest(table, out, shard_size=2, runner="DirectRunner", progress=False)
    assert (again.units_done, again.units_reused) == (1, 3)
    assert all(p.stat().st_mtime_ns == before[p] for p in shards if p != shards[1])
    assert _records(out) == records
    assert ingest.main([*args, *BEAM]) == 0  # nothing left to do: no pipeline runs


def test_cli_refusals_are_one_line(inputs, tmp_path, capsys, monkeypatch):
    """Without a request: a table in a bucket (only tars are ingested from one), a pattern naming missing tars."""
    _, table = inputs

    def error(*argv: str) -> str:
        try:
            code = ingest.main(list(argv))
        except SystemExit as e:  # a usage error
            code = e.code
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    t = str(table)
    assert "--project=p" in error(t, "--output", str(tmp_path / "a"), "--project=p")  # options need --runner
    assert "--output must be in a bucket" in error(t, "--output", str(tmp_path / "b"), "--runner", "DataflowRunner")
    assert "only webdataset .tar shards" in error("gs://b/table.csv", "--output", str(tmp_path / "c"))
    shards, _ = inputs
    assert "7 of its 10 tars do not exist" in error(f"{shards}/{{00000..00009}}.tar", "--output", str(tmp_path / "e"))
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # not installed
    assert error(t, "--output", str(tmp_path / "d"), "--runner", "DirectRunner") == \
        'error: --runner needs Apache Beam: pip install "clipjax[beam]"'
    assert not (tmp_path / "d").exists()


# ============================================================================================ truncated tars

def _streamed_keys(shard: pathlib.Path) -> list[str]:
    """The keys of the samples ``clipjax.data.wds`` streams from `shard` (one epoch)."""
    reader = wds.ShardReader(f"wds:{shard}", [str(shard)], seed=0, process_index=0)
    keys = []
    try:
        while (sample := next(reader)).id[0] == 0:
            keys.append(sample.where.rsplit(":", 1)[1])
    except sources.DatasetError:  # no usable sample at all
        pass
    reader.close()
    return keys


SAMPLE = [("s0.png", 0), ("s0.txt", b"zero"), ("s1.png", 1), ("s1.txt", b"one"), ("s1.json", b'{"caption": "1"}'),
          ("s2.png", 2), ("s2.txt", b"two"), ("s3.png", 3), ("s3.txt", b"three")]


@pytest.mark.parametrize("member,into", [
    ("s2.png", 40),     # inside the first member of a sample: the samples before it are kept
    ("s1.txt", 1),      # inside a later member of a sample: that sample is lost
    ("s1.json", 5),     # inside the last member of a sample whose image and caption are complete: lost too
    ("s2.png", -100),   # inside a header: the samples before it are kept
    ("s3.txt", 0),      # at the end of a header, no data: the cut sample is lost
])
def test_truncated_tar_keeps_the_same_samples_as_streaming(tmp_path, member, into, capsys):
    """test_badinput_ingest and test_data_wds each check their side on one cut; here ingest keeps exactly the
    samples the stream yields, for cuts in every place of a sample."""
    src = tmp_path / "wds"
    src.mkdir()
    shard = _tar(src / "00000.tar", [(n, _png(d) if isinstance(d, int) else d) for n, d in SAMPLE])
    _cut(shard, member, into)
    streamed = _streamed_keys(shard)
    ingest.ingest(src, tmp_path / "out", workers=0, progress=False)
    assert [r[0] for r in _records(tmp_path / "out")] == streamed
    assert streamed  # every cut keeps s0
    report = json.loads((tmp_path / "out" / ingest.REPORT).read_text())["train"]
    assert any(x["reason"].startswith("damaged shard") for x in report["skipped"])
    assert "truncated or damaged shard" in capsys.readouterr().err


def test_garbage_in_place_of_a_header_keeps_the_same_samples_as_streaming(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    shard = _tar(src / "00000.tar", [(n, _png(d) if isinstance(d, int) else d) for n, d in SAMPLE])
    with tarfile.open(shard) as tf:
        at = tf.getmember("s2.png").offset
    data = bytearray(shard.read_bytes())
    data[at : at + 512] = b"\x07" * 512
    shard.write_bytes(bytes(data))
    streamed = _streamed_keys(shard)
    ingest.ingest(src, tmp_path / "out", workers=0, progress=False)
    assert [r[0] for r in _records(tmp_path / "out")] == streamed and streamed


# ============================================================================================ output in a bucket

@pytest.fixture(scope="module")
def emulator():
    with running_emulator() as emu:
        yield emu


def _download(prefix: str, local: pathlib.Path) -> pathlib.Path:
    """The objects under gs://BUCKET/prefix copied into the folder `local` (one level of subfolders)."""
    for obj in paths.as_path(f"gs://{BUCKET}/{prefix}").iterdir():
        if obj.is_dir():
            _download(f"{prefix}/{obj.name}", local / obj.name)
        else:
            local.mkdir(parents=True, exist_ok=True)
            (local / obj.name).write_bytes(obj.read_bytes())
    return local


@needs_emulator
@needs_beam
def test_both_drivers_write_to_a_bucket(inputs, tmp_path, emulator):
    shards, _ = inputs
    ingest.ingest(shards, tmp_path / "local", name="laion", workers=0, progress=False)
    pool = ingest.ingest(shards, f"gs://{BUCKET}/pool", name="laion", workers=2, progress=False)
    beam = ingest.ingest(shards, f"gs://{BUCKET}/beam", name="laion", runner="DirectRunner", progress=False)
    assert pool.units_done == beam.units_done == 3 and pool.records == beam.records == 7
    assert not [n for n in emulator.names("pool/") + emulator.names("beam/") if n.endswith(".tmp")]
    for prefix in ("pool", "beam"):
        copy = _download(prefix, tmp_path / prefix)
        assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
        assert _json(copy / ingest.REPORT) == _json(tmp_path / "local" / ingest.REPORT)
        assert _records(copy) == _records(tmp_path / "local")
        assert _unit_reports(copy) == _unit_reports(tmp_path / "local")
        for name in ("dataset_info.json", "features.json"):
            assert (copy / name).read_text() == (tmp_path / "local" / name).read_text()
    again = ingest.ingest(shards, f"gs://{BUCKET}/beam", runner="DirectRunner", progress=False)
    assert (again.units_done, again.units_reused) == (0, 3)


# ============================================================================================ source in a bucket

def test_pattern_source_is_the_folder_source(inputs, tmp_path):
    """A brace pattern or a glob of local tars is planned here like the folder holding them: the same dataset."""
    shards, _ = inputs
    ingest.ingest(shards, tmp_path / "folder", name="laion", workers=0, progress=False)
    ingest.ingest(f"{shards}/{{00000..00002}}.tar", tmp_path / "braces", name="laion", workers=0, progress=False)
    ingest.ingest(f"{shards}/0000*.tar", tmp_path / "glob", name="laion", workers=0, progress=False)
    for other in ("braces", "glob"):
        assert _records(tmp_path / other) == _records(tmp_path / "folder")
        assert _unit_reports(tmp_path / other) == _unit_reports(tmp_path / "folder")
        manifest = json.loads((tmp_path / other / ingest.STATE_DIR / ingest.MANIFEST).read_text())["splits"]
        assert manifest["train"]["units"] == 3 and "planned" not in manifest["train"]


@pytest.fixture(scope="module")
def bucket_tars(inputs, emulator) -> str:
    """The tars of `inputs` (a duplicate key across two tars, a truncated tar) uploaded to gs://BUCKET/src."""
    shards, _ = inputs
    for tar in sorted(shards.glob("*.tar")):
        paths.write_object(paths.as_path(f"gs://{BUCKET}/src/{tar.name}"), tar.read_bytes())
    return f"gs://{BUCKET}/src"


def _same_report(remote_out, local_out, src: str, shards: pathlib.Path) -> None:
    """The same skipped samples, in the same order, with the reasons and the tars' names (bucket vs folder)."""
    remote = _json(pathlib.Path(remote_out) / ingest.REPORT)["train"]
    local = _json(pathlib.Path(local_out) / ingest.REPORT)["train"]
    for x in remote["skipped"]:
        x["source"] = x["source"].replace(src, str(shards))
    assert remote["skipped"] == local["skipped"] and len(local["skipped"]) == 5
    assert (remote["records"], remote["image_bytes"]) == (local["records"], local["image_bytes"])


@needs_emulator
@needs_beam
def test_bucket_source_is_planned_on_the_workers_with_the_same_records(inputs, bucket_tars, tmp_path, emulator):
    shards, _ = inputs
    ingest.ingest(shards, tmp_path / "local", name="laion", workers=0, progress=False)
    pool = ingest.ingest(bucket_tars, tmp_path / "pool", name="laion", workers=2, progress=False)
    beam = ingest.ingest(bucket_tars + "/", f"gs://{BUCKET}/out-beam", name="laion", runner="DirectRunner",
                         progress=False)
    assert pool.units_done == beam.units_done == 3 and pool.records == beam.records == 7
    copy = _download("out-beam", tmp_path / "beam")
    for out in (tmp_path / "pool", copy):
        assert _records(out) == _records(tmp_path / "local")
        _same_report(out, tmp_path / "local", bucket_tars, shards)
        assert sorted(p.name for p in out.glob("*.array_record-*")) == \
            sorted(p.name for p in (tmp_path / "local").glob("*.array_record-*"))
        state = out / ingest.STATE_DIR
        assert [json.loads((state / f"train-{i:05d}.keys.json").read_text()) for i in range(3)] == \
            [["a0", "a1", "a2", "a3"], ["a1", "b0", "b1", "b2", "b3"], ["c0"]]
        manifest = json.loads((state / ingest.MANIFEST).read_text())["splits"]["train"]
        assert manifest["planned"] == "workers" and manifest["units"] == 3


@needs_emulator
@needs_beam
def test_bucket_source_resume_redoes_only_the_missing_unit(bucket_tars, tmp_path, emulator, monkeypatch):
    out = tmp_path / "out"
    ingest.ingest(bucket_tars, out, runner="DirectRunner", progress=False)
    shards = sorted(out.glob("*.array_record-*"))
    before, records, report = {p: p.stat().st_mtime_ns for p in shards}, _records(out), _json(out / ingest.REPORT)
    shards[1].unlink()  # the unit whose tar repeats a key of the first tar
    read = []
    real_copy = paths.local_copy
    monkeypatch.setattr(paths, "local_copy", lambda p: read.append(p) or real_copy(p))
    again = ingest.ingest(bucket_tars, out, runner="DirectRunner", progress=False)
    assert (again.units_done, again.units_reused) == (1, 2)
    assert read == [f"{bucket_tars}/00001.tar"]  # the listings were kept: only the missing unit's tar is read
    assert all(p.stat().st_mtime_ns == before[p] for p in shards if p != shards[1])
    assert _records(out) == records and _json(out / ingest.REPORT) == report
    paths.write_object(paths.as_path(f"{bucket_tars}/00003.tar"), b"")  # the listing changed: refused
    with pytest.raises(ingest.IngestError, match="different source listing"):
        ingest.ingest(bucket_tars, out, workers=0, progress=False)
    paths.as_path(f"{bucket_tars}/00003.tar").unlink()
    with pytest.raises(ingest.IngestError, match="no .tar shards found; .* ImageFolder is read on this machine"):
        ingest.ingest(f"gs://{BUCKET}/no-tars", tmp_path / "none", workers=0, progress=False)


def test_pool_and_beam_find_the_same_duplicates():
    """The pool driver's scan in listing order and the Beam steps (key, tar) → GroupByKey → later tars drop the same
    keys, for keys held by up to three tars."""
    listings = [["a", "b"], ["b", "c"], ["a", "c", "d"], [], ["d", "a"]]
    pool = ingest._duplicates(listings)
    assert pool == {1: ["b"], 2: ["a", "c"], 4: ["d", "a"]}
    by_key: dict[str, list[int]] = {}
    for i in reversed(range(len(listings))):  # a shuffle gives the tars in any order
        for key, tar in ingest._key_and_tar((i, listings[i])):
            by_key.setdefault(key, []).append(tar)
    beam = sorted(pair for group in by_key.items() for pair in ingest._later_tars(group))
    assert beam == sorted((i, key) for i, keys in pool.items() for key in keys)
