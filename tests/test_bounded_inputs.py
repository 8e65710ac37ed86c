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
    assert not (workdir / "checkpoints").exists()
