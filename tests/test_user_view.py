"""What a user sees of a run and of its files: the progress line's rate and ETA, the final line, the permissions of
exported files, where the caches go, the curves of a run (`python -m clipjax.plot`), and what git ignores."""

import json
import os
import pathlib
import re
import signal
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


# ============================================================================================ a short real run

def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0", **extra}


def _oc(key_values: str) -> list[str]:
    return [f"--config.model.open_clip_config.{kv}" for kv in key_values.split()]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """configs/demo.py, shrunk (a tiny model, 3 steps, evaluations at steps 2 and 3 on a small scenes build), run
    from the command line in a folder with a relative --workdir, as the README runs it."""
    from clipjax.data import scenes

    root = tmp_path_factory.mktemp("demo")
    ds = scenes.build_scenes(root / "ds", num_train=48, num_test=20, num_heldout=20, image_size=32, workers=0,
                             progress=False)
    cmd = [sys.executable, "-m", "clipjax.main", f"--config={ROOT / 'configs' / 'demo.py'}:steps=3,batch=8",
           "--workdir=runs/demo", f"--config.data.train=dir:{ds}", f"--config.evals.heldout.data=dir:{ds}",
           f"--config.evals.seen.data=dir:{ds}", "--config.eval_every=2", "--config.log_every=2",
           "--config.compilation_cache=off",
           *_oc("embed_dim=16 vision_cfg.width=8 vision_cfg.image_size=32 text_cfg.width=32 text_cfg.heads=2 "
                "text_cfg.layers=1")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, out.stderr


def _log_lines(stderr: str) -> list[str]:
    """The log records' messages (absl's prefix `I1206 02:25:15.813258 140507 train.py:580] ` removed)."""
    return [line.split("] ", 1)[1] for line in stderr.splitlines() if re.match(r"[IWE]\d{4} ", line)]


@pytest.mark.slow
def test_a_run_says_what_it_does_and_ends_with_its_files_and_scores(demo_run):
    root, stderr = demo_run
    lines = _log_lines(stderr)
    init = lines.index("initialising the parameters and optimizer state of demo…")  # the silent part of set-up
    assert lines[init + 1].startswith("parameters: "), lines
    steps = [line for line in lines if line.startswith("step ")]
    assert steps[0].startswith("step 1/3 (33%) (first step, compilation included: ") and "ETA" not in steps[0]
    assert all(" steps/s ETA " in line for line in steps[1:]), steps
    final = lines[-1]
    assert final.startswith("done: step 3 of 3 in runs/demo (checkpoints/, metrics.jsonl, tensorboard/, curves.png)"
                            "; loss="), final
    assert str(root) not in final and "/checkpoints" not in final  # one base: the workdir as given
    rows = [json.loads(line) for line in (root / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()]
    evals = {k: v for k, v in rows[-1].items() if k != "step"}  # the last eval row, restated in the final line
    assert rows[-1]["step"] == 3 and "zeroshot/heldout/top1" in evals
    assert all(f"{k}={v:.4g}" in final for k, v in evals.items()), (final, evals)
    assert f"loss={rows[-2]['loss']:.4g} " in final


def _assert_png(path: pathlib.Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, len(data)
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 300
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # drawn, not blank


@pytest.mark.slow
def test_a_run_draws_its_curves_and_plot_draws_them_again(demo_run):
    root, _ = demo_run
    _assert_png(root / "runs" / "demo" / "curves.png")
    out = subprocess.run([sys.executable, "-m", "clipjax.plot", "runs/demo", "--out", "again.png"], cwd=root,
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "wrote again.png", out.stderr[-2000:]
    _assert_png(root / "again.png")


# ============================================================================================ python -m clipjax.plot

@pytest.fixture
def small_workdir(tmp_path):
    from clipjax.metrics import MetricWriter

    w = MetricWriter(tmp_path / "run")
    for step in (1, 10, 20, 30):
        w.write(step, {"loss": 4.0 / step, "lr": 1e-3 * step / 30, "temperature": 14.0 - step / 30})
        if step % 10 == 0:
            w.write(step, {"zeroshot/scenes/top1": step / 40, "zeroshot/scenes/top5": step / 35})
    w.close()
    return tmp_path / "run"


def _plot(*args: str, cwd: pathlib.Path, prelude: str = "pass") -> subprocess.CompletedProcess:
    code = f"import runpy, sys; {prelude}; sys.argv = ['clipjax.plot', *{list(args)!r}]; " \
           "runpy.run_module('clipjax.plot', run_name='__main__', alter_sys=True)"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=_env(),
                          timeout=300)


def test_plot_writes_a_png_of_a_workdir_s_metrics(small_workdir):
    out = _plot(str(small_workdir), cwd=small_workdir.parent)
    assert out.returncode == 0 and out.stdout.strip() == f"wrote {small_workdir / 'curves.png'}", out.stderr
    _assert_png(small_workdir / "curves.png")


def test_plot_without_matplotlib_or_metrics_is_one_error_line(small_workdir, tmp_path):
    no_mpl = _plot(str(small_workdir), cwd=tmp_path, prelude="sys.modules['matplotlib'] = None")
    assert no_mpl.returncode == 2 and no_mpl.stderr.strip().splitlines() == [
        "error: matplotlib is not installed: pip install matplotlib (or pip install 'clipjax[plot]')"], no_mpl.stderr
    assert not (small_workdir / "curves.png").exists()
    empty = _plot(str(tmp_path / "nothing"), cwd=tmp_path)
    assert empty.returncode == 2 and empty.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing' / 'metrics.jsonl'}: no such file (WORKDIR is a training workdir, which holds "
        f"metrics.jsonl)"], empty.stderr
    jpeg = _plot(str(small_workdir), "--out", "x.jpg", cwd=tmp_path)
    assert jpeg.returncode == 2 and jpeg.stderr.strip() == "error: --out x.jpg: give a file name ending in .png"


def test_curves_at_the_end_of_a_run_never_fail_it(small_workdir, monkeypatch, caplog):
    from clipjax.workdir import write_curves

    assert write_curves(small_workdir) is True
    _assert_png(small_workdir / "curves.png")
    (small_workdir / "curves.png").unlink()
    (small_workdir / "metrics.jsonl").write_text("")  # nothing to draw: a warning, not a failed run
    assert write_curves(small_workdir) is False and not (small_workdir / "curves.png").exists()
    assert "curves.png not written: ValueError: " in caplog.text and "no rows yet" in caplog.text
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: no curves, no warning
    caplog.clear()
    assert write_curves(small_workdir) is False and not caplog.text


# ============================================================================================ signals

@pytest.mark.slow
def test_a_repeated_sigterm_is_logged_once(tmp_path):
    """Two SIGTERMs during training (two senders, a retrying scheduler): one log line, one checkpoint, status 0."""
    cmd = [sys.executable, "-m", "clipjax.main", f"--config={ROOT / 'configs' / 'vit_b32.py'}:runlocal",
           "--workdir=run", "--config.model.name=ViT-T-demo", "--config.total_steps=100000",
           "--config.compilation_cache=off"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env())
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if re.search(r"\] step 3/", line):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=300)
    stderr = "".join(lines) + (rest or "")
    assert proc.returncode == 0, stderr[-3000:]
    assert stderr.count("SIGTERM received") == 1, stderr[-3000:]
    messages = _log_lines(stderr)
    assert "initialising the parameters and optimizer state of ViT-T-demo…" in messages
    assert re.fullmatch(r"done: step \d+ of 100000 in run \(checkpoints/, metrics\.jsonl, tensorboard/, "
                        r"curves\.png\); loss=\S+", messages[-1]), messages[-3:]


# ============================================================================================ git

def test_the_readme_s_example_outputs_are_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["data/mine/shard-00000", "data/laion/x", "exported/model.safetensors", "exported_hf/config.json",
             "runs/demo/metrics.jsonl"]
    out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(out.stdout.split()) == sorted(paths), out.stdout + out.stderr
    kept = subprocess.run(["git", "check-ignore", "--no-index", "clipjax/data/new_module.py"], cwd=ROOT,
                          capture_output=True, text=True)
    assert kept.returncode == 1, kept.stdout  # the package folder clipjax/data is not caught by data/
