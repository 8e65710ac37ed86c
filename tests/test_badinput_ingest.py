"""`python -m clipjax.data.ingest` with bad input: it never writes into a directory holding files it did not create,
fails (status 2, one line with the count and the first reasons) when every record is bad, names the file and line
of a table that is not UTF-8, and keeps what precedes the damage in a truncated .tar shard (one warning line) while
finishing the other shards. Real files throughout: PNG/JPEG images, CSV/JSONL tables, tar shards."""

import io
import json
import pathlib
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipjax.data import ingest, sources


def _png(seed: int, mode: str = "RGB") -> bytes:
    px = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def pics(tmp_path):
    root = tmp_path / "src"
    (root / "pics").mkdir(parents=True)
    for i in range(3):
        (root / "pics" / f"{i}.png").write_bytes(_png(i))
    return root


def _run(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    """(status, stdout lines, stderr lines) of the command line run in this process."""
    code = ingest.main([*argv, "--quiet", "--workers", "0"])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


def _records(out: pathlib.Path, split: str = "train") -> dict:
    src = sources.open_source(f"dir:{out}", split)
    return {r.key: r for r in (src.record(i) for i in range(len(src)))}


def _one_error(code: int, err: list[str]) -> str:
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ============================================================================================ the output directory

def test_output_holding_other_files_is_refused_and_untouched(pics, tmp_path, capsys):
    table = pics / "data.csv"
    table.write_text("image,caption\npics/0.png,a zero\npics/1.png,a one\n")
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, _, err = _run(capsys, str(table), "--output", str(out))
    line = _one_error(code, err)
    assert f"--output {out} holds files not written by clipjax.data.ingest" in line and "'thesis.tex'" in line
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]  # not even .ingest/ was created
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is an existing file" in _one_error(*_run(capsys, str(table), "--output", str(a_file))[::2])
    inside = _one_error(*_run(capsys, str(pics), "--output", str(pics / "out"))[::2])
    assert "inside the source" in inside and not (pics / "out").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(capsys, str(table), "--output", str(empty))[0] == 0  # new or empty: fine
    code, out_lines, _ = _run(capsys, str(table), "--output", str(empty))  # its own output: resumed (no work)
    assert code == 0 and "0 shards written, 1 reused" in out_lines[-1]
    (pics / "val.csv").write_text("image,caption\npics/2.png,a two\n")
    assert _run(capsys, str(pics / "val.csv"), "--output", str(empty), "--split", "val")[0] == 0  # another split
    assert set(_records(empty)) == {"pics/0.png", "pics/1.png"} and set(_records(empty, "val")) == {"pics/2.png"}


@pytest.mark.parametrize("split", ["../x", "tr/ain", "a b", ""])
def test_a_split_name_that_cannot_name_shard_files_is_refused_before_anything_is_written(pics, tmp_path, capsys,
                                                                                         split):
    table = pics / "data.csv"
    table.write_text("image,caption\npics/0.png,a zero\n")
    line = _one_error(*_run(capsys, str(table), "--output", str(tmp_path / "out"), "--split", split)[::2])
    assert f"--split {split!r}: a split name is letters, digits, _ and -" in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.array_record*"))
    assert _run(capsys, str(table), "--output", str(tmp_path / "out"), "--split", "val-2017")[0] == 0
    assert set(_records(tmp_path / "out", "val-2017")) == {"pics/0.png"}


# ============================================================================================ nothing usable

def test_every_record_bad_is_an_error_not_an_empty_dataset(pics, tmp_path, capsys):
    (pics / "pics" / "broken.png").write_bytes(b"\x89PNG not really")
    table = pics / "bad.jsonl"
    rows = [{"image": "pics/missing.png", "caption": "gone"}, {"image": "pics/broken.png", "caption": "broken"},
            {"image": "pics/0.png", "caption": "   "}]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code, out_lines, err = _run(capsys, str(table), "--output", str(out))
    line = _one_error(code, err)
    assert out_lines == [] and "nothing to ingest: all 3 records were skipped" in line
    assert "pics/missing.png: cannot read" in line and "pics/broken.png: cannot decode" in line
    assert "pics/0.png: empty caption" in line and str(out / ingest.REPORT) in line
    assert not (out / "dataset_info.json").exists() and not list(out.glob("*.array_record*"))
    report = json.loads((out / ingest.REPORT).read_text())["train"]
    assert report["records"] == 0 and len(report["skipped"]) == 3
    table.write_text(json.dumps({"image": "pics/1.png", "caption": "fixed"}) + "\n")  # a corrected table ...
    assert _run(capsys, str(table), "--output", str(out))[0] == 0  # ... ingests into the same directory
    assert list(_records(out)) == ["pics/1.png"]


def test_urls_are_named_as_urls(pics, tmp_path, capsys):
    table = pics / "urls.csv"
    table.write_text("image,caption\nhttps://example.com/a.jpg,a cat\nhttp://example.com/b.jpg,a dog\n")
    line = _one_error(*_run(capsys, str(table), "--output", str(tmp_path / "out"))[::2])
    assert "all 2 records were skipped" in line and "https://example.com/a.jpg: line 2: a URL" in line
    assert "img2dataset" in line


# ============================================================================================ tables that are not UTF-8

@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_table_that_is_not_utf8_names_the_file_and_line(pics, tmp_path, capsys, suffix):
    lines = (["image,caption", "pics/0.png,plain", "pics/1.png,caf\xe9 latin-1"] if suffix == ".csv" else
             [json.dumps({"image": "pics/0.png", "caption": "plain"}), '{"image": "pics/1.png", "caption": "caf\xe9"}'])
    table = pics / f"latin1{suffix}"
    table.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    line = _one_error(*_run(capsys, str(table), "--output", str(tmp_path / "out"))[::2])
    assert f"{table}:{len(lines)}: not UTF-8 text (byte 0xe9" in line
    bom = pics / f"bom{suffix}"  # UTF-8 with a byte-order mark (as spreadsheet programs save it) is fine
    bom.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode("utf-8"))
    assert _run(capsys, str(bom), "--output", str(tmp_path / "ok"))[0] == 0
    assert "café" in " ".join(_records(tmp_path / "ok")["pics/1.png"].captions)


# ============================================================================================ damaged shards

def _tar(path: pathlib.Path, members: list[tuple[str, bytes]]) -> pathlib.Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_truncated_shard_keeps_what_precedes_the_damage(tmp_path, capsys):
    wds = tmp_path / "wds"
    wds.mkdir()
    first = [(f"a{i}.png", _png(i)) for i in range(4)]
    members = [m for i, (name, data) in enumerate(first) for m in ((name, data), (f"a{i}.txt", b"shard a %d" % i))]
    whole = _tar(tmp_path / "whole.tar", members).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tf:
        cut = tf.getmember("a2.png").offset_data + 100  # inside the third image
    (wds / "00000.tar").write_bytes(whole[:cut])
    _tar(wds / "00001.tar", [("b0.png", _png(10)), ("b0.json", b'{"caption": "shard b"}')])
    (wds / "00002.tar").write_bytes(b"this is not a tar archive at all" * 20)
    code, out_lines, err = _run(capsys, str(wds), "--output", str(tmp_path / "out"))
    assert code == 0, err
    warnings = [line for line in err if line.startswith("warning: ")]
    assert len(warnings) == 2 and len(err) == 2, err
    assert f"warning: {wds / '00000.tar'}: truncated or damaged shard" in warnings[0]
    assert "kept its 4 complete members before the damage" in warnings[0]
    assert f"{wds / '00002.tar'}" in warnings[1] and "kept its 0 complete members" in warnings[1]
    recs = _records(tmp_path / "out")
    assert sorted(recs) == ["a0", "a1", "b0"] and recs["a1"].image == first[1][1]
    assert recs["b0"].captions == ["shard b"]
    report = json.loads((tmp_path / "out" / ingest.REPORT).read_text())["train"]
    damaged = sorted(x["source"] for x in report["skipped"] if x["reason"].startswith("damaged shard"))
    assert damaged == [str(wds / "00000.tar"), str(wds / "00002.tar")]
    assert "3 records" in out_lines[-1]


# ============================================================================================ --help

def test_help_lists_inputs_columns_and_the_output_rule(capsys):
    with pytest.raises(SystemExit) as helped:
        ingest.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert helped.value.code == 0
    for needle in ("*.csv / *.jsonl", "image a local image file", "caption the caption", "URLs are not downloaded",
                   "KEY.jpg|jpeg|png|webp", "KEY.txt", "KEY.json", "ImageFolder one subfolder per class",
                   ".ingest/manifest.json", "A DIR holding anything else is refused"):
        assert needle in text, needle
    with pytest.raises(SystemExit) as usage:
        ingest.main([])
    err = capsys.readouterr().err.strip().splitlines()
    assert usage.value.code == 2 and len(err) == 1 and "the following arguments are required" in err[0]
