"""Workdir safety (docs/reliability.md): one trainer per workdir (a lock that survives `kill -9` of its holder, on
local disk and gs://), old checkpoints deleted only after a newer one is complete (kills at many points of a save,
local and gs://), a resume that says what it verified (and treats a step without its fingerprints as damaged), and
damaged workdir files (a cut metrics.jsonl, a half-written config.json) kept aside with a warning.

Real files, real orbax checkpoints, real processes (the lock holders and the trainers are subprocesses killed with
SIGKILL), and a real GCS emulator for gs:// (tests/gcs_emulator.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time

import pytest

from gcs_emulator import BUCKET, needs_emulator, running_emulator
from test_reliability import STEPS, Proc, Setup, assert_user_error, rows, setup_for, tail

HOLDER = """
import logging, sys, time
logging.basicConfig(level=logging.INFO)
from clipjax.workdir_lock import WorkdirLock
lock = WorkdirLock(sys.argv[1], heartbeat_s=float(sys.argv[2]))
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return setup_for(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def emulator():
    with running_emulator() as emu:
        yield emu


def gs(path: str) -> str:
    return f"gs://{BUCKET}/{path}"


def start_holder(workdir, heartbeat_s: float = 30.0) -> Proc:
    """A process that takes the workdir's lock and keeps it (until killed)."""
    proc = Proc([sys.executable, "-c", HOLDER, str(workdir), str(heartbeat_s)], {**os.environ})
    proc.wait_for("^held", timeout=120)
    return proc


def kill9(proc: Proc) -> None:
    proc.popen.send_signal(signal.SIGKILL)
    proc.finish()


# ============================================================================================ 1. one trainer per workdir

@pytest.mark.parametrize("where", ["local", "gs"])
def test_lock_refuses_a_second_holder_and_takes_over_after_kill9(where, tmp_path, caplog, request):
    """A workdir whose lock is held is refused naming the holder's host and pid; once the holder is killed with -9,
    its lock is stale (same host, pid not running) and is taken over with a warning naming it; released, the lock is
    gone."""
    from clipjax import paths
    from clipjax.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError

    if where == "gs":
        request.getfixturevalue("emulator")
        workdir = gs("locked")
    else:
        workdir = tmp_path / "run"
        workdir.mkdir()
    holder = start_holder(workdir)
    try:
        with pytest.raises(WorkdirLockedError) as e:
            WorkdirLock(workdir, settle_s=0.1).acquire()
        message = str(e.value)
        assert f"pid {holder.popen.pid}" in message and f"host {socket.gethostname()}" in message, message
        assert str(workdir) in message and "--workdir" in message and "\n" not in message
    finally:
        kill9(holder)
    caplog.set_level(logging.INFO)
    lock = WorkdirLock(workdir, settle_s=0.1)
    lock.acquire()
    taken = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
    assert taken and f"pid {holder.popen.pid}" in taken[0], caplog.text
    lock.release()
    assert not paths.as_path(f"{workdir}/{LOCK_NAME}").exists()
    lock = WorkdirLock(workdir, settle_s=0.1)  # a released lock is taken without a word
    caplog.clear()
    lock.acquire()
    lock.release()
    assert "stale" not in caplog.text


@needs_emulator
def test_lock_of_another_host_is_stale_only_when_its_heartbeat_is(emulator, caplog):
    """In a bucket a lock of another host cannot be checked by pid: a recent heartbeat refuses (naming that host and
    how to proceed), one older than the timeout is taken over with a warning."""
    from clipjax import paths
    from clipjax.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError

    workdir = gs("other-host")
    record = {"host": "trainer-7", "pid": 4242, "token": "x", "started": time.time() - 50}
    lock_path = paths.as_path(f"{workdir}/{LOCK_NAME}")
    lock_path.write_text(json.dumps({**record, "heartbeat": time.time() - 20}))
    with pytest.raises(WorkdirLockedError, match=r"host trainer-7, pid 4242.*heartbeat is 300 s old.*delete"):
        WorkdirLock(workdir, settle_s=0.1).acquire()
    lock_path.write_text(json.dumps({**record, "heartbeat": time.time() - 400}))
    caplog.set_level(logging.INFO)
    lock = WorkdirLock(workdir, settle_s=0.1)
    lock.acquire()
    assert re.search(r"taking over the stale lock .*trainer-7.*heartbeat was \d+ s ago", caplog.text), caplog.text
    assert json.loads(lock_path.read_text())["token"] == lock.token
    lock.release()
    assert not lock_path.exists()


@needs_emulator
def test_heartbeat_is_refreshed_and_a_lost_lock_is_reported(emulator, caplog):
    """The holder refreshes its heartbeat; when another run overwrote its lock, it says so and leaves that lock."""
    from clipjax import paths
    from clipjax.workdir_lock import LOCK_NAME, WorkdirLock

    workdir = gs("heartbeat")
    lock = WorkdirLock(workdir, heartbeat_s=0.2, settle_s=0.1)
    lock.acquire()
    lock_path = paths.as_path(f"{workdir}/{LOCK_NAME}")
    first = json.loads(lock_path.read_text())["heartbeat"]
    deadline = time.monotonic() + 30
    while json.loads(lock_path.read_text())["heartbeat"] == first:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    other = {"host": "elsewhere", "pid": 1, "token": "theirs", "heartbeat": time.time(), "started": time.time()}
    lock_path.write_text(json.dumps(other))
    while lock.lost is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    lock.release()
    assert json.loads(lock_path.read_text())["token"] == "theirs"
    assert "took over its lock" in caplog.text


@pytest.mark.slow
def test_a_second_trainer_on_a_busy_workdir_is_refused_naming_the_first(setup, tmp_path):
    """The issue's run: a trainer on a workdir that another trainer is using is refused with one `error:` line
    (exit 2) naming the first one's host and pid; the first one finishes untouched: every step logged once, its
    checkpoints complete, no lock left."""
    workdir = tmp_path / "run"
    with setup.start(workdir, "--config.ckpt_every=1", "--config.data.synthetic_seconds_per_batch=0.2") as first:
        first.wait_for("compiling the train step")
        second = setup.run(workdir, "--config.ckpt_every=1")
        rc, out = first.finish()
    assert_user_error(second, f"workdir {workdir} is in use", f"pid {first.popen.pid}", socket.gethostname())
    assert rc == 0, tail(out)
    assert [r["step"] for r in rows(workdir) if "loss" in r] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == sorted(str(s) for s in range(1, STEPS + 1))
    assert not (workdir / ".lock").exists()


# ============================================================================================ 2. kills during saves

SAVER = """
import sys, time
import jax.numpy as jnp
from clipjax.checkpoint import Checkpointer

ckpt = Checkpointer(sys.argv[1], keep=1, async_save=True)
state = {f"w{i:02d}": jnp.full((96, 96), 0.0) for i in range(24)}
restored = ckpt.restore() if ckpt.latest_step() is not None else None
start = 0 if restored is None else restored[0]
print("resumed", start, flush=True)
for step in range(start + 1, start + 1000):
    ckpt.save(step, {k: v + step for k, v in state.items()}, {"position": step})
    print("saving", step, flush=True)
    time.sleep(0.2)
"""


class Listing:
    """The names under a checkpoint directory, local or in the emulator's bucket."""

    def __init__(self, directory: str, emulator=None):
        self.directory, self.emulator = directory, emulator

    def names(self) -> list[str]:
        if self.emulator is not None:
            prefix = self.directory.split(f"gs://{BUCKET}/", 1)[1] + "/"
            return [n[len(prefix):] for n in self.emulator.names(prefix)]
        names = []
        for folder, dirs, files in os.walk(self.directory):  # what vanishes while listed is skipped
            rel = os.path.relpath(folder, self.directory)
            names += [name if rel == "." else f"{rel}/{name}" for name in dirs + files]
        return names


def _phase(names: list[str], remote: bool) -> dict[int, str]:
    """{step: "writing" | "complete"} from a listing (gs://: a step is complete once its marker is there)."""
    steps: dict[int, str] = {}
    for name in names:
        top = name.split("/", 1)[0]
        number = top.split(".", 1)[0]
        if not number.isdigit():
            continue
        step = int(number)
        if remote:
            done = name == f"{top}/commit_success.txt" and top.isdigit()
        else:
            done = top.isdigit()
        steps[step] = "complete" if done or steps.get(step) == "complete" else "writing"
    return steps


def kill_at(listing: Listing, proc: Proc, point: str, remote: bool, timeout: float = 120) -> None:
    """Kill the saver at `point` of a save: a new step's write "started", the new step "complete" while the one
    before still exists, or the one before "deleting" (fewer of its files than before)."""
    deadline = time.monotonic() + timeout
    base = None
    while proc.popen.poll() is None and time.monotonic() < deadline:
        phases = _phase(listing.names(), remote)
        complete = sorted(s for s, p in phases.items() if p == "complete")
        writing = [s for s, p in phases.items() if p == "writing" and complete and s > complete[-1]]
        if point == "started" and writing:
            break
        if point == "complete" and len(complete) >= 2:
            break
        if point == "deleting":
            counts = {s: sum(1 for n in listing.names() if n.split("/", 1)[0].split(".")[0] == str(s))
                      for s in complete}
            if base is None and len(complete) >= 2:
                base = (complete[0], counts[complete[0]])
            elif base is not None and counts.get(base[0], 0) < base[1]:
                break
        time.sleep(0.002)
    kill9(proc)


def assert_every_listed_step_is_whole(directory: str) -> list[int]:
    """Every step that looks complete restores and matches its fingerprints (no half-deleted step looks whole)."""
    from clipjax.checkpoint import Checkpointer

    ckpt = Checkpointer(directory, read_only=True)
    steps = ckpt.steps()
    assert steps, "no checkpoint left"
    for s in steps:
        step, state, data = ckpt.restore(step=s)
        assert data == {"position": s} and float(state["w00"][0, 0]) == s
    ckpt.close()
    return steps


@pytest.mark.slow  # ~40 s each: six saver processes
@pytest.mark.parametrize("where", ["local", "gs"])
def test_kill9_at_any_point_of_a_save_leaves_a_checkpoint_to_resume_from(where, tmp_path, request):
    """An async saver keeping one checkpoint is killed with -9 at several points of its saves (a new step's write
    started, complete beside the old one, the old one being deleted); after every kill each step that looks complete
    is whole, and the saver resumes from the newest one."""
    emulator = request.getfixturevalue("emulator") if where == "gs" else None
    directory = gs("kills/checkpoints") if emulator else str(tmp_path / "checkpoints")
    listing = Listing(directory, emulator)
    resumed = 0
    for point in ("started", "complete", "deleting", "started", "deleting"):
        proc = Proc([sys.executable, "-c", SAVER, directory], {**os.environ})
        line = proc.wait_for(r"^resumed \d+")
        assert int(line.split()[1]) >= resumed, line
        kill_at(listing, proc, point, remote=emulator is not None)
        steps = assert_every_listed_step_is_whole(directory)
        resumed = steps[-1]
    proc = Proc([sys.executable, "-c", SAVER, directory], {**os.environ})
    assert proc.wait_for(r"^resumed \d+") == f"resumed {resumed}\n"
    kill9(proc)


# ============================================================================================ 3. what a resume verified

def test_a_step_without_its_fingerprints_is_damaged_and_the_resume_says_what_it_checked(tmp_path, caplog):
    """A step whose fingerprints (its meta item) were deleted is not restored unverified: it is reported, moved aside
    and the step before it is used; the restore says what it checked. With no other step, one error names it."""
    import jax.numpy as jnp

    from clipjax.checkpoint import CheckpointError, Checkpointer

    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, async_save=False, keep=5)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full((4, 4), float(step)), "b": jnp.zeros(3)}, {"position": step})
    ckpt.close()
    shutil.rmtree(directory / "2" / "meta")
    caplog.set_level(logging.INFO)
    ckpt = Checkpointer(directory, async_save=False, keep=5)
    step, state, data = ckpt.restore()
    assert step == 1 and float(state["w"][0, 0]) == 1.0 and data == {"position": 1}
    assert ckpt.verified == "fingerprints verified: all 2 arrays match"
    assert re.search(r"step 2 .* is unusable \(its fingerprints \(the meta item\) are missing\)", caplog.text)
    assert [p.name for p in directory.iterdir() if p.name.startswith("2.corrupt-")]
    ckpt.close()

    shutil.rmtree(directory / "1" / "meta")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint .*steps \[1\].*fingerprints"):
        Checkpointer(directory, async_save=False).restore()


# ============================================================================================ 4. damaged workdir files

def _cut_metrics(path) -> bytes:
    """metrics.jsonl with rows 1-3 and row 4 cut mid-line (as a run killed while writing it leaves it)."""
    rows_ = [json.dumps({"step": s, "loss": 3.0 - s / 10}) + "\n" for s in (1, 2, 3, 4)]
    data = ("".join(rows_[:3]) + rows_[3][:12]).encode()
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_cut_metrics_file_is_warned_about_and_kept_aside(where, tmp_path, caplog, request):
    """A metrics.jsonl whose last row was cut mid-line: reading it skips that line with a warning naming it; a resume
    keeps the readable rows, warns naming the file and what was kept, and keeps the file as it was beside it; the next
    row starts on its own line."""
    from clipjax import paths
    from clipjax.metrics import MetricWriter, read_metrics

    if where == "gs":
        request.getfixturevalue("emulator")
        workdir = paths.as_path(gs("cut-metrics"))
    else:
        workdir = tmp_path
    data = _cut_metrics(workdir / "metrics.jsonl")
    caplog.set_level(logging.INFO)
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3]
    assert re.search(r"metrics\.jsonl: skipped line 4, which cannot be read", caplog.text), caplog.text
    caplog.clear()

    writer = MetricWriter(workdir)
    writer.truncate_after(3)
    writer.write(4, {"loss": 2.6})
    writer.close()
    assert re.search(r"metrics\.jsonl: line 4 cannot be read .*kept the 3 readable rows up to step 3 .*kept as "
                     r"metrics\.jsonl\.damaged-\d{8}-\d{6}", caplog.text), caplog.text
    copies = [p for p in workdir.iterdir() if p.name.startswith("metrics.jsonl.damaged-")]
    assert len(copies) == 1 and copies[0].read_bytes() == data
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4]


def test_a_half_written_config_json_is_kept_aside_before_it_is_written_again(tmp_path, caplog):
    """A config.json cut short is not overwritten silently: it is kept as config.json.damaged-<time> with a warning
    naming both; a readable one is left alone."""
    from clipjax.workdir import keep_damaged_config

    (tmp_path / "config.json").write_text('{"config": {"batch_size": 8}, "model_config": {"embed')
    caplog.set_level(logging.INFO)
    keep_damaged_config(tmp_path)
    copies = [p for p in tmp_path.iterdir() if p.name.startswith("config.json.damaged-")]
    assert len(copies) == 1 and copies[0].read_text().endswith('"embed')
    assert re.search(r"config\.json cannot be read .*kept as config\.json\.damaged-\d{8}-\d{6}", caplog.text)
    (tmp_path / "config.json").write_text(json.dumps({"config": {}, "model_config": {}}))
    caplog.clear()
    keep_damaged_config(tmp_path)
    assert len([p for p in tmp_path.iterdir() if "damaged" in p.name]) == 1 and "cannot be read" not in caplog.text


@pytest.mark.slow
def test_resuming_a_workdir_with_damaged_files_keeps_them_and_says_so(setup, tmp_path):
    """End to end: a finished run whose metrics.jsonl was cut mid-row and whose config.json is half-written resumes;
    both are warned about, kept beside as `.damaged-<time>`, and written again (config.json whole, every readable
    row kept)."""
    from test_reliability import copy_run, reference_run

    workdir = copy_run(reference_run(setup), tmp_path / "run", keep_until=STEPS)
    text = (workdir / "metrics.jsonl").read_text()
    (workdir / "metrics.jsonl").write_text(text[:-25])  # the last row (step 8) cut mid-line
    config = (workdir / "config.json").read_text()
    (workdir / "config.json").write_text(config[:len(config) // 2])
    out = setup.run(workdir)
    assert out.returncode == 0, tail(out)
    assert re.search(r"metrics\.jsonl: line \d+ cannot be read", out.stderr), tail(out)
    assert re.search(r"config\.json cannot be read .*kept as config\.json\.damaged-", out.stderr), tail(out)
    names = [p.name for p in workdir.iterdir()]
    assert [n for n in names if n.startswith("metrics.jsonl.damaged-")]
    assert [n for n in names if n.startswith("config.json.damaged-")]
    assert json.loads((workdir / "config.json").read_text())["model_config"]
    assert [r["step"] for r in rows(workdir) if "loss" in r] == list(range(1, STEPS))


def test_every_process_of_a_run_on_a_busy_workdir_stops_with_the_error(setup, tmp_path):
    """Only process 0 of a multi-process run takes the lock; when the workdir is busy, every process stops with the
    same one-line error (none waits in a collective for ever)."""
    from test_multihost import finish_all, start_two

    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = start_holder(workdir)
    try:
        results = finish_all(start_two(setup, workdir), timeout=300)
    finally:
        kill9(holder)
    for rc, out in results:
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert rc == 2 and len(errors) == 1, tail(out)
        assert f"pid {holder.popen.pid}" in errors[0] and "is in use by another training run" in errors[0]
