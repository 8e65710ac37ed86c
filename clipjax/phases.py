"""Training phases (`config.schedule`): spans of steps that train on fewer tokens — a lower image size, a shorter text
context, FLIP's patch dropout — before a final phase at full size (CLIPA, FLIP).

    c.schedule = [dict(steps=400, image_size=32, context_length=8, patch_dropout=0.5)]   # then full size to the end

Each phase is `{steps, image_size, context_length, patch_dropout}`; a missing (or 0 / None) value takes the model's
own (`model.image_size` via the architecture, `model.patch_dropout`). Phases run in order from step 0; the steps
after the last phase run at the model's own values. Parameters keep their full-size shapes in every phase: the
towers interpolate their position embeddings on the fly (`clipjax.models`), so checkpoints and optimizer state never
change shape, and a run resumes exactly at any step, also across a phase boundary: the host decodes at the phase's
size and the input position carries over from one phase's iterator to the next.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)
PHASE_KEYS = ("steps", "image_size", "context_length", "patch_dropout")


@dataclasses.dataclass(frozen=True)
class Phase:
    start: int  # first step (0-based count of steps done before it)
    end: int  # one past its last
    image_size: int
    context_length: int
    patch_dropout: float

    def describe(self) -> str:
        return (f"steps {self.start + 1}–{self.end}: images {self.image_size} px, text {self.context_length} tokens, "
                f"patch dropout {self.patch_dropout:g}")


def make_phases(schedule: Sequence[Any], total_steps: int, image_size: int, context_length: int,
                patch_dropout: float, patch_size: int | None) -> list[Phase]:
    """The phases covering steps [0, total_steps); raises ValueError naming the bad phase."""
    phases, start = [], 0
    if schedule and (isinstance(schedule, (str, bytes, Mapping)) or not isinstance(schedule, Sequence)):
        raise ValueError(f"config.schedule={schedule!r}: must be a list of phases, e.g. "
                         f"[dict(steps=400, image_size=32)] (keys {', '.join(PHASE_KEYS)})")
    if patch_dropout and not patch_size:
        raise ValueError(f"config.model.patch_dropout={patch_dropout:g}: patch dropout needs a ViT image tower")
    for i, raw in enumerate(schedule or ()):
        where = f"config.schedule[{i}]"
        if not isinstance(raw, Mapping) and not hasattr(raw, "keys"):  # a dict (or a ConfigDict)
            raise ValueError(f"{where}={raw!r}: must be a dict with keys among {', '.join(PHASE_KEYS)}")
        p = dict(raw)
        unknown = sorted(set(p) - set(PHASE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {list(PHASE_KEYS)}")
        steps = p.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{where}.steps={steps!r}: must be a positive integer")
        for key in ("image_size", "context_length"):
            value = p.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{where}.{key}={value!r}: must be a positive integer (0 or None: the model's own)")
        value = p.get("patch_dropout")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}.patch_dropout={value!r}: must be a number in [0, 1)")
        size = int(p.get("image_size") or image_size)
        length = int(p.get("context_length") or context_length)
        drop = float(p.get("patch_dropout") if p.get("patch_dropout") is not None else patch_dropout)
        if size != image_size and not patch_size:
            raise ValueError(f"{where}.image_size={size}: a lower image size needs a ViT image tower")
        if not 0 < size <= image_size or (patch_size and size % patch_size):
            raise ValueError(f"{where}.image_size={size}: must be ≤ the model's {image_size}"
                             + (f" and a multiple of its patch size {patch_size}" if patch_size else ""))
        if not 3 <= length <= context_length:
            raise ValueError(f"{where}.context_length={length}: must be in [3, {context_length}] (the model's)")
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"{where}.patch_dropout={drop}: must be in [0, 1)")
        if drop and not patch_size:
            raise ValueError(f"{where}.patch_dropout={drop}: patch dropout needs a ViT image tower")
        phases.append(Phase(start, start + steps, size, length, drop))
        start += steps
    if start > total_steps:
        raise ValueError(f"config.schedule: its phases take {start} steps, more than config.total_steps={total_steps}")
    if start < total_steps:
        phases.append(Phase(start, total_steps, image_size, context_length, patch_dropout))
    return phases


def phase_at(phases: Sequence[Phase], step: int) -> Phase:
    """The phase that runs step `step` + 1 (i.e. after `step` steps are done)."""
    for p in phases:
        if p.start <= step < p.end:
            return p
    return phases[-1]


class PhasedData:
    """The training iterator of the phase at each step: `at(step)` switches to the phase's iterator (built by
    `make(phase)`), carrying the input position over, so the batches continue exactly where the last phase left. It
    and the iterators it holds are `clipjax.data.core.TrainData`."""

    def __init__(self, make: Callable[[Phase], Any], phases: Sequence[Phase]):
        self._make, self.phases = make, list(phases)
        self.phase: Phase | None = None
        self._it: Any = None

    @property
    def iterator(self) -> Any:
        return self._it

    def at(self, step: int) -> Phase:
        p = phase_at(self.phases, step)
        if p != self.phase:
            state = self._it.get_state() if self._it is not None else None
            self.close()
            self._it = self._make(p)
            if state is not None:
                self._it.set_state(state)
            if self.phase is not None or len(self.phases) > 1:
                log.info("phase %s", p.describe())
            self.phase = p
        return p

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)

    @property
    def skipped(self) -> int:
        return int(self._it.skipped)

    @property
    def skipped_by_source(self) -> dict[str, int]:
        """{spec: samples skipped} of a mix (of ArrayRecord datasets, or with `wds:` streams); {} otherwise."""
        return dict(self._it.skipped_by_source)

    @property
    def sources(self) -> list:
        return list(self._it.sources)

    @property
    def step_batch(self):
        return self._it.step_batch

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
