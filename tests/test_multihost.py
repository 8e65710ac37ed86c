"""Multi-process training on one machine: `python -m clipjax.main ... --coordinator=127.0.0.1:PORT --num_processes=2
--process_id=i --local_device_count=2`, CPU devices, collectives over gloo.

Checked: the same loss trajectory as one process over the same 4 devices and global batch; each process reads only
the same global batch, made on the devices (synthetic), or only its records (real pipeline); a SIGTERM to one process stops both at the same step with a
joint checkpoint; that checkpoint resumes in two processes (each with its own input position) and loads in one;
only process 0 writes metrics.
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

from test_reliability import (STEPS, Proc, Setup, copy_run, free_port, losses, reference_run, rows, setup_for,
                              steps_on_disk, tail)


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> Setup:
    return setup_for(tmp_path_factory.getbasetemp())


def start_two(setup: Setup, workdir, *overrides: str) -> list[Proc]:
    port = free_port()
    return [Proc(setup.args(workdir, *overrides, f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                            f"--process_id={i}", devices=2), setup.env()) for i in range(2)]


def finish_all(procs: list[Proc], timeout: float = 900) -> list[tuple[int, str]]:
    try:
        return [p.finish(timeout) for p in procs]
    finally:
        for p in procs:
            p.__exit__()


@pytest.mark.slow
def test_two_processes_follow_the_one_process_trajectory_through_a_preemption(setup, tmp_path):
    """Row "SIGTERM / SIGINT" and "multi-host": SIGTERM to process 1 only → both checkpoint the same step and exit 0;
    the restart (2 processes) resumes there; the whole trajectory equals 1 process × 4 devices (1e-5); the jointly
    written checkpoint loads in a single process."""
    import clipjax

    ref_dir = reference_run(setup)
    ref = losses(ref_dir)
    workdir = tmp_path / "run"
    procs = start_two(setup, workdir, "--config.data.synthetic_seconds_per_batch=0.3")
    try:
        procs[0].wait_for(r"\bstep 3/8\b")
        procs[1].popen.send_signal(signal.SIGTERM)
    finally:
        results = finish_all(procs)
    for rc, out in results:
        assert rc == 0, tail(out)
    stops = {int(line.split("stopped at step ")[1].split()[0]) for _, out in results for line in out.splitlines()
             if "stopped at step " in line}
    assert len(stops) == 1, stops  # both processes stopped at the same step
    stopped = stops.pop()
    assert 3 <= stopped < STEPS
    assert steps_on_disk(workdir)[-1] == stopped
    data = json.loads((workdir / "checkpoints" / str(stopped) / "data" / "metadata").read_text())
    assert data["process_count"] == 2 and len(data["per_process"]) == 2
    logged = [r["step"] for r in rows(workdir)]
    assert logged == list(range(1, stopped + 1))  # only process 0 writes metrics: each step once

    results = finish_all(start_two(setup, workdir))
    for rc, out in results:
        assert rc == 0, tail(out)
        assert f"resumed from step {stopped} " in out
    got = losses(workdir)
    assert [r["step"] for r in rows(workdir)] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [ref[s] for s in range(1, STEPS + 1)],
                               rtol=1e-5, atol=1e-6)

    joint, single = clipjax.load(workdir), clipjax.load(ref_dir)  # 2-process checkpoint, read by this one process
    for a, b in zip(_leaves(joint.params), _leaves(single.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _numbered_dataset(directory, n: int):
    """`n` records whose captions are "record <i>" (the record number is read back from the tokens)."""
    from test_reliability import encode, write_dataset
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [encode(Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)), "PNG") for _ in range(n)]
    return write_dataset(directory, [(img, [f"record {i}"]) for i, img in enumerate(images)])


def _number_tokenizer(texts, context_length):
    """Tokens [i, 0, ...] for caption "record <i>": which records a batch holds."""
    out = np.zeros((len(texts), context_length), np.int32)  # [b, C]
    out[:, 0] = [int(t.split()[1]) for t in texts]
    return out


def test_pipeline_processes_read_disjoint_records(tmp_path):
    """Row "multi-host": with the real pipeline, two processes read disjoint halves of every epoch."""
    from clipjax.data.pipeline import make_train_iterator

    directory = _numbered_dataset(tmp_path / "numbered", 40)
    seen = []
    for index in range(2):
        it = make_train_iterator(f"dir:{directory}", global_batch_size=8, image_size=16, context_length=4,
                                 tokenizer=_number_tokenizer, seed=3, process_index=index, process_count=2)
        epoch = [next(it)["text"][:, 0] for _ in range(5)]  # 5 batches × 4 rows = this process's 20 records
        it.close()
        seen.append(set(np.concatenate(epoch).tolist()))
        assert len(seen[-1]) == 20  # no record twice within the epoch
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(40))


@pytest.mark.slow
def test_two_processes_resume_each_with_its_own_input_position(setup, tmp_path):
    """Row "multi-host": with the real pipeline, each process's iterator state is saved and restored to that same
    process (a swap would be refused), and the resumed run repeats the uninterrupted one's trajectory."""
    directory = _numbered_dataset(tmp_path / "numbered", 40)
    overrides = (f"--config.model.name={setup.tiny_bpe}", f"--config.data.train=dir:{directory}",
                 "--config.ckpt_every=4")
    full = tmp_path / "full"
    for rc, out in finish_all(start_two(setup, full, *overrides)):
        assert rc == 0, tail(out)
    data = json.loads((full / "checkpoints" / "4" / "data" / "metadata").read_text())
    assert [s["process_index"] for s in data["per_process"]] == [0, 1]
    resumed = copy_run(full, tmp_path / "resumed", keep_until=4)
    for rc, out in finish_all(start_two(setup, resumed, *overrides)):
        assert rc == 0, tail(out)
        assert "resumed from step 4 " in out
    want, got = losses(full), losses(resumed)
    np.testing.assert_allclose([got[s] for s in range(5, STEPS + 1)], [want[s] for s in range(5, STEPS + 1)],
                               rtol=1e-6)


def test_input_position_of_another_process_count_is_dropped_with_a_warning(tmp_path, caplog):
    """Row "process-count change": a checkpoint whose processes saved different input positions resumes in a
    different number of processes with the input pipeline restarted (warned), the state restored."""
    import jax.numpy as jnp

    from clipjax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(4, {"w": jnp.arange(3.0)}, {"sample": 16, "process_index": 0})
    ckpt.close()
    data = tmp_path / "ckpt" / "4" / "data" / "metadata"  # as two processes would have written it
    data.write_text(json.dumps({"process_count": 2, "per_process": [{"sample": 16, "process_index": i}
                                                                     for i in range(2)]}))
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False, read_only=True)
    with caplog.at_level("WARNING", logger="clipjax.checkpoint"):
        step, state, data_state = ckpt.restore()
    ckpt.close()
    assert step == 4 and np.asarray(state["w"]).tolist() == [0.0, 1.0, 2.0] and data_state == {}
    assert any("written by 2 processes, this run has 1" in r.message for r in caplog.records)
