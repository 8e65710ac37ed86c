"""A training workdir's files besides its checkpoints (`clipjax.checkpoint`) and its lock (`clipjax.workdir_lock`):

    config.json            the config as it runs and the resolved model config (`write_config`)
    config_history.jsonl   one row per resume that changed settings (`HISTORY_FILE`)
    metrics.jsonl          the logged rows (`clipjax.metrics.MetricWriter`; `write_metrics`, `truncate_metrics`)
    curves.png             the curves of metrics.jsonl at the end of a run (`write_curves`)

and the checks a resume passes before anything is written: the same architecture (`check_same_model`) and the same
settings that make the steps' numbers (`check_same_trajectory`, by the rules of `clipjax.config_checks`)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import ml_collections

from clipjax import paths
from clipjax.checkpoint import CheckpointError, Checkpointer, check_supported
from clipjax.config_checks import (RESUME_FREE_KEYS, ConfigError, allowed_changes, as_json, flat_dict, matches,
                                   resume_changes)
from clipjax.metrics import MetricWriter, keep_damaged_copy
from clipjax.models.config import CLIPConfig
from clipjax.plot import CURVES

log = logging.getLogger(__name__)
HISTORY_FILE = "config_history.jsonl"  # one row per resume that changed settings: {"step", "time", "changes", ...}


def check_workdir(workdir: paths.Path) -> None:
    """A workdir that can hold checkpoints: not a file; on an object store, one that orbax writes to (gs://) and that
    answers (credentials, network). Failures are a CheckpointError naming the workdir."""
    check_supported(workdir)
    try:
        with paths.storage_errors(workdir):
            if workdir.exists() and not workdir.is_dir():
                raise CheckpointError(f"workdir {workdir} is a file, not a directory")
    except paths.StorageError as e:
        raise CheckpointError(f"workdir {workdir}: {paths.describe(e.__cause__ or e, workdir)}") from None


def write_config(workdir: paths.Path, config: ml_collections.ConfigDict, cfg: CLIPConfig,
                  step: int | None = None) -> None:
    """config.json: the config as it runs and the resolved model config (written atomically: on an object store, as
    one object). When it replaces a config.json of other settings (a resume at `step` with changes that
    `check_same_model` let through), the changes are first appended to config_history.jsonl, so the settings of
    every step stay on record."""
    text = json.dumps({"config": as_json(config), "model_config": cfg.to_dict()}, indent=2)
    try:
        saved = _saved_config(workdir)
        changes = resume_changes(saved, config) if saved is not None else {}
        if changes:
            history = workdir / HISTORY_FILE
            rows = paths.read_text(history) if paths.exists(history) else ""
            row = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()},
                   "allowed": allowed_changes(config)}
            paths.write_text(history, rows + json.dumps(row) + "\n")
        paths.write_text(workdir / "config.json", text + "\n")
    except OSError as e:
        raise CheckpointError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def _saved_config(workdir: paths.Path) -> dict | None:
    """The "config" of the workdir's config.json, or None when there is none (or it cannot be read)."""
    try:
        saved = json.loads(paths.read_text(workdir / "config.json"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return saved if isinstance(saved, dict) else None


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 200 else text[:197] + "..."


def check_same_trajectory(workdir: paths.Path, config: ml_collections.ConfigDict) -> None:
    """A workdir with checkpoints resumes only with the settings that made its steps' numbers (config.json), but for
    the `RESUME_FREE_KEYS` and the keys named in config.allow_resume_changes (recorded by `write_config`)."""
    saved = _saved_config(workdir)
    if saved is None:
        log.warning("%s has checkpoints but no readable config.json: the settings of its steps cannot be compared "
                    "with these", workdir)
        return
    changes = resume_changes(saved, config)
    allowed = allowed_changes(config)
    refused = {k: v for k, v in changes.items() if not matches(k, RESUME_FREE_KEYS) and not matches(k, allowed)}
    if refused:
        listed = "; ".join(f"{k} {_shown(a)} → {_shown(b)}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"workdir {workdir} holds checkpoints trained with other settings that change the training numbers: "
            f"{listed}. Resume with the settings of {workdir / 'config.json'}, or with "
            f"--config.allow_resume_changes={','.join(sorted(set(refused) | set(allowed)))} to train on with the "
            f"change on record ({HISTORY_FILE}), or start a new workdir with --config.init_from={workdir}")
    if "total_steps" in changes:
        log.warning("config.total_steps %s → %s on resume: the learning rate follows the cosine decay to step %s "
                    "from here on (recorded in %s)", *changes["total_steps"], changes["total_steps"][1], HISTORY_FILE)
    if changes:
        log.info("resuming with changed settings (recorded in %s): %s", HISTORY_FILE,
                 "; ".join(f"{k} {_shown(a)} → {_shown(b)}" for k, (a, b) in changes.items()))


def check_same_model(workdir: paths.Path, cfg: CLIPConfig, config: ml_collections.ConfigDict | None = None) -> None:
    """A workdir with checkpoints resumes only the architecture it was trained with (its config.json says which),
    and, given the training `config`, only its settings that change the numbers (`check_same_trajectory`)."""
    try:
        saved = json.loads(paths.read_text(workdir / "config.json"))["model_config"]
    except (OSError, ValueError, KeyError, TypeError):
        saved = None  # no readable record: the checkpoint restore checks the shapes
    numerics = ("dtype", "remat", "scan_layers")  # may change between runs: the parameters stay the same
    ours = {k: v for k, v in flat_dict(json.loads(json.dumps(cfg.to_dict()))).items() if k not in numerics}
    theirs = {k: v for k, v in flat_dict(saved).items() if k not in numerics} if isinstance(saved, dict) else ours
    diff = [f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k)]
    if diff:
        raise ConfigError(f"workdir {workdir} holds checkpoints of another model ({'; '.join(diff[:3])}): use a new "
                          f"--workdir, or the config it was trained with")
    if config is not None:
        check_same_trajectory(workdir, config)


def keep_damaged_config(workdir: paths.Path) -> None:
    """A config.json that cannot be read (cut short, garbled) is kept as `config.json.damaged-<time>`, with a warning,
    before this run's config replaces it."""
    path = workdir / "config.json"
    try:
        data = paths.read_bytes(path)
    except OSError:  # none yet (or a store that fails: writing it reports that)
        return
    try:
        record = json.loads(data)
        readable = isinstance(record, dict) and all(isinstance(record.get(k), dict) for k in ("config", "model_config"))
    except ValueError:
        readable = False
    if not readable:
        copy = keep_damaged_copy(path, data)
        log.warning("%s cannot be read (cut short or garbled): kept as %s; written again with this run's config",
                    path, copy.name)


def truncate_metrics(writer: MetricWriter, step: int) -> None:
    """`writer.truncate_after(step)`; an object store that cannot be read or written is a CheckpointError."""
    try:
        writer.truncate_after(step)
    except paths.StorageError as e:
        raise CheckpointError(f"workdir {writer.path.parent}: {e}") from None


def write_metrics(writer: MetricWriter, step: int, values: dict[str, float]) -> None:
    try:
        writer.write(step, values)
    except OSError as e:  # metrics are a log, not state: a full disk must not end the run (checkpoints decide that)
        log.warning("could not append step %d to %s: %s", step, writer.path, e.strerror or e)


def close_all(ckpt: Checkpointer | None, writer: MetricWriter | None, data: Any, failing: bool) -> None:
    """Wait for pending checkpoint writes and close; while another error propagates, only log close failures."""
    for obj in (ckpt, writer, data):
        if obj is None or not hasattr(obj, "close"):
            continue
        try:
            obj.close()
        except Exception as e:  # noqa: BLE001
            if not failing:
                raise
            log.error("while stopping: %s", e)


def write_curves(workdir_p: paths.Path) -> bool:
    """WORKDIR/curves.png from metrics.jsonl (`python -m clipjax.plot`) when matplotlib is installed; whether it was
    written. A failure is a warning: the curves are a view of the log, not state."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    from clipjax import plot

    try:
        plot.plot_workdir(workdir_p)
    except Exception as e:  # noqa: BLE001
        log.warning("%s not written: %s: %s", workdir_p / CURVES, type(e).__name__, " ".join(str(e).split())[:300])
        return False
    return True
