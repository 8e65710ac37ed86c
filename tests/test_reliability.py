"""What a training run survives, checked through the CLI (`python -m clipjax.main`) on a tiny synthetic setup:
preemption (SIGTERM/SIGINT), crashes (`kill -9`, also during an async checkpoint write), damaged checkpoints, a mesh
change on resume and non-finite updates (bad input: tests/test_reliability_input.py). Each test names the row of
docs/reliability.md it checks. Trajectories are compared with one uninterrupted reference run.

All runs share one model, batch and schedule, so each XLA program is compiled once per session (persistent cache in
the session's temp dir); every run uses `--xla_backend_optimization_level=0`, which halves compile time.
The helpers at the top are also used by tests/test_reliability_input.py and tests/test_multihost.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8  # every run trains (or resumes) to this step: the lr schedule, hence the compiled step, is shared
TINY = {"embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
# The same with CLIP's BPE vocabulary, for runs on real records tokenized by the CLIP tokenizer.
TINY_BPE = {**TINY, "text_cfg": {**TINY["text_cfg"], "vocab_size": 49408}}
CONFIG = '''"""Tiny synthetic training config of the reliability tests (written by tests/test_reliability.py)."""
import sys

sys.path.insert(0, {configs!r})
from vit_b32 import get_config as _vit_b32  # noqa: E402


def get_config(arg=None):
    c = _vit_b32("runlocal")
    c.model.name = {model!r}
    c.batch_size, c.total_steps, c.warmup_steps = 8, {steps}, 2
    c.log_every, c.ckpt_every, c.keep_checkpoints = 1, 2, 10
    c.data.synthetic_nan_steps = ()
    c.data.synthetic_seconds_per_batch = 0.0
    return c
'''


# ============================================================================================ helpers

class Setup:
    """Files shared by every run of a session: the config, the model JSONs, the XLA compilation cache."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.tiny, self.tiny_bpe = root / "tiny.json", root / "tiny_bpe.json"
        self.config, self.cache = root / "reliability_config.py", root / "xla-cache"
        if not self.config.exists():
            root.mkdir(parents=True, exist_ok=True)
            self.tiny.write_text(json.dumps(TINY))
            self.tiny_bpe.write_text(json.dumps(TINY_BPE))
            self.config.write_text(CONFIG.format(configs=str(ROOT / "configs"), model=str(self.tiny), steps=STEPS))

    def env(self) -> dict[str, str]:
        return {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu",
                "CLIPJAX_COMPILATION_CACHE": str(self.cache)}

    def args(self, workdir: pathlib.Path, *overrides: str, devices: int = 4) -> list[str]:
        return [sys.executable, "-m", "clipjax.main", f"--config={self.config}", f"--workdir={workdir}",
                f"--local_device_count={devices}", *overrides]

    def run(self, workdir: pathlib.Path, *overrides: str, devices: int = 4,
            timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.args(workdir, *overrides, devices=devices), capture_output=True, text=True,
                              timeout=timeout, env=self.env(), cwd=ROOT)

    def start(self, workdir: pathlib.Path, *overrides: str, devices: int = 4) -> Proc:
        return Proc(self.args(workdir, *overrides, devices=devices), self.env())


@contextlib.contextmanager
def locked(path: pathlib.Path):
    """An exclusive lock on `path` (pytest-xdist workers share the session's files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@functools.cache
def setup_for(base: pathlib.Path) -> Setup:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's root, shared by all workers
    with locked(base / "reliability.lock"):
        return Setup(base / "reliability")


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> Setup:
    return setup_for(tmp_path_factory.getbasetemp())


class Proc:
    """A CLI run in the background whose output lines can be waited for (stdout and stderr merged)."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      cwd=ROOT)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 600) -> str:
        """The first output line matching `pattern` (waits for it; fails if the process ends first)."""
        deadline, seen = time.monotonic() + timeout, 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if re.search(pattern, line):
                        return line
                seen = len(self.lines)
                if self._eof or time.monotonic() > deadline:
                    pytest.fail(f"no line matching {pattern!r}; output ends with:\n{''.join(self.lines[-30:])}")
                self._changed.wait(timeout=1.0)

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        rc = self.popen.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc, "".join(self.lines)

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def tail(text: str | subprocess.CompletedProcess, n: int = 40) -> str:
    if isinstance(text, subprocess.CompletedProcess):
        text = text.stdout + text.stderr
    return "".join(text.splitlines(keepends=True)[-n:])


def rows(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: pathlib.Path) -> dict[int, float]:
    """Loss by step (a step logged twice, by a killed run and by its resumption, keeps the later row)."""
    return {r["step"]: r["loss"] for r in rows(workdir) if "loss" in r}


def steps_on_disk(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def reference_run(setup: Setup) -> pathlib.Path:
    """One uninterrupted run (1 process, 4 devices, data parallel), made once per session."""
    workdir = setup.root / "reference"
    with locked(setup.root / "reference.lock"):
        if not (workdir / "done").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            out = setup.run(workdir)
            assert out.returncode == 0, tail(out)
            (workdir / "done").touch()
    return workdir


def copy_run(src: pathlib.Path, dst: pathlib.Path, keep_until: int) -> pathlib.Path:
    """A copy of workdir `src` as if it had stopped after step `keep_until` (later checkpoints and rows dropped)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("done", "tensorboard"))
    for step in steps_on_disk(dst):
        if step > keep_until:
            shutil.rmtree(dst / "checkpoints" / str(step))
    kept = [json.dumps(r) for r in rows(dst) if r["step"] <= keep_until]
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# After a failed write, tensorstore's own threads may print "Event loop is closed" tracebacks of callbacks into
# orbax's finished event loop straight to stderr (no Python hook sees them): noise, not clipjax's report.
_LATE_CALLBACK = "Event loop is closed"


def assert_no_traceback(text: str) -> None:
    """No traceback but that noise. Several threads print it at once, so its lines may interleave: what is checked
    is that the noise is there, that no frame is clipjax's and that every exception line is a RuntimeError."""
    if "Traceback" not in text:
        return
    assert _LATE_CALLBACK in text, tail(text)
    import clipjax

    package = str(pathlib.Path(clipjax.__file__).resolve().parent)
    assert f'File "{package}/' not in text, tail(text)
    exceptions = [line for line in text.splitlines() if re.match(r"[A-Za-z_.]*(Error|Exception)\b", line)]
    assert all(line.startswith("RuntimeError") for line in exceptions), tail(text)


def assert_user_error(out: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, no traceback, and one `error: ...` line holding every needle; returns that line."""
    assert out.returncode == 2, tail(out)
    assert_no_traceback(out.stdout + out.stderr)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, tail(out)
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def restore_newest(workdir: pathlib.Path):
    """(step, state) of the newest usable checkpoint of `workdir`, read in this process."""
    from clipjax.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir / "checkpoints", async_save=False, read_only=True)
    try:
        step, state, _ = ckpt.restore()
    finally:
        ckpt.close()
    return step, state


def write_dataset(directory: pathlib.Path, records: list[tuple[bytes, list[str]]]) -> pathlib.Path:
    from clipjax.data import records as rec

    directory.mkdir(parents=True)
    feats = rec.image_text_features()
    with rec.ShardWriter(directory / rec.shard_filename(directory.name, "train", 0, 1), feats) as w:
        for i, (image, captions) in enumerate(records):
            w.write({"image": image, "captions": captions, "key": f"r{i}", "label": -1})
    rec.write_metadata(directory, directory.name, feats, {"train": [len(records)]})
    return directory


def encode(image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()



# ============================================================================================ preemption

@pytest.mark.slow
def test_sigterm_mid_training_checkpoints_that_step_and_resumes_exactly(setup, tmp_path):
    """Row "SIGTERM / SIGINT": with async saves in flight, the step in progress is checkpointed, exit status 0, and
    the resumed run continues the uninterrupted trajectory bit for bit."""
    ref = losses(reference_run(setup))
    workdir = tmp_path / "run"
    with setup.start(workdir, "--config.data.synthetic_seconds_per_batch=0.3") as proc:
        proc.wait_for(r"\bstep 3/8\b")
        proc.popen.send_signal(signal.SIGTERM)
        rc, out = proc.finish()
    assert rc == 0, tail(out)
    stopped = int(re.search(r"stopped at step (\d+)", out).group(1))
    assert 3 <= stopped < STEPS, tail(out)
    assert steps_on_disk(workdir)[-1] == stopped
    assert max(losses(workdir)) == stopped
    resumed = setup.run(workdir)
    assert resumed.returncode == 0, tail(resumed)
    assert f"resumed from step {stopped}" in resumed.stderr
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == ref  # exactly: same program, same restored bits, same batches


@pytest.mark.slow
def test_sigint_while_compiling_checkpoints_step_one(setup, tmp_path):
    """Row "SIGTERM / SIGINT": a signal while the first step compiles ends the run after that step, with an (async)
    checkpoint of it that restores and verifies."""
    workdir = tmp_path / "run"
    with setup.start(workdir) as proc:
        proc.wait_for(r"parameters: ")  # logged after the state's init, before the train step compiles
        proc.popen.send_signal(signal.SIGINT)
        rc, out = proc.finish()
    assert rc == 0, tail(out)
    assert "SIGINT received" in out and "stopped at step 1 after" in out, tail(out)
    assert steps_on_disk(workdir) == [1]
    step, state = restore_newest(workdir)
    assert step == 1 and int(state["step"]) == 1


def _worker_children(pid: int) -> set[int]:
    """The data worker processes among `pid`'s children."""
    found = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as g:
                    if b"worker_main" in g.read():
                        found.add(int(child))
    return found


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has ended
    except OSError:
        return True


@pytest.mark.slow
def test_sigint_with_decode_workers_checkpoints_ends_them_and_resumes_exactly(setup, tmp_path):
    """Rows "SIGTERM / SIGINT" and "data workers": Ctrl-C of a run that decodes JPEG records in two worker processes
    checkpoints the step in flight, leaves no worker behind, and the resumed run continues the uninterrupted
    trajectory bit for bit (the data iterator resumes at the same record)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = [encode(Image.fromarray(rng.integers(0, 255, (160, 200, 3), dtype=np.uint8)), "JPEG", quality=90)
              for _ in range(48)]
    data = write_dataset(tmp_path / "jpegs", [(img, [f"a photo number {i}"]) for i, img in enumerate(photos)])
    steps = 40
    over = (f"--config.model.name={setup.tiny_bpe}", f"--config.data.train=dir:{data}", "--config.data.workers=2",
            "--config.data.num_threads=1", f"--config.total_steps={steps}", "--config.ckpt_every=4")
    reference = setup.run(tmp_path / "reference", *over)
    assert reference.returncode == 0, tail(reference)
    workdir = tmp_path / "run"
    with setup.start(workdir, *over) as proc:
        proc.wait_for(r"\bstep 3/40\b")
        workers = _worker_children(proc.popen.pid)
        assert len(workers) == 2, workers
        proc.popen.send_signal(signal.SIGINT)
        rc, out = proc.finish()
    assert rc == 0 and "SIGINT received" in out, tail(out)
    stopped = int(re.search(r"stopped at step (\d+)", out).group(1))
    assert 3 <= stopped < steps and steps_on_disk(workdir)[-1] == stopped, tail(out)
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in workers), f"data workers {workers} outlived the run"
    resumed = setup.run(workdir, *over)
    assert resumed.returncode == 0 and f"resumed from step {stopped}" in resumed.stderr, tail(resumed)
    assert losses(workdir) == losses(tmp_path / "reference")


@pytest.mark.parametrize("ignored", [False, True])
def test_sigint_stops_the_run_unless_the_process_started_with_it_ignored(ignored):
    """Row "SIGTERM / SIGINT": the trainer's handler takes SIGINT and SIGTERM; a SIGINT the process started with
    ignored (a background job of a script) stays ignored, while SIGTERM still stops the run. Real signals, sent to
    this process."""
    from clipjax.run_control import Preemption

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    preempt = Preemption()
    try:
        preempt.install()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python runs the handler in the main thread, between bytecodes
        assert preempt.requested is not ignored
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert preempt.requested
        preempt.uninstall()
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) == (signal.SIG_IGN if ignored else before[signal.SIGINT])
    finally:
        preempt.uninstall()
        for sig, handler in before.items():
            signal.signal(sig, handler)


# ============================================================================================ crashes

def _kill_during_async_write(proc: Proc, checkpoints: pathlib.Path, min_step: int) -> str:
    """SIGKILL `proc` while orbax writes a step ≥ `min_step` (its temporary directory exists); returns that name."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.popen.poll() is None:
        with contextlib.suppress(FileNotFoundError):
            for p in checkpoints.iterdir():
                match = re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp", p.name)
                if match and int(match.group(1)) >= min_step:
                    proc.popen.kill()
                    proc.finish()
                    return p.name
        time.sleep(0.002)
    pytest.fail(f"no checkpoint write seen; output ends with:\n{''.join(proc.lines[-30:])}")


@pytest.mark.slow
def test_kill9_during_async_write_and_mid_training_resumes_exactly(setup, tmp_path):
    """Row "kill -9": a crash during an async checkpoint write leaves only complete steps; a crash between writes
    loses the steps since the last one; each restart resumes from the newest complete step, and every step's loss
    equals the uninterrupted run's."""
    ref = losses(reference_run(setup))
    workdir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    with setup.start(workdir, "--config.ckpt_every=1") as proc:
        partial = _kill_during_async_write(proc, checkpoints, min_step=3)
    assert proc.popen.returncode == -signal.SIGKILL
    written = int(partial.split(".")[0])
    assert (checkpoints / partial).exists()  # the kill landed before the write was committed
    complete = steps_on_disk(workdir)
    assert complete and complete[-1] >= written - 1, (partial, complete)

    with setup.start(workdir, "--config.data.synthetic_seconds_per_batch=0.3") as proc:
        line = proc.wait_for(r"resumed from step \d+")
        assert f"resumed from step {complete[-1]} " in line
        proc.wait_for(rf"\bstep {complete[-1] + 2}/8\b")
        proc.popen.kill()
        proc.finish()

    final = setup.run(workdir)
    assert final.returncode == 0, tail(final)
    assert re.search(r"resumed from step \d+", final.stderr)
    for row in rows(workdir):  # every logged step of the three runs, including those lost to the crashes
        assert row["loss"] == ref[row["step"]], row
    assert sorted(losses(workdir)) == list(range(1, STEPS + 1))


# ============================================================================================ damaged checkpoints

def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _truncate(step_dir: pathlib.Path) -> None:
    f = _largest_array_file(step_dir)
    os.truncate(f, f.stat().st_size // 2)


def _delete(step_dir: pathlib.Path) -> None:
    _largest_array_file(step_dir).unlink()


def _flip_one_bit(step_dir: pathlib.Path) -> None:
    f = _largest_array_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # reads abandoned by orbax
@pytest.mark.parametrize("damage", [_truncate, _delete, _flip_one_bit], ids=["truncated", "deleted", "bit-flip"])
def test_damaged_newest_checkpoint_is_reported_and_the_previous_used(setup, tmp_path, caplog, damage):
    """Row "damaged newest checkpoint": read errors and fingerprint mismatches are detected, warned about, the step is
    moved aside and the previous one is restored with its exact values."""
    from clipjax.checkpoint import Checkpointer

    workdir = copy_run(reference_run(setup), tmp_path / "run", keep_until=STEPS)
    _, before = restore_newest(copy_run(workdir, tmp_path / "intact", keep_until=STEPS - 2))
    damage(workdir / "checkpoints" / str(STEPS))
    with caplog.at_level(logging.WARNING, logger="clipjax.checkpoint"):
        step, state = restore_newest(workdir)
    assert step == STEPS - 2
    assert any(f"checkpoint step {STEPS} in" in r.message and "unusable" in r.message for r in caplog.records)
    for a, b in zip(jax_leaves(state), jax_leaves(before)):
        np.testing.assert_array_equal(a, b)
    # the read-only restore above leaves the damaged step in place; a writer moves it aside
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    assert ckpt.restore()[0] == STEPS - 2
    ckpt.close()
    assert steps_on_disk(workdir) == [2, 4, 6]
    assert any(p.name.startswith(f"{STEPS}.corrupt") for p in (workdir / "checkpoints").iterdir())


def jax_leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_cli_resumes_past_a_truncated_checkpoint_exactly(setup, tmp_path):
    """Row "damaged newest checkpoint", end to end: the run warns, resumes from the previous step, writes the damaged
    step number again and follows the uninterrupted trajectory exactly."""
    ref = losses(reference_run(setup))
    workdir = copy_run(reference_run(setup), tmp_path / "run", keep_until=6)
    _truncate(workdir / "checkpoints" / "6")
    out = setup.run(workdir)
    assert out.returncode == 0, tail(out)
    assert "checkpoint step 6 in" in out.stderr and "unusable" in out.stderr and "resumed from step 4 " in out.stderr
    assert_no_traceback(out.stderr)
    assert "Exception ignored" not in out.stderr
    assert steps_on_disk(workdir) == [2, 4, 6, 8]
    assert losses(workdir) == ref


# ============================================================================================ mesh change

@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_a_smaller_data_parallel_mesh(setup, tmp_path):
    """Row "mesh / device-count change": an 8-device FSDP run's checkpoint restores onto 4 data-parallel devices with
    bit-identical values (its sharding-independent fingerprints verify) and training continues on the same
    trajectory."""
    ref = losses(reference_run(setup))
    fsdp = tmp_path / "fsdp"
    out = setup.run(fsdp, "--config.mesh.fsdp=-1", "--config.mesh.data=1", devices=8)
    assert out.returncode == 0, tail(out)
    assert "'fsdp': 8" in out.stderr
    fsdp_losses = losses(fsdp)
    np.testing.assert_allclose([fsdp_losses[s] for s in range(1, STEPS + 1)], [ref[s] for s in range(1, STEPS + 1)],
                               rtol=1e-5)
    moved = copy_run(fsdp, tmp_path / "dp", keep_until=4)
    out = setup.run(moved, devices=4)
    assert out.returncode == 0, tail(out)
    assert "'data': 4" in out.stderr and "resumed from step 4 " in out.stderr and "fingerprints verified" in out.stderr
    got = losses(moved)
    np.testing.assert_allclose([got[s] for s in range(5, STEPS + 1)], [fsdp_losses[s] for s in range(5, STEPS + 1)],
                               rtol=1e-5)


# ============================================================================================ non-finite updates

@pytest.mark.slow
def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(setup, tmp_path):
    """Row "non-finite loss or gradients": NaN batches skip their update (params unchanged) and are counted; K in a
    row stop the run with one error line; no checkpoint ever holds a NaN or Inf."""
    ref = losses(reference_run(setup))
    workdir = tmp_path / "run"
    out = setup.run(workdir, "--config.data.synthetic_nan_steps=(3,5,6)", "--config.max_nonfinite_steps=2")
    assert_user_error(out, "step 6: 2 non-finite updates in a row", "max_nonfinite_steps=2")
    by_step = {r["step"]: r for r in rows(workdir)}
    assert [by_step[s]["loss"] for s in (1, 2)] == [ref[1], ref[2]]
    assert np.isnan(by_step[3]["loss"]) and by_step[3]["nonfinite_total"] == 1 and by_step[3]["nonfinite_streak"] == 1
    assert by_step[3]["logit_scale"] == by_step[2]["logit_scale"]  # the update was skipped
    assert np.isfinite(by_step[4]["loss"]) and by_step[4]["nonfinite_streak"] == 0
    assert by_step[6]["nonfinite_total"] == 3 and by_step[6]["nonfinite_streak"] == 2
    assert "step 3: non-finite loss or gradients, update skipped" in out.stderr
    assert steps_on_disk(workdir) == [2, 4]  # step 6 (due) is not written: the run stopped first
    for step in steps_on_disk(workdir):
        _, state = restore_newest(copy_run(workdir, tmp_path / f"at{step}", keep_until=step))
        assert all(np.isfinite(x).all() for x in jax_leaves(state["params"]))


def test_a_state_with_nan_is_never_checkpointed(tmp_path):
    """Row "non-finite loss or gradients": the checkpointer itself refuses NaN/Inf and names the array."""
    import jax.numpy as jnp

    from clipjax.checkpoint import Checkpointer, NonFiniteStateError

    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, {"params": {"w": jnp.ones(3)}, "step": jnp.int32(1)})
    with pytest.raises(NonFiniteStateError, match=r"step 2: params/w holds NaN or Inf"):
        ckpt.save(2, {"params": {"w": jnp.array([1.0, jnp.inf, 0.0])}, "step": jnp.int32(2)})
    ckpt.close()
    assert ckpt.steps() == [1] and sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1"]
