"""Every command line behaves alike on bad input (as `python -m clipjax.main`): one line `error: ...` on stderr,
exit status 2, no traceback; `--help` exits 0. Run as real subprocesses; plus `clipjax.cli` itself."""

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
    "clipjax.wise_ft": ["--zeroshot", MISSING, "--finetuned", MISSING],
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
