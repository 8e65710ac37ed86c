"""An in-memory synthetic source of (image, text) batches for smoke runs and tests, with the pipeline interface."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np


class SyntheticIterator:
    """Deterministic random batches: image [b, S, S, 3] float32, text [b, L] int32 with an EOT at the max id.

    Each global row i of batch k is generated from (seed, k, i), so any process count sees the same global data.
    `nan_steps` (training steps, counted from 1 like metrics.jsonl: batch k feeds step k + 1) get all-NaN images, to
    exercise the trainer's handling of non-finite losses; `seconds_per_batch` simulates a slow input pipeline.
    """

    def __init__(self, *, global_batch_size: int, image_size: int, context_length: int, seed: int,
                 process_index: int = 0, process_count: int = 1, vocab_size: int = 49408,
                 nan_steps: Sequence[int] = (), seconds_per_batch: float = 0.0):
        if global_batch_size % process_count:
            raise ValueError(f"global batch {global_batch_size} not divisible by {process_count} processes")
        self.n, self.size, self.length = global_batch_size, image_size, context_length
        self.seed, self.vocab = seed, vocab_size
        self.local = global_batch_size // process_count
        self.offset = process_index * self.local
        self.nan_steps = frozenset(int(s) for s in nan_steps)
        self.seconds_per_batch = float(seconds_per_batch)
        self.position = 0
        self.skipped = 0

    def _row(self, k: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, k, i))
        image = rng.standard_normal((self.size, self.size, 3), dtype=np.float32)
        n = int(rng.integers(1, self.length - 1))
        text = np.zeros(self.length, np.int32)
        text[0] = self.vocab - 2
        text[1:n + 1] = rng.integers(1, self.vocab - 2, n)
        text[n + 1] = self.vocab - 1
        return image, text

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.seconds_per_batch:
            time.sleep(self.seconds_per_batch)
        rows = [self._row(self.position, self.offset + i) for i in range(self.local)]
        self.position += 1
        image = np.stack([r[0] for r in rows])  # [b, S, S, 3]
        if self.position in self.nan_steps:
            image[:] = np.nan
        return {"image": image, "text": np.stack([r[1] for r in rows])}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])
