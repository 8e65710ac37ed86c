"""The persistent compilation cache: on by default in the CLI, in the user's cache directory, with a switch; a second
run of the same program compiles nothing new."""

import os
import pathlib
import subprocess
import sys

import jax
import pytest

from clipjax import compile_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEYS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture
def restore_jax_config():
    saved = {k: getattr(jax.config, k) for k in KEYS}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == str(tmp_path / "xdg" / "clipjax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == str(tmp_path / "home" / ".cache" / "clipjax" / "xla")
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.default_dir() == str(tmp_path / "mine")
    for off in ("", "off", "OFF", "none"):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.default_dir() is None


def test_enable_sets_and_switches_off_jax_cache(monkeypatch, tmp_path, restore_jax_config):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.enable("") == str(tmp_path / "env")
    assert jax.config.jax_enable_compilation_cache
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
    assert compile_cache.enable(str(tmp_path / "given")) == str(tmp_path / "given")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "given")
    assert compile_cache.enable("off") is None
    assert not jax.config.jax_enable_compilation_cache
    # a directory that cannot be made: no cache (one warning), not a warning at every compile
    (tmp_path / "file").write_text("")
    compile_cache.enable(str(tmp_path / "given"))
    assert compile_cache.enable(str(tmp_path / "file" / "xla")) is None
    assert not jax.config.jax_enable_compilation_cache


def _main(workdir, cache, steps):
    """The CLI on a tiny model with its cache in `cache` (the user's own cache directory is not touched)."""
    cmd = [sys.executable, "-m", "clipjax.main", f"--config={ROOT / 'configs' / 'vit_b32.py'}:runlocal",
           f"--workdir={workdir}", "--config.model.name=ViT-T-demo", "--config.batch_size=8",
           f"--config.total_steps={steps}", "--config.warmup_steps=0", "--config.log_every=1",
           "--config.async_checkpoints=False", f"--config.compilation_cache={cache}"]
    env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def _entries(cache: pathlib.Path) -> set[str]:
    return {p.name for p in cache.iterdir() if "-cache" in p.name} if cache.is_dir() else set()


def test_the_cli_reuses_its_compiled_step(tmp_path):
    cache = tmp_path / "xla"
    first = _main(tmp_path / "a", cache, 1)
    assert first.returncode == 0, first.stderr[-2000:]
    stored = _entries(cache)
    assert stored, f"no cache entries in {cache}: {sorted(p.name for p in cache.rglob('*'))}"
    # the same program in a new workdir (a re-run, a resume): every executable comes from the cache
    again = _main(tmp_path / "b", cache, 1)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _entries(cache) == stored
