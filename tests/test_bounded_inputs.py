"""Inputs that would take unbounded memory or time: a brace pattern of 10^9 shard names, an image path that is
/dev/zero or a FIFO, an object store that cannot be reached, a throughput run of 1000 workers or for ever, a wds:
source where no image decodes (a decompression bomb among them). Each ends in bounded time and memory, with one
`error:` line (exit 2) or a skipped and counted record; a signal during the trainer's set-up ends it at once.
Real files, real subprocesses, real signals.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from clipjax.data import sources, wds

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0", **extra}


def _one_error_line(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ============================================================================================ brace patterns

def test_a_brace_pattern_of_a_billion_names_is_refused_before_any_is_made(tmp_path):
    start = time.monotonic()
    pattern = f"{tmp_path}/{{0..999}}{{0..999}}{{0..999}}.tar"
    with pytest.raises(sources.DatasetError, match=r"names 1,000,000,000 shards; a pattern may name at most "
                                                   r"1,000,000") as e:
        wds.shard_urls(f"wds:{pattern}")
    assert pattern in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(sources.DatasetError, match="names 10,000,001 shards"):
        wds.shard_urls("wds:gs://bucket/{0..10000000}.tar")  # remote patterns are expanded without a request
    with pytest.raises(sources.DatasetError, match="more than 1,000,000 shards"):  # nested: counted, not listed
        wds.shard_urls("wds:/data/{a,{0..999999}}{0,1}.tar")
    assert time.monotonic() - start < 10
    assert wds.count_braces("s{00..99}-{a,b,c}") == 300
    names = wds.iter_braces("s{0..999}{0..999}{0..999}")  # lazy: the first names without the others
    assert [next(names) for _ in range(3)] == ["s000", "s001", "s002"]


# ============================================================================================ signals during set-up

class _Silent:
    """A TCP server on 127.0.0.1 that accepts connections and never answers: a storage endpoint that swallows
    requests."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connected = threading.Event()
        self.conns: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.connected.set()

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


def test_sigterm_while_set_up_waits_on_storage_ends_the_run_at_once(tmp_path):
    """A SIGTERM while the trainer lists a wds:gs:// spec on an endpoint that never answers: one log line and exit
    status 0 within seconds, nothing written (it was logged, then ignored until the client gave up, minutes later)."""
    pytest.importorskip("gcsfs")
    from gcs_emulator import emulator_env
    from test_reliability import setup_for

    setup = setup_for(tmp_path)
    server = _Silent()
    try:
        env = {**setup.env(), **emulator_env(server.url)}
        workdir = tmp_path / "run"
        proc = subprocess.Popen(setup.args(workdir, "--config.data.train=wds:gs://bucket/shards/*.tar", devices=1),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        try:
            assert server.connected.wait(120), "the run never reached the storage endpoint"
            time.sleep(0.5)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        server.close()
    assert proc.returncode == 0, out[-3000:]
    assert took < 10, (took, out[-3000:])
    assert "SIGTERM received during set-up (nothing to checkpoint yet): stopping" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    saved = [p.name for p in (workdir / "checkpoints").iterdir()] if (workdir / "checkpoints").exists() else []
    assert not [name for name in saved if name.isdigit()], saved  # no step checkpointed


# ============================================================================================ unreachable storage

def test_an_endpoint_that_does_not_answer_is_one_storage_error_within_seconds(monkeypatch):
    pytest.importorskip("gcsfs")
    from gcs_emulator import closed_port

    from clipjax import paths

    server = _Silent()
    try:
        for url, reason in ((f"http://127.0.0.1:{closed_port()}", "Connection refused"),
                            (server.url, "timed out|no answer within")):
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
            monkeypatch.setattr(paths, "_probed", {})
            start = time.monotonic()
            with pytest.raises(paths.StorageError, match=reason) as e:
                with paths.storage_errors("gs://bucket/run"):
                    pytest.fail("no request may be sent to an endpoint that does not answer")
            assert time.monotonic() - start < paths.PROBE_TIMEOUT_S + 2
            assert str(e.value).startswith(f"cannot reach gs://bucket/run: Cannot connect to {url} (")
            assert "\n" not in str(e.value)
            start = time.monotonic()
            with pytest.raises(paths.StorageError):  # the answer is kept: no second wait
                paths.check_reachable("gs://other/x")
            assert time.monotonic() - start < 0.5
    finally:
        server.close()
    paths.check_reachable("/a/local/path")  # nothing to probe


def test_a_store_that_cannot_be_reached_fails_the_trainer_in_one_line_within_seconds(tmp_path):
    """A wds:gs:// spec and a gs:// workdir against a closed port (no network): one error line each, exit 2, within
    seconds (they took 151 s and 56 s: every request retried for about 30 s, shard after shard)."""
    pytest.importorskip("gcsfs")
    from gcs_emulator import closed_port, emulator_env
    from test_reliability import setup_for

    setup = setup_for(tmp_path)
    env = {**setup.env(), **emulator_env(f"http://127.0.0.1:{closed_port()}")}
    runs = {"wds": setup.args(tmp_path / "run", "--config.data.train=wds:gs://bucket/shards/{00000..00099}.tar",
                              devices=1),
            "workdir": setup.args("gs://bucket/run", devices=1)}  # type: ignore[arg-type]  (a URI)
    start = time.monotonic()
    procs = {k: subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for k, a in runs.items()}
    outs = {}
    for k, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(1.0, 90 - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        outs[k] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - start)
    line = _one_error_line(outs["wds"][0], "dataset 'wds:gs://bucket/shards/{00000..00099}.tar'", "Cannot connect to",
                           "check the network connection")
    assert "Connection refused" in line
    _one_error_line(outs["workdir"][0], "workdir gs://bucket/run", "Cannot connect to", "check the network connection")
    assert max(took for _, took in outs.values()) < 25, {k: took for k, (_, took) in outs.items()}


# ============================================================================================ throughput tool

@pytest.mark.parametrize("args,message", [
    (["--workers", "1000"], "--workers 1000 is more than"),
    (["--seconds", "inf"], "--seconds must be a finite number of seconds, got inf"),
    (["--seconds", "nan"], "--seconds must be positive"),
])
def test_throughput_refuses_unbounded_workers_and_seconds_in_one_line(args, message, capsys):
    from clipjax.data import throughput

    start = time.monotonic()
    status = throughput.main(["--data", "scenes", "--batch-size", "8", "--image-size", "32", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert time.monotonic() - start < 5


def test_throughput_says_what_it_starts_before_the_first_batch(tmp_path):
    from clipjax.data import scenes

    ds = scenes.build_scenes(tmp_path / "ds", num_train=16, num_test=4, num_heldout=4, seed=0, workers=0,
                             progress=False)
    proc = subprocess.Popen([sys.executable, "-m", "clipjax.data.throughput", "--data", f"dir:{ds}", "--batch-size",
                             "4", "--workers", "1", "--threads", "2", "--image-size", "16", "--seconds", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    first = err.strip().splitlines()[0]
    assert first == "starting 1 decode worker process of 2 threads; measuring for 0.5 s after the first batch", err
    assert json.loads(out)["workers"] == 1


# ============================================================================================ undecodable wds sources

def _png(width: int, height: int, rows: int | None = None) -> bytes:
    """A greyscale PNG of `width`x`height` zeros, compressed row by row (a few hundred KB for 10^8 pixels), or with
    only `rows` rows of data (a header that promises the rest: a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the pixels
    data = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _wds_shard(path: pathlib.Path, images: list[bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(images):
            for ext, data in (("jpg", image), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_pils_pixel_limit_is_a_bad_record_without_being_decoded():
    """10^8 pixels (300 KB of PNG, 100 MB decoded; PIL only warns below 2x its limit) and 9·10^8 (PIL refuses):
    both skipped as bad records, from their header."""
    from clipjax.data import core, ingest, slots
    from clipjax.data.sources import SourceSet

    loader = slots.TrainLoader(SourceSet([], "train"), 16, (0.9, 1.0), seed=0, process_index=0)  # streams only
    for image, needle in ((_png(10_000, 10_000), "10000x10000 = 100,000,000 pixels"),
                          (_png(30_000, 30_000, rows=1), "decompression bomb")):
        start = time.monotonic()
        with pytest.raises(core.BadRecord, match=needle):
            loader(wds.SampleItem(0, "shard.tar:00000", image, ["a caption"]))
        assert time.monotonic() - start < 1
        assert needle in ingest._check_image(image)
    assert loader(wds.SampleItem(0, "s", _png(40, 30), ["ok"]))[0].shape == (16, 16, 3)


def test_a_wds_source_where_no_image_decodes_is_one_error_line(tmp_path):
    """Text named .jpg and a 30000² PNG, every sample bad: `python -m clipjax.main` ends in one `error:` line, exit
    2 (it was a TooManyBadRecords traceback)."""
    from test_reliability import setup_for

    setup = setup_for(tmp_path)
    shards = tmp_path / "shards"
    shards.mkdir()
    _wds_shard(shards / "00000.tar", [b"these bytes are not an image"] * 20 + [_png(30_000, 30_000, rows=1)] * 20)
    out = subprocess.run(setup.args(tmp_path / "run", f"--config.data.train=wds:{shards}", devices=1),
                         capture_output=True, text=True, timeout=300, env=setup.env(), cwd=ROOT)
    line = _one_error_line(out, "1000 consecutive bad records; last: sample ")
    assert "cannot decode image" in line or "decompression bomb" in line, line


# ============================================================================================ ingest: what is read

def _encoded(size: int, seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_ingest_reads_only_regular_files_up_to_the_size_cap(tmp_path):
    """A table naming /dev/zero, a FIFO with no writer, a directory and a file over --max-image-bytes beside two good
    images: the four are skipped and reported with their reason, never read (/dev/zero was read until a MemoryError
    at 7.7 GB, a FIFO waited for ever), and the good ones ingested."""
    (tmp_path / "small.png").write_bytes(_encoded(8, 0))
    (tmp_path / "small2.png").write_bytes(_encoded(8, 1))
    big = _encoded(64, 2)
    (tmp_path / "big.png").write_bytes(big)
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    limit = 2000
    assert len((tmp_path / "small.png").read_bytes()) <= limit < len(big)
    rows = ["image,caption", "small.png,a small one", "/dev/zero,zeros for ever", "pipe.png,a pipe",
            "folder.png,a folder", "big.png,a big one", "small2.png,another"]
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    out = subprocess.run([sys.executable, "-m", "clipjax.data.ingest", str(tmp_path / "table.csv"), "--output",
                          str(tmp_path / "ds"), "--workers", "0", "--quiet", "--max-image-bytes", str(limit)],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    report = json.loads((tmp_path / "ds" / "ingest_report.json").read_text())["train"]
    assert report["records"] == 2
    reasons = {s["key"]: s["reason"] for s in report["skipped"]}
    assert reasons == {
        "/dev/zero": "/dev/zero is a character device, not a regular file",
        "pipe.png": f"{tmp_path / 'pipe.png'} is a FIFO (named pipe), not a regular file",
        "folder.png": f"{tmp_path / 'folder.png'} is a directory, not a regular file",
        "big.png": f"{tmp_path / 'big.png'} is {len(big):,} bytes, more than --max-image-bytes {limit:,}"}, reasons


def test_ingest_of_a_tar_member_over_the_size_cap_skips_it_unread(tmp_path):
    from clipjax.data import ingest

    shards = tmp_path / "shards"
    shards.mkdir()
    small, big = _encoded(8, 0), _encoded(64, 1)
    _wds_shard(shards / "00000.tar", [small, big, small])
    summary = ingest.ingest(shards, tmp_path / "ds", workers=0, progress=False, max_image_bytes=len(big) - 1)
    assert summary.records == 2 and summary.skipped == 1
    [skip] = json.loads((tmp_path / "ds" / "ingest_report.json").read_text())["train"]["skipped"]
    assert skip["key"] == "00001" and skip["reason"] == f"00001.jpg is {len(big):,} bytes, more than " \
                                                         f"--max-image-bytes {len(big) - 1:,}"
    with pytest.raises(ingest.IngestError, match="--max-image-bytes must be at least 1"):
        ingest.ingest(shards, tmp_path / "ds2", workers=0, progress=False, max_image_bytes=0)


def test_a_wds_member_over_the_cap_is_passed_over_unread(tmp_path):
    small, big = _encoded(8, 0), _encoded(64, 1)
    _wds_shard(tmp_path / "00000.tar", [small, big, small])
    with open(tmp_path / "00000.tar", "rb") as f:
        groups = list(wds.iter_groups(f, max_member_bytes=len(big) - 1))
    assert [(k, files["jpg"]) for k, files in groups] == [("00000", small), ("00001", None), ("00002", small)]
    assert groups[1][1]["txt"] == b"caption 1"  # the members after it are read
    assert "too large to read" in wds._image_and_captions(groups[1][1])
