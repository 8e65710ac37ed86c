"""Decode worker processes (clipjax.data.core.processes, ``workers=N``): same batches as threads, exact resume, no
JAX in the workers, one clear error when a worker dies, and no worker left behind after close, SIGTERM or Ctrl-C.

Everything runs for real: worker interpreters, ArrayRecord files, PNG decoding, signals. This module is imported
by the workers too (its record functions are pickled by name), so it must not import JAX at the top.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from clipjax.data import core, pipeline, scenes
from clipjax.data.tokenizer import get_tokenizer

TOK = get_tokenizer()
HEAVY = ("jax", "jaxlib", "flax", "optax", "tensorflow")  # what a decode worker must never import


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return scenes.build_scenes(tmp_path_factory.mktemp("w") / "ds", num_train=96, num_test=4, num_heldout=20,
                               seed=0, workers=0, progress=False)


def _train(path, **kw):
    args = dict(global_batch_size=12, image_size=48, context_length=8, tokenizer=TOK, seed=0, process_index=0,
                process_count=1, num_threads=1)
    return pipeline.make_train_iterator(f"dir:{path}", **{**args, **kw})


def _take(it, n):
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _children(parent=None):
    """Pids of the live (not zombie) data worker processes whose parent is ``parent`` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z" and b"workers.worker_main" in cmdline:
            out.append(int(entry))
    return sorted(out)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _within(seconds, fn):
    """``fn()``'s result, failing the test (instead of hanging it) if it takes longer than ``seconds``."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: a hang"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ============================================================================================ record functions

class HeavyModules:
    """Runs ``loader`` on an item, then reports which heavy modules the worker process has imported."""

    def __init__(self, loader):
        self.loader = loader

    def __call__(self, item):
        image = self.loader(item)[0]
        return image.shape, image.dtype.str, sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)


class ExitOn:
    """item → item + 1; ``os._exit(3)`` on item ``bad`` (a decoder that crashes the process)."""

    def __init__(self, bad):
        self.bad = bad

    def __call__(self, item):
        if item == self.bad:
            os._exit(3)
        time.sleep(0.001)
        return item + 1


class Bug:
    """Raises on item 5: an ordinary exception in a worker reaches the caller with the worker's traceback."""

    def __call__(self, item):
        if item == 5:
            raise KeyError("a bug in the worker")
        if item == 7:
            raise core.BadRecord("item 7: bad")
        return item


class Arrays:
    """item → large arrays of several layouts, filled from the item (the pipe carries them in many writes)."""

    def __call__(self, item):
        big = np.random.default_rng(item).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)  # 3 MiB
        return big, np.asfortranarray(big[:300, :200].astype(np.float32)), big[::3, ::2], np.int64(item), []


# ============================================================================================ tests

def test_batches_identical_for_any_workers_and_threads_and_resume_exact(ds):
    threads = _take(_train(ds, num_threads=2), 6)  # 72 of 96 records: the epoch's order, crops and captions
    one = _take(_train(ds, workers=1), 3)
    first = _train(ds, workers=2, num_threads=2)
    head = _take(first, 3)
    state = json.loads(json.dumps(first.get_state()))
    resumed = _train(ds, workers=1, num_threads=3)
    resumed.set_state(state)
    tail = _take(resumed, 3)
    for want, got in zip(threads[:3] * 2 + threads[3:], one + head + tail):  # one, head: batches 0-2; tail: 3-5
        assert set(got) == {"image", "text"} and got["image"].dtype == np.uint8
        for field in want:
            np.testing.assert_array_equal(want[field], got[field])
    assert not _children()


def test_workers_do_not_import_jax(ds):
    """The worker path (bootstrap, core, pipeline, sources, a real record decoded) stays free of JAX, even
    though this test process has JAX imported."""
    import jax  # noqa: F401  (the parent holds JAX, as the trainer does)

    it = _train(ds)
    slot = next(it._slots(it.get_state()))
    with core.OrderedMap(HeavyModules(it.loader), [slot], executor=core.processes(1, 1), window=1) as m:
        ((_, (shape, dtype, heavy)),) = list(m)
    assert shape == (48, 48, 3) and dtype == "|u1"
    assert heavy == []


def test_a_worker_that_exits_gives_one_clear_error_naming_the_item():
    m = core.OrderedMap(ExitOn(17), range(60), executor=core.processes(2, 2), window=8)
    got = []
    with pytest.raises(core.DataWorkerError, match=r"data worker process \d \(pid \d+\) died \(exit status 3\) "
                                                    r"while working on (17|one of [\d, ]*17\b)") as info:
        _within(60, lambda: got.extend(r for _, r in m))
    assert "the input pipeline cannot go on" in str(info.value)
    assert got == list(range(1, len(got) + 1)) and len(got) <= 17  # in order, and nothing from after the crash
    assert not _children()


def test_large_results_cross_the_pipe_intact():
    with core.OrderedMap(Arrays(), range(6), executor=core.processes(2, 2), window=4) as m:
        got = list(m)
    for (item, result), want in zip(got, map(Arrays(), range(6))):
        assert result[3] == item and result[4] == [] and result[1].flags.f_contiguous
        for a, b in zip(result[:3], want[:3]):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_a_worker_that_cannot_start_says_why(tmp_path, monkeypatch):
    """A record function the workers cannot import (its module is gone from their sys.path) fails the first
    result with the worker's import error, instead of leaving the map waiting."""
    (tmp_path / "vanishing_fn.py").write_text("class Fn:\n    def __call__(self, item):\n        return item\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing_fn

    fn = vanishing_fn.Fn()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    m = core.OrderedMap(fn, range(10), executor=core.processes(2, 1), window=4)
    with pytest.raises(core.DataWorkerError, match=r"data worker process \d \(pid \d+\) could not start: "
                                                    r"ModuleNotFoundError: No module named 'vanishing_fn'"):
        _within(60, lambda: next(m))
    assert not _children()


def test_worker_exceptions_reach_the_caller_bad_records_are_skipped():
    m = core.OrderedMap(Bug(), range(20), executor=core.processes(1, 2), window=4)
    assert [next(m) for _ in range(5)] == [(i, i) for i in range(5)]
    with pytest.raises(KeyError, match="a bug in the worker") as info:
        next(m)
    assert 'raise KeyError("a bug in the worker")' in str(info.value.__cause__)  # the worker's traceback
    with core.OrderedMap(Bug(), range(7, 10), executor=core.processes(1, 1), window=2) as m:
        assert list(m) == [(8, 8), (9, 9)] and m.skipped == 1
    assert not _children()


def test_a_killed_worker_stops_the_iterator_with_an_error_not_a_hang(ds):
    """SIGINT/SIGTERM to the workers (a process-group Ctrl-C or preemption notice, which the parent handles) leave
    them serving; SIGKILL (the out-of-memory killer) ends the iterator with one error naming the signal."""
    it = _train(ds, workers=2, prefetch=1)
    want = _take(_train(ds), 8)
    np.testing.assert_array_equal(next(it)["image"], want[0]["image"])
    pids = _children()
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    for i in range(1, 8):  # more than the batches made ahead: the workers decoded these after the signals
        np.testing.assert_array_equal(_within(60, lambda: next(it))["image"], want[i]["image"])
    assert _children() == pids
    os.kill(pids[0], signal.SIGKILL)

    def drain():
        for _ in range(50):  # the batches already made come first
            next(it)

    with pytest.raises(core.DataWorkerError, match=r"died \(signal 9, SIGKILL"):
        _within(60, drain)
    it.close()
    assert not _children()


def test_close_ends_the_workers_and_an_iterator_resumes_after_it(ds):
    it = _train(ds, workers=2)
    a = next(it)
    pids = _children()
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    it.close()
    assert not _children() and not any(_alive(p) for p in pids)
    b = next(it)  # restarts fresh workers at the saved position
    assert len(_children()) == 2 and not np.array_equal(a["image"], b["image"])
    it.close()
    ev = pipeline.make_eval_dataset(f"dir:{ds}", "heldout", image_size=32, batch_size=8, workers=2)
    threaded = list(pipeline.make_eval_dataset(f"dir:{ds}", "heldout", image_size=32, batch_size=8))
    for x, y in zip(list(ev), threaded):
        assert x["image"].dtype == np.float32
        for field in ("image", "label", "mask"):
            np.testing.assert_array_equal(x[field], y[field])
        assert x["key"] == y["key"]
    assert not _children()


_PARENT = textwrap.dedent("""
    import faulthandler, json, os, signal, sys, time
    # SIGUSR1: every thread's Python stack into the file argv[3] (what the test shows if this process hangs)
    faulthandler.register(signal.SIGUSR1, os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), all_threads=True)
    import jax
    jax.numpy.zeros(1).block_until_ready()  # JAX initialised in the parent, as in the trainer
    sys.path.insert(0, sys.argv[2])
    from test_data_workers import _children, _train
    it = _train(sys.argv[1], workers=2)
    next(it)
    print(json.dumps(_children()), flush=True)
    time.sleep(600)
""")


def _why_stuck(pid, stacks_file):
    """What process ``pid`` (started from ``_PARENT``) is doing: its signal state (blocked, ignored, pending), each
    thread's kernel state, and every thread's Python stack (faulthandler, on SIGUSR1)."""
    lines = []
    try:
        with open(f"/proc/{pid}/status") as f:
            lines += [line.rstrip() for line in f if line.startswith(("State", "Sig", "ShdPnd"))]
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            task = f"/proc/{pid}/task/{tid}"
            with open(f"{task}/comm") as f, open(f"{task}/wchan") as g, open(f"{task}/stat") as h, \
                    open(f"{task}/status") as k:
                blocked = next((line.split()[1] for line in k if line.startswith("SigBlk")), "?")
                lines.append(f"thread {tid} {f.read().strip()!r}: state {h.read().rsplit(')', 1)[1].split()[0]}, "
                             f"wchan {g.read().strip() or '-'}, SigBlk {blocked}")
        os.kill(pid, signal.SIGUSR1)
    except OSError as e:
        lines.append(f"({type(e).__name__}: {e})")
    time.sleep(2)
    stacks = stacks_file.read_text() if stacks_file.exists() else ""
    return "\n".join(lines) + "\nPython stacks:\n" + (stacks or "(none written)")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_no_worker_survives_its_parent_being_stopped(ds, sig, tmp_path):
    """SIGTERM (the default action: the parent ends at once, no clean-up) and Ctrl-C (KeyboardInterrupt) of a
    parent that holds JAX and a 2-worker iterator: both workers are gone soon after."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    stacks = tmp_path / "parent_stacks.txt"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(ds), os.path.dirname(__file__), str(stacks)],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = json.loads(_within(120, parent.stdout.readline))
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parent.send_signal(sig)
        try:
            code = parent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the parent did not exit within 60 s of {sig.name}:\n{_why_stuck(parent.pid, stacks)}")
        assert code != 0
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), f"workers {pids} outlived their parent"
    finally:
        parent.kill()
        parent.wait()
