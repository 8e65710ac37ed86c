"""Command line: `python -m clipjax.main --config=configs/vit_b32.py[:arg] --workdir=DIR [--config.key=value ...]`.

Trains with the given ml-collections config, writes `DIR/metrics.jsonl`, TensorBoard events and `DIR/config.json`,
checkpoints into `DIR/checkpoints`, and resumes from there by itself. Multi-process runs (one process per host)
call `jax.distributed.initialize()` — automatically on TPU pods / SLURM, or via --coordinator/--num_processes/
--process_id for a manual launch.

Errors in the input (config, data, weights, checkpoint directory) and a run stopped by non-finite updates print one
line `error: ...` and exit with status 2; anything else is a bug and shows its traceback (as do input errors with
CLIPJAX_DEBUG=1). SIGTERM/SIGINT checkpoint the current step and exit 0.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from clipjax.cli import fail as _fail  # one error style for every entry point
from clipjax.cli import quiet_storage_clients

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path of an ml-collections config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0, for a manual multi-process launch.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes of a manual multi-process launch.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index in a manual multi-process launch.")
_LOCAL_DEVICES = flags.DEFINE_integer("local_device_count", None,
                                      "Simulate this many CPU devices in this process (testing scaling on a CPU).")
_COMPILED = flags.DEFINE_string("compiled", None, "Run the train step compiled ahead of time by `python -m clipjax.aot "
                                "--save_executable=PATH` instead of compiling it (checked against this run first).")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that describe bad input or a refused run, not a bug (imported late: they pull in JAX)."""
    from clipjax.checkpoint import CheckpointError
    from clipjax.data.core import TooManyBadRecords
    from clipjax.data.sources import DatasetError
    from clipjax.evaluate.features import NonFiniteFeaturesError
    from clipjax.interop.load import WeightsError
    from clipjax.interop.torch_pickle import UnsafeCheckpointError
    from clipjax.run_control import NonFiniteError
    from clipjax.train import ConfigError

    return (ConfigError, CheckpointError, DatasetError, UnsafeCheckpointError, NonFiniteError, WeightsError,
            NonFiniteFeaturesError, TooManyBadRecords)


class _NoStorageTracebacks(logging.Filter):
    """Orbax's writer threads log a full traceback for a failed write (disk full, read-only), and asyncio reports its
    abandoned write tasks at exit; clipjax reports the failure itself in one line, so keep only orbax's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":
            return "orbax" not in record.getMessage() and not _raised_in_orbax(record.exc_info)
        if record.exc_info and "orbax" in record.pathname:
            record.exc_info, record.exc_text = None, None
        return True


def _raised_in_orbax(exc_info) -> bool:
    """Whether a logged exception was raised inside orbax (e.g. a future of an abandoned write, reported at exit)."""
    tb = exc_info[2] if exc_info and len(exc_info) == 3 else None
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _quiet_storage_tracebacks() -> None:
    """After a failed checkpoint read or write, orbax's threads log tracebacks and its abandoned coroutines report
    themselves; the failure itself is reported by clipjax (one line), so these are reduced to orbax's message."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_NoStorageTracebacks())
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        if code is None or "orbax" not in code.co_filename:
            previous(unraisable)

    sys.unraisablehook = hook


def _config_keys(cfg, prefix=""):
    out = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        out.append(key)
        if hasattr(v, "items"):
            out += _config_keys(v, key + ".")
    return out


def _check_overrides(argv_all: list[str]) -> None:
    """Fail on an unknown --config.x.y override with close matches (before absl's less helpful message)."""
    import importlib.util

    path = next((a.split("=", 1)[1] for a in argv_all if a.startswith("--config=")), None)
    if path is None:
        return
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        _fail(f"config file {file!r} not found")
    spec = importlib.util.spec_from_file_location("_clipjax_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except ValueError as e:  # e.g. an unknown `file.py:arg`
        _fail(f"{file}: {e}")
    keys = set(_config_keys(cfg))
    for a in argv_all:
        if a.startswith("--config.") and "=" in a:
            key = a[len("--config."):].split("=", 1)[0]
            if key not in keys:
                close = difflib.get_close_matches(key, sorted(keys), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                _fail(f"unknown config key {key!r} in {file}{hint}")


def _check_repeated_flags(argv_all: list[str]) -> None:
    """Fail on a flag given more than once: absl keeps the last, so an unquoted shell pattern in a value
    (`--config=...:data=wds:/d/{00000..41455}.tar` becomes 41 456 `--config` arguments) would run on one match."""
    given: dict[str, list[str]] = {}
    for a in argv_all:
        if a == "--":
            break
        if a.startswith("-") and a.lstrip("-") and not a.lstrip("-")[0].isdigit():
            given.setdefault(a.lstrip("-").split("=", 1)[0], []).append(a)
    for name, args in given.items():
        if len(args) > 1:
            shown = ", ".join(repr(a if len(a) <= 80 else a[:77] + "...") for a in args[:2])
            _fail(f"--{name} is given {len(args)} times ({shown}{', ...' if len(args) > 2 else ''}): give each flag "
                  f"once; a {{a..b}} or * pattern in a value must be quoted, or the shell expands it into one "
                  f"argument per match and only the last would be used (e.g. "
                  f"'--config=configs/vit_b32.py:data=wds:/data/{{00000..41455}}.tar')")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a value it cannot parse (e.g. `--config.batch_size=abc`) as one error line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e} (see --helpfull)")


def _check_launch_flags() -> None:
    """The multi-process and device-count flags make sense together (checked before JAX starts)."""
    if _LOCAL_DEVICES.value is not None and _LOCAL_DEVICES.value < 1:
        _fail(f"--local_device_count={_LOCAL_DEVICES.value}: must be a positive integer")
    if not _COORD.value and (_NPROC.value is not None or _PID.value is not None):
        _fail("--num_processes and --process_id need --coordinator=host:port (the address of process 0)")
    if _NPROC.value is not None and _NPROC.value < 1:
        _fail(f"--num_processes={_NPROC.value}: must be a positive integer")
    if _PID.value is not None and _NPROC.value is not None and not 0 <= _PID.value < _NPROC.value:
        _fail(f"--process_id={_PID.value}: must be in [0, {_NPROC.value}) for --num_processes={_NPROC.value}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:  # e.g. `--config.data.train wds:/d/{0..9}.tar` unquoted: the shell's other matches
        _fail(f"unexpected argument(s) {' '.join(argv[1:4])}{' ...' if len(argv) > 4 else ''}: flags are "
              f"--name=value; quote a value holding a {{a..b}} or * pattern so that it stays one argument")
    _check_launch_flags()
    if _LOCAL_DEVICES.value:
        flags_env = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags_env} --xla_force_host_platform_device_count={_LOCAL_DEVICES.value}"
    import jax

    if _COORD.value:
        try:
            jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
        except ValueError as e:  # e.g. no --process_id and none the cluster environment tells
            _fail(f"--coordinator={_COORD.value}: {e} (pass --num_processes and --process_id)")
    elif any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS")):
        jax.distributed.initialize()
    if _CONFIG.value is None:
        _fail("--config is required (e.g. --config=configs/demo.py)")
    if _WORKDIR.value is None:
        _fail("--workdir is required (the directory for checkpoints and metrics; re-using it resumes)")
    from clipjax import compile_cache
    from clipjax.train import train

    compile_cache.enable(_CONFIG.value.get("compilation_cache", ""))
    logging.getLogger("absl").setLevel(logging.WARNING)
    if not os.environ.get("CLIPJAX_DEBUG"):
        _quiet_storage_tracebacks()
    try:
        train(_CONFIG.value, _WORKDIR.value, compiled=_COMPILED.value)
    except _user_errors() as e:
        if os.environ.get("CLIPJAX_DEBUG"):
            raise
        _fail(str(e))


_HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "-?")


def run() -> None:
    """The console entry point (also `python -m clipjax.finetune`): help exits 0, user errors 2 with one line."""
    from clipjax.cpu import use_huge_pages

    use_huge_pages()  # first: it re-executes the process (XLA:CPU's per-step temporaries; see clipjax/cpu.py)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    quiet_storage_clients()  # before anything imports gcsfs or google-api-core
    if any(a in _HELP_FLAGS for a in sys.argv[1:]):
        try:
            app.run(main)
        except SystemExit as e:  # absl ends --help with status 1
            sys.exit(0 if e.code == 1 else e.code)
    _check_repeated_flags(sys.argv[1:])
    _check_overrides(sys.argv[1:])
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
