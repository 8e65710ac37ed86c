"""Every command line behaves alike on bad input (as `python -m clipjax.main`): one line `error: ...` on stderr,
exit status 2, no traceback; `--help` exits 0. Run as real subprocesses; plus `clipjax.cli` itself."""

import os
import pathlib
import subprocess
import sys

import pytest

from clipjax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/clipjax-test-input"
COMMANDS = {  # module -> arguments naming an input that does not exist
    "clipjax.evaluate": ["--model", MISSING, "--task", "zeroshot", "--data", "scenes"],
    "clipjax.export": ["--model", MISSING, "--format", "open_clip", "--out", "/nonexistent/out"],
    "clipjax.wise_ft": ["--zeroshot", MISSING, "--finetuned", MISSING, "--eval-data", "scenes"],
    "clipjax.data.ingest": [MISSING, "--output", "/nonexistent/out"],
}


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def _assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in proc.stderr, err
    for needle in needles:
        assert needle in err[0], err[0]


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_cli_help_usage_and_input_errors(module):
    helped = _run(module, "--help")
    assert helped.returncode == 0 and "usage: python -m " + module in helped.stdout, helped.stderr[-2000:]
    _assert_user_error(_run(module), "the following arguments are required", f"{module} --help")
    _assert_user_error(_run(module, *COMMANDS[module]), MISSING)


def test_run_main_turns_user_errors_into_one_line_and_status_2(capsys, monkeypatch):
    def bad_input(argv):
        raise ValueError(f"{argv[0]}: line 3\nis bad")

    assert cli.run_main(bad_input, ["data.csv"]) == cli.USER_ERROR_STATUS == 2
    assert capsys.readouterr().err == "error: data.csv: line 3 is bad\n"
    assert cli.run_main(lambda argv: None, []) == 0 and cli.run_main(lambda argv: 3, []) == 3
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.run_main(lambda argv: {}["missing"], [])
    with pytest.raises(ValueError):  # only the given types are user errors
        cli.run_main(bad_input, ["x"], user_errors=(OSError,))
    monkeypatch.setenv("CLIPJAX_DEBUG", "1")
    with pytest.raises(ValueError):  # CLIPJAX_DEBUG=1: the traceback of a user error too
        cli.run_main(bad_input, ["x"])
    with pytest.raises(SystemExit) as failed:
        cli.fail("no   such\tthing")
    assert failed.value.code == 2 and capsys.readouterr().err == "error: no such thing\n"


_ECHO_CHECK = """
import datetime, logging, sys, warnings
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
from clipjax import cli
cli.quiet_storage_clients()
import gcsfs  # logs at import that its experimental features are on
from google.api_core import _python_version_support
_python_version_support.check_python_version("google.api_core", today=datetime.date(2040, 1, 1))  # unsupported
gcs = logging.getLogger("gcsfs")
gcs.warning("Could not determine bucket type for bucket name b: Your default credentials were not found, falling "
            "back to GCSFileSystem")
try:
    raise OSError("Cannot connect to host storage.googleapis.com:443")
except OSError as e:
    gcs.exception(f"_request out of retries on exception: {e}")
logging.getLogger("google.auth._default").warning(
    "Authentication failed using Compute Engine authentication due to unavailable metadata server.")
gcs.warning("another gcsfs message")
warnings.warn("another future warning", FutureWarning)
cli.fail("gs://b/run: cannot be reached")
"""


def test_storage_client_echoes_before_a_gs_error_are_dropped_and_nothing_else():
    """gcsfs's and google-auth's records on the way to a failed gs:// access, and google-api-core's Python-version
    warning at import, do not precede the one `error:` line; their other records and warnings still show."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("google.api_core")
    proc = subprocess.run([sys.executable, "-c", _ECHO_CHECK], capture_output=True, text=True, timeout=120, cwd=ROOT)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and err[-1] == "error: gs://b/run: cannot be reached", proc.stderr
    assert err == ["WARNING gcsfs another gcsfs message", "<string>:19: FutureWarning: another future warning",
                   "error: gs://b/run: cannot be reached"], proc.stderr
    debug = subprocess.run([sys.executable, "-c", _ECHO_CHECK], capture_output=True, text=True, timeout=120,
                           cwd=ROOT, env={**os.environ, "CLIPJAX_DEBUG": "1"})
    assert "out of retries" in debug.stderr and "Python version" in debug.stderr  # CLIPJAX_DEBUG=1 keeps them


def test_a_gs_workdir_or_wds_spec_that_fails_ends_in_one_error_line_without_client_echoes(tmp_path):
    """The trainer against gs:// with no credentials and no GCE metadata server (an emulator on 127.0.0.1 in place
    of storage.googleapis.com, gcsfs's experimental bucket probe on, as by default): the lines before `error:` are
    the trainer's own INFO lines, none from the storage clients, nor a skipped shard per shard of a wds: spec."""
    from gcs_emulator import needs_emulator, running_emulator

    if needs_emulator.args[0]:
        pytest.skip(needs_emulator.kwargs["reason"])
    with running_emulator() as emu:
        env = {**os.environ, **emu.env}
        env.pop("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
        shards = "the first 2 shards this host read cannot be opened; check the path, the bucket and the credentials"
        runs = {"no such object or bucket": ["--workdir=gs://nonexistent-bucket-xyz/run"],
                shards: [f"--workdir={tmp_path / 'run'}", "--config.total_steps=2", "--config.warmup_steps=0",
                         "--config.data.train=wds:gs://clipjax-test/missing/{0..1}.tar"]}
        for needle, args in runs.items():
            proc = subprocess.run([sys.executable, "-m", "clipjax.main", "--config=configs/demo.py", *args],
                                  capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
            err = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and err[-1].startswith("error: ") and needle in err[-1], proc.stderr[-3000:]
            others = [line for line in err[:-1] if not line.startswith("I")]  # absl's INFO lines: the run's log
            assert not others, others
            assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("module", ["clipjax.evaluate", "clipjax.wise_ft"])
@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "0"], "argument --batch-size: 0 is less than 1"),
    (["--batch-size", "x"], "argument --batch-size: 'x' is not an integer"),
    (["--max-examples", "-3"], "argument --max-examples: -3 is less than 0"),
])
def test_bad_counts_are_usage_errors_naming_the_flag(module, args, needle, capsys):
    import importlib

    main = importlib.import_module(module if module.endswith("wise_ft") else module + ".__main__").main
    with pytest.raises(SystemExit) as stopped:
        main([*COMMANDS[module], *args])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("error: ") and needle in err, err


def test_evaluate_refuses_an_out_it_cannot_write_before_it_evaluates(tmp_path, capsys):
    """A bad --out is reported before the model is even read (the model here does not exist)."""
    from clipjax.evaluate.__main__ import main

    (tmp_path / "afile").write_text("")
    cases = [(tmp_path / "afile" / "sub" / "r.json", f"{tmp_path / 'afile'} is a file, not a folder"),
             (tmp_path, "is a directory; give the path of the JSON file"),
             ("/proc/clipjax-r.json", "--out /proc/clipjax-r.json: cannot write a file in /proc")]
    for out, needle in cases:
        assert main([*COMMANDS["clipjax.evaluate"], "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert needle in err and MISSING not in err, err
    assert main([*COMMANDS["clipjax.evaluate"], "--out", str(tmp_path / "new" / "r.json")]) == 2
    assert MISSING in capsys.readouterr().err  # a good --out: the missing model is what fails
    assert list((tmp_path / "new").iterdir()) == []  # the write check left nothing behind


@pytest.mark.parametrize("params, needle", [("{bad", "--params: not valid JSON"),
                                            ('{"nosuch": 1}', "a JSON object with keys among"),
                                            ("[1]", "a JSON object with keys among")])
def test_scenes_builder_refuses_bad_params_in_one_line(params, needle, tmp_path):
    """`python -m clipjax.data.scenes` (the builder behind the embedded dataset): bad --params are one line."""
    _assert_user_error(_run("clipjax.data.scenes", str(tmp_path / "scenes"), "--params", params), needle)
    assert not (tmp_path / "scenes").exists()


def test_wise_ft_refuses_nothing_to_do_a_non_finite_alpha_and_a_workdir_as_out(tmp_path, capsys):
    """Before anything is read: no --out nor --eval-data (it did nothing, silently), --alpha nan; and a training
    workdir as --out (clipjax.load reads a workdir's checkpoint, so the model written there was never the one used)."""
    from clipjax import wise_ft

    ends = ["--zeroshot", MISSING, "--finetuned", MISSING]
    assert wise_ft.main(ends) == 2
    assert "nothing to do: give --out" in capsys.readouterr().err
    assert wise_ft.main([*ends, "--out", str(tmp_path / "new"), "--alpha", "nan"]) == 2
    assert "--alpha must be a finite number, got nan" in capsys.readouterr().err
    assert wise_ft.main([*ends, "--eval-data", "scenes", "--alphas", "0,inf"]) == 2
    assert "--alphas must be comma-separated finite numbers, got '0,inf'" in capsys.readouterr().err
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    assert wise_ft.main([*ends, "--out", str(workdir)]) == 2
    assert f"{workdir} is a clipjax training workdir" in capsys.readouterr().err
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints"]
