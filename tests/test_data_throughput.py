"""python -m clipjax.data.throughput: a few seconds on a tiny real dataset, progress on stderr, one JSON line on
stdout; user errors as one `error:` line with status 2."""

import json
import subprocess
import sys

import pytest

from clipjax.data import scenes, throughput


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return scenes.build_scenes(tmp_path_factory.mktemp("t") / "ds", num_train=40, num_test=4, num_heldout=4,
                               seed=0, workers=0, progress=False)


def _run(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "clipjax.data.throughput", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_measures_worker_processes_and_ends_with_one_json_line(ds):
    out = _run("--data", f"dir:{ds}", "--batch-size", "8", "--workers", "1", "--threads", "2", "--image-size", "32",
               "--seconds", "2", "--every", "0.5")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["workers"] == 1 and result["threads"] == 2 and result["batch_size"] == 8
    assert result["batches"] > 0 and result["images"] == 8 * result["batches"]
    assert result["images_per_sec"] == pytest.approx(result["images"] / result["seconds"], rel=0.01)
    assert 2.0 <= result["seconds"] < 4.0 and result["startup_s"] > 0
    assert result["image_dtype"] == "uint8" and result["image_bytes_per_batch"] == 8 * 32 * 32 * 3
    progress = [line for line in out.stderr.splitlines() if "images/s" in line]
    assert len(progress) >= 2  # about every 0.5 s of 2 s


def test_threads_in_process_in_the_same_interpreter(ds, capsys):
    assert throughput.main(["--data", f"dir:{ds}", "--batch-size", "4", "--workers", "0", "--threads", "1",
                            "--image-size", "16", "--seconds", "0.5", "--every", "100"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["workers"] == 0 and result["threads"] == 1 and result["batches"] > 0
    assert "images/s" not in captured.err  # no progress line within 0.5 s at --every 100


@pytest.mark.parametrize("args,message", [
    (["--data", "dir:/no/such/dataset", "--batch-size", "8", "--image-size", "32"], "does not exist"),
    (["--data", "scenes", "--batch-size", "0", "--image-size", "32"], "--batch-size must be positive"),
    (["--data", "scenes", "--batch-size", "8", "--image-size", "32", "--workers", "-1"], "--workers must be >= 0"),
    (["--batch-size", "8", "--image-size", "32"], "the following arguments are required: --data"),
])
def test_user_errors_are_one_line_with_status_2(args, message, capsys):
    try:
        status = throughput.main(args)
    except SystemExit as e:  # usage errors end in argparse, through cli.fail
        status = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_help_exits_0():
    out = _run("--help", timeout=60)
    assert out.returncode == 0 and "images_per_sec" in out.stdout and not out.stderr.strip()
