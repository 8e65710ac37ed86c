"""Command line: `python -m clipjax.main --config=configs/vit_b32.py[:arg] --workdir=DIR [--config.key=value ...]`.

Trains with the given ml-collections config, writes `DIR/metrics.jsonl`, TensorBoard events and `DIR/config.json`,
checkpoints into `DIR/checkpoints`, and resumes from there by itself. Multi-process runs (one process per host)
call `jax.distributed.initialize()` — automatically on TPU pods / SLURM, or via --coordinator/--num_processes/
--process_id for a manual launch.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path of an ml-collections config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0, for a manual multi-process launch.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes of a manual multi-process launch.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index in a manual multi-process launch.")
_LOCAL_DEVICES = flags.DEFINE_integer("local_device_count", None,
                                      "Simulate this many CPU devices in this process (testing scaling on a CPU).")


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
        raise SystemExit(f"error: config file {file!r} not found")
    spec = importlib.util.spec_from_file_location("_clipjax_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
    keys = set(_config_keys(cfg))
    for a in argv_all:
        if a.startswith("--config.") and "=" in a:
            key = a[len("--config."):].split("=", 1)[0]
            if key not in keys:
                close = difflib.get_close_matches(key, sorted(keys), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise SystemExit(f"error: unknown config key {key!r} in {file}{hint}")


def main(argv: list[str]) -> None:
    del argv
    if _LOCAL_DEVICES.value:
        flags_env = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags_env} --xla_force_host_platform_device_count={_LOCAL_DEVICES.value}"
    import jax

    if _COORD.value:
        jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    elif any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS")):
        jax.distributed.initialize()
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    from clipjax.cpu import apply_cpu_defaults
    from clipjax.train import train

    apply_cpu_defaults()
    logging.getLogger("absl").setLevel(logging.WARNING)
    train(_CONFIG.value, _WORKDIR.value)


def run() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    _check_overrides(sys.argv[1:])
    app.run(main)


if __name__ == "__main__":
    run()
