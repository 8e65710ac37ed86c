"""Run control of the trainer: stop on SIGTERM/SIGINT in step with every process, and the per-step counters (skipped
non-finite updates, stop requests) read back from the device."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax
import numpy as np

from clipjax.checkpoint import Checkpointer

log = logging.getLogger(__name__)
COUNTERS = "counters"  # the train step's metrics entry of int32 [3]: non-finite streak, non-finite total, stop request


class NonFiniteError(FloatingPointError):
    """Training stopped after `config.max_nonfinite_steps` consecutive skipped (non-finite) updates."""


class StoppedDuringSetUp(SystemExit):
    """A SIGTERM / SIGINT before the train state existed: the process ends at once, status 0 (nothing to save)."""


class Preemption:
    """SIGTERM / SIGINT → finish the step in flight, checkpoint and stop (exit status 0).

    During set-up (from `install(set_up=True)` until `set_up_done`: config checks, listing the data, reading weights,
    building the train state) there is nothing to checkpoint yet: a signal logs one line and raises
    `StoppedDuringSetUp` (a SystemExit with status 0) in the main thread at once, wherever set-up is (listing shards,
    waiting on a storage request), rather than being noted for a step that may be minutes away.

    The handler only sets a flag. With several processes, every batch carries the flag of the process that built it
    and the step reduces them (`jit_train_step(stop_flags=True)`), so all processes learn of a signal that reached any
    one of them at the same step and checkpoint that step together; a single process reads its own flag. This
    replaces JAX's own SIGTERM preemption notifier. A second SIGINT raises KeyboardInterrupt at once (the last
    complete checkpoint is kept).

    A SIGINT that this process started with ignored stays ignored, as the shell meant: a background job of a script
    (`cmd &`) is not for the terminal's Ctrl-C. SIGTERM is always handled.
    """

    def __init__(self) -> None:
        self.requested = False
        self.setting_up = False
        self._previous: dict[int, Any] = {}

    def set_up_done(self) -> None:
        """The train state exists: from now on a signal finishes the step in flight and checkpoints it."""
        self.setting_up = False

    def install(self, set_up: bool = False) -> None:
        """Takes SIGTERM and SIGINT; `set_up`: the caller is setting up, and a signal ends it at once (`set_up_done`
        ends that)."""
        self.setting_up = set_up
        if threading.current_thread() is not threading.main_thread():
            log.warning("train() runs outside the main thread: SIGTERM/SIGINT will not checkpoint before stopping")
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                log.info("SIGINT is ignored by this process (started in the background): only SIGTERM stops it "
                         "with a checkpoint")
                continue
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.setting_up:
            self.requested = True
            log.warning("%s received during set-up (nothing to checkpoint yet): stopping", signal.Signals(signum).name)
            raise StoppedDuringSetUp(0)
        if not self.requested:  # a repeated SIGTERM (several senders, a retrying scheduler) changes nothing
            log.warning("%s received: checkpointing and stopping after the step in flight", signal.Signals(signum).name)
        self.requested = True

    def flags(self, rows: int) -> np.ndarray:
        """This process's stop flag for each of its `rows` batch rows: int32 [b]."""
        return np.full((rows,), int(self.requested), np.int32)


class StepCounters:
    """Reads the counters of a finished step (one tiny device→host copy of metrics[COUNTERS]): skipped non-finite
    updates, which stop the run after `max_streak` in a row, and stop requests."""

    def __init__(self, max_streak: int, ckpt: Checkpointer):
        self.max_streak, self.ckpt, self.total = max_streak, ckpt, 0
        self.error: NonFiniteError | None = None

    def check(self, step: int, metrics: dict[str, jax.Array]) -> bool:
        """Returns whether any process asked to stop; records a NonFiniteError after too many skipped updates."""
        streak, total, stop = (int(x) for x in jax.device_get(metrics[COUNTERS]))
        if total > self.total:
            log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row, %d in all)", step,
                        streak, total)
        self.total = total
        if streak >= self.max_streak and self.error is None:
            self.error = NonFiniteError(
                f"step {step}: {streak} non-finite updates in a row (config.max_nonfinite_steps={self.max_streak}); "
                f"stopped. Parameters were not updated by those steps; checkpoints (newest: step "
                f"{self.ckpt.latest_step()}) hold finite values")
        return bool(stop)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


def sum_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int32(value))))
