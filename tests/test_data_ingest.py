"""Ingestion of CSV/JSONL tables, webdataset tars and ImageFolders made of real (odd and broken) image files."""

import io
import json
import math
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clipjax.data import ingest, pipeline, sources
from clipjax.data.tokenizer import get_tokenizer


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


GOOD = {  # name -> bytes; every one must decode
    "plain.jpg": lambda: _encode(_rgb(40, 30, 0), "JPEG"),
    "rgba.png": lambda: _encode(_rgb(20, 20, 1).convert("RGBA"), "PNG"),
    "palette.png": lambda: _encode(_rgb(24, 16, 2).convert("P"), "PNG"),
    "cmyk.jpg": lambda: _encode(_rgb(32, 32, 3).convert("CMYK"), "JPEG"),
    "grey16.png": lambda: _encode(Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 200), "PNG"),
    "tiny.png": lambda: _encode(_rgb(1, 1, 4), "PNG"),
    "huge.jpg": lambda: _encode(Image.new("RGB", (2600, 1800), (90, 20, 200)), "JPEG"),
    "photo.webp": lambda: _encode(_rgb(30, 30, 5), "WEBP"),
}
BAD = {  # name -> (bytes or None for a missing file, reason fragment)
    "truncated.jpg": (lambda: _encode(_rgb(64, 64, 6), "JPEG")[:200], "cannot decode"),
    "empty.png": (lambda: b"", "zero-size"),
    "text.jpg": (lambda: b"this is not an image", "cannot decode"),
    "missing.jpg": (None, "cannot read"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    (root / "pics").mkdir()
    files = {}
    for name, make in GOOD.items():
        files[name] = make()
        (root / "pics" / name).write_bytes(files[name])
    for name, (make, _) in BAD.items():
        if make is not None:
            (root / "pics" / name).write_bytes(make())
    return root, files


def _read_all(out, split="train"):
    src = sources.open_source(f"dir:{out}", split)
    return {r.key: r for r in (src.record(i) for i in range(len(src)))}


def _write_csv(root, extra_rows=()):
    rows = [("image", "caption")]
    rows += [(f"pics/{n}", f"a {n.split('.')[0]} picture") for n in GOOD]
    rows += [("pics/plain.jpg", "second caption for plain"), ("pics/rgba.png", '["list one", "list two"]')]
    rows += [(f"pics/{n}", "broken") for n in BAD] + [("pics/tiny.png", "")] + list(extra_rows)
    import csv

    with open(root / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root / "data.csv"


def test_csv_keeps_bytes_merges_captions_and_reports_bad(images, tmp_path):
    root, files = images
    summary = ingest.ingest(_write_csv(root), tmp_path / "out", shard_size=3, workers=0, progress=False)
    recs = _read_all(tmp_path / "out")
    assert set(recs) == {f"pics/{n}" for n in GOOD} and summary.records == len(GOOD)
    for name, data in files.items():
        assert recs[f"pics/{name}"].image == data  # stored exactly as the file
        assert recs[f"pics/{name}"].label == -1
    assert recs["pics/plain.jpg"].captions == ["a plain picture", "second caption for plain"]
    assert recs["pics/rgba.png"].captions == ["a rgba picture", "list one", "list two"]
    assert recs["pics/tiny.png"].captions == ["a tiny picture"]  # the empty extra caption is dropped
    report = json.loads((tmp_path / "out" / ingest.REPORT).read_text())["train"]
    reasons = {s["key"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {f"pics/{n}" for n in BAD} and summary.skipped == len(BAD)
    for name, (_, fragment) in BAD.items():
        assert fragment in reasons[f"pics/{name}"]
    assert report["image_bytes"] == sum(map(len, files.values()))
    b = tfds.builder_from_directory(str(tmp_path / "out"))
    assert b.info.splits["train"].num_shards == 4  # 12 distinct images / 3


def test_jsonl_list_captions_empty_caption_and_training(images, tmp_path):
    root, _ = images
    lines = [{"image": "pics/plain.jpg", "caption": ["one", "two"]}, {"image": "pics/cmyk.jpg", "caption": "  "},
             {"image": str(root / "pics" / "palette.png"), "caption": "absolute path"}]
    (root / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ingest.ingest(root / "d.jsonl", tmp_path / "j", workers=0, progress=False)
    recs = _read_all(tmp_path / "j")
    assert recs["pics/plain.jpg"].captions == ["one", "two"] and len(recs) == 2
    report = json.loads((tmp_path / "j" / ingest.REPORT).read_text())["train"]
    assert report["skipped"] == [{"key": "pics/cmyk.jpg", "source": str(root / "pics" / "cmyk.jpg"),
                                  "reason": "empty caption"}]
    it = pipeline.make_train_iterator(f"dir:{tmp_path / 'j'}", global_batch_size=4, image_size=32, context_length=8,
                                      tokenizer=get_tokenizer(), seed=0, process_index=0, process_count=1)
    assert next(it)["image"].shape == (4, 32, 32, 3)
    it.close()


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_shards_dedup_and_cli_with_workers(images, tmp_path):
    _, files = images
    wds = tmp_path / "wds"
    wds.mkdir()
    _tar(wds / "00000.tar", [("000.jpg", files["plain.jpg"]), ("000.txt", b"a plain photo"),
                             ("001.webp", files["photo.webp"]), ("001.json", b'{"caption": "from json"}'),
                             ("002.txt", b"caption without image"), ("003.jpg", b"\xff\xd8garbage"),
                             ("003.txt", b"corrupt")])
    _tar(wds / "00001.tar", [("000.png", files["rgba.png"]), ("000.txt", b"duplicate key"),
                             ("004.png", files["palette.png"]), ("004.txt", b"a palette image")])
    out = tmp_path / "wout"
    cmd = [sys.executable, "-m", "clipjax.data.ingest", str(wds), "--output", str(out), "--workers", "2", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 records" in proc.stdout and "3 skipped" in proc.stdout
    recs = _read_all(out)
    assert {k: r.captions for k, r in recs.items()} == {
        "000": ["a plain photo"], "001": ["from json"], "004": ["a palette image"]}
    assert recs["001"].image == files["photo.webp"]
    reasons = {s["key"]: s["reason"] for s in json.loads((out / ingest.REPORT).read_text())["train"]["skipped"]}
    assert reasons["000"] == "duplicate key" and "no image file" in reasons["002"] and "decode" in reasons["003"]
    bad = subprocess.run([sys.executable, "-m", "clipjax.data.ingest", str(tmp_path / "nope.csv"), "--output",
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "nope.csv" in bad.stderr


def test_image_folder_labels_and_classnames(images, tmp_path):
    _, files = images
    for split, n in (("train", 3), ("val", 2)):
        for cls, name in (("sea_lion", "plain.jpg"), ("dog", "cmyk.jpg")):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}_{name}").write_bytes(files[name])
        (tmp_path / split / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nope")
    out = tmp_path / "folder"
    ingest.ingest(tmp_path / "train", out, name="pets", workers=0, progress=False, shard_size=4)
    ingest.ingest(tmp_path / "val", out, split="val", workers=0, progress=False)
    spec = f"dir:{out}"
    assert pipeline.get_classnames(spec) == ["dog", "sea lion"] == pipeline.get_classnames(spec, "val")
    recs = _read_all(out)
    assert len(recs) == 6 and recs["sea_lion/0_plain.jpg"].label == 1
    assert recs["sea_lion/0_plain.jpg"].captions == ["a photo of a sea lion."]
    ev = pipeline.make_eval_dataset(spec, "val", image_size=16, batch_size=3)
    labels = [int(x) for b in ev for x, m in zip(b["label"], b["mask"]) if m]
    assert sorted(labels) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="dataset 'pets', not 'other'"):
        ingest.ingest(tmp_path / "val", out, name="other", workers=0, progress=False)


def test_rerun_finishes_interrupted_ingestion_only(images, tmp_path):
    root, _ = images
    src, out = _write_csv(root), tmp_path / "r"
    ingest.ingest(src, out, shard_size=2, workers=0, progress=False)
    shards = sorted(out.glob("*.array_record-*"))
    before = {p: p.stat().st_mtime_ns for p in shards}
    first = _read_all(out)
    shards[2].unlink()  # as if killed while writing unit 2
    (out / ingest.STATE_DIR / "train-00002.json").unlink()
    again = ingest.ingest(src, out, shard_size=2, workers=0, progress=False)
    assert (again.units_done, again.units_reused) == (1, len(shards) - 1)
    assert all(p.stat().st_mtime_ns == before[p] for p in shards if p != shards[2])
    assert {k: r.image for k, r in _read_all(out).items()} == {k: r.image for k, r in first.items()}
    _write_csv(root, extra_rows=[("pics/plain.jpg", "a new caption")])
    with pytest.raises(ValueError, match="different source listing"):
        ingest.ingest(src, out, shard_size=2, workers=0, progress=False)


def test_ingested_csv_trains_with_the_demo_config(images, tmp_path):
    """The README path for one's own images: ingest a CSV with one command, train it with configs/demo.py."""
    root, _ = images
    csv_path = _write_csv(root)
    ingest_cmd = [sys.executable, "-m", "clipjax.data.ingest", str(csv_path), "--output", str(tmp_path / "mine")]
    proc = subprocess.run(ingest_cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
    train_cmd = [sys.executable, "-m", "clipjax.main", f"--config={config}:steps=6,batch=4,evals=0",
                 f"--workdir={tmp_path / 'run'}", f"--config.data.train=dir:{tmp_path / 'mine'}",
                 "--config.log_every=1"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a user's machine
    proc = subprocess.run(train_cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(x) for x in losses) and len(set(losses)) > 1  # the model trains on the images
    assert (tmp_path / "run" / "checkpoints" / "6").is_dir()
    # the trained workdir evaluates through the CLI on the ingested captions (image <-> text retrieval)
    eval_cmd = [sys.executable, "-m", "clipjax.evaluate", "--model", str(tmp_path / "run"), "--task", "retrieval",
                "--data", str(tmp_path / "mine"), "--out", str(tmp_path / "retrieval.json")]
    proc = subprocess.run(eval_cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "retrieval.json").read_text())
    assert result["task"] == "zeroshot_retrieval" and result["pretrained"] == str(tmp_path / "run")
    m = result["metrics"]
    assert m["num_images"] == len(GOOD) and m["num_texts"] == len(GOOD) + 3  # plain.jpg and rgba.png: extra captions
    assert 0.0 <= m["image_retrieval_recall@1"] <= m["image_retrieval_recall@5"] <= m["image_retrieval_recall@10"]


def test_ingest_and_the_streaming_reader_import_no_jax():
    """Ingest workers (pool or Beam) and decode workers load no JAX: the package imports its models lazily."""
    code = ("import sys, clipjax, clipjax.data.ingest, clipjax.data.wds, clipjax.data.throughput; "
            "assert 'jax' not in sys.modules, 'jax imported'; "
            "assert clipjax.CLIP.__name__ == 'CLIP' and 'jax' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
