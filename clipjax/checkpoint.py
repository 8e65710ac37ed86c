"""Checkpoints with orbax: async saves, keep-N, atomic writes, automatic resume, restore onto any mesh.

A checkpoint step holds two items: `state` (the train state pytree: params, optimizer state, step, rng, ...) and
`data` (the JSON state of the input iterator, so a resumed run sees exactly the batches it would have seen).
Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save never leaves a
half-written step behind; a step that is damaged anyway (truncated or deleted files) is skipped with a warning and
the previous one is used.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"checkpoint directory {self.directory} is not writable: {e.strerror}") from None
        if not os.access(self.directory, os.W_OK):
            raise OSError(f"checkpoint directory {self.directory} is not writable")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
        return self.manager.save(step, args=args, force=force)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, abstract_state: Any | None = None, step: int | None = None) -> tuple[int, Any, dict] | None:
        """Restore the newest readable step (or `step`) onto the shardings of `abstract_state`.

        Returns (step, state, data_state) or None when there is no checkpoint. A damaged newest step is reported and
        the one before it is tried.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        for s in candidates:
            state_args = ocp.args.StandardRestore(abstract_state) if abstract_state is not None \
                else ocp.args.StandardRestore()
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(state=state_args, data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 — any read failure means this step is unusable
                if step is not None:
                    raise
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                            s, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
                continue
            return s, out["state"], dict(out["data"] or {})
        if candidates:
            raise RuntimeError(f"no readable checkpoint in {self.directory} (steps {candidates} all failed)")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_workdir(workdir: str | os.PathLike):
    """A `Pretrained` from a clipjax training workdir: its config.json and its newest checkpoint's weights."""
    from clipjax.interop.load import Pretrained
    from clipjax.models.config import CLIPConfig
    from clipjax.models.layers import unstack_layers

    workdir = pathlib.Path(workdir)
    with open(workdir / "config.json") as f:
        config = json.load(f)
    if "model_config" not in config:
        raise ValueError(f"{workdir}/config.json has no 'model_config': not a clipjax training workdir")
    cfg = CLIPConfig.from_dict(config["model_config"])
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    restored = ckpt.restore()
    ckpt.close()
    if restored is None:
        raise ValueError(f"{workdir}: no checkpoint in {workdir / 'checkpoints'}")
    step, state, _ = restored
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    variables = jax.tree.map(lambda x: jax.numpy.asarray(x), variables)
    if cfg.scan_layers:
        variables = unstack_layers(variables)
    return Pretrained(cfg.replace(scan_layers=False, remat="none"), variables, f"{workdir}@{step}")
