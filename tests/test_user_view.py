"""What a user sees of a run and of its files: the progress line's rate and ETA, the final line, the permissions of
exported files, where the caches go, the curves of a run (`python -m clipjax.plot`), and what git ignores."""

import json
import os
import pathlib
import re
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from clipjax import cache_dir, compile_cache, export
from clipjax.metrics import Progress

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ============================================================================================ progress line

def test_progress_has_no_eta_before_a_rate_is_measured():
    """The first line (its step includes compiling) shows no rate nor ETA; the next ones measure from it."""
    progress = Progress(total_steps=1000, start_step=0)
    time.sleep(0.5)  # "compiling" the first step
    first = progress.line(1, {"loss": 3.9, "samples_per_sec": 2.0})
    assert "ETA" not in first and "steps/s" not in first and "samples_per_sec" not in first, first
    assert first.startswith("step 1/1000 (0%) (first step, compilation included: ") and "loss=3.9" in first, first
    time.sleep(0.1)  # 10 steps of 10 ms: 100 steps/s
    line = progress.line(11, {"loss": 3.5, "samples_per_sec": 800.0})
    rate = float(re.search(r" ([\d.]+) steps/s ", line).group(1))
    assert 40 < rate <= 100, line  # the compilation would make it < 20
    eta = re.search(r"ETA (\d+):(\d\d):(\d\d)", line).groups()
    assert int(eta[0]) * 3600 + int(eta[1]) * 60 + int(eta[2]) <= 25, line  # 989 steps at >= 40 steps/s
    assert "samples_per_sec=800" in line


def test_progress_of_a_resumed_run_measures_from_its_first_line():
    progress = Progress(total_steps=100, start_step=50)
    time.sleep(0.3)
    first = progress.line(51, {"loss": 1.0})
    assert "ETA" not in first and "(first step, compilation included: 0." in first, first
    time.sleep(0.05)
    assert "ETA 0:00:0" in progress.line(60, {"loss": 1.0})


# ============================================================================================ file modes

def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_weights_have_the_mode_of_every_other_file(fixtures_dir, tmp_path, umask):
    """model.safetensors was 0600 (safetensors' own mode) beside 0644 JSON files."""
    from clipjax.finetune import Head, load_head, save_head

    old = os.umask(umask)
    try:
        hf = fixtures_dir / "hf_clip"
        assert export.main(["--model", str(hf), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
        assert export.main(["--model", str(hf), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
        save_head(Head(np.ones((4, 3), np.float32), np.zeros(3, np.float32)), tmp_path / "head.safetensors")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for out in (tmp_path / "hf", tmp_path / "oc"):
        modes = {f.name: _mode(f) for f in out.iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {expected}, (out.name, modes)
    assert _mode(tmp_path / "head.safetensors") == expected
    assert load_head(tmp_path / "head.safetensors").kernel.shape == (4, 3)


# ============================================================================================ caches

def test_every_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    """XDG_CACHE_HOME moved the XLA cache but not the scenes dataset nor the zero-shot classifiers."""
    from clipjax.data import scenes
    from clipjax.evaluate.__main__ import parse_args

    for var in ("CLIPJAX_DATA_DIR", compile_cache.ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "xdg" / "clipjax"
    assert cache_dir.root() == root
    assert compile_cache.default_dir() == str(root / "xla")
    assert scenes.default_data_dir() == root / "datasets"
    args = parse_args(["--model", "m", "--task", "zeroshot", "--data", "scenes"])
    assert args.cache_dir == str(root / "zeroshot")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home" / ".cache" / "clipjax"
    assert scenes.default_data_dir() == home / "datasets" and compile_cache.default_dir() == str(home / "xla")
    assert parse_args(["--model", "m", "--task", "zeroshot", "--data", "scenes"]).cache_dir == str(home / "zeroshot")
    monkeypatch.setenv("CLIPJAX_DATA_DIR", str(tmp_path / "data"))  # the specific variable still wins
    assert scenes.default_data_dir() == tmp_path / "data"
