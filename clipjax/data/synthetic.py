"""The synthetic source: random (image, text) batches made on the devices, for smoke runs, benchmarks and drills.

Batch k is a pure function of (seed, k), `make_batch`, generated with `jax.random` straight into the batch sharding
of the mesh: no host work and no host→device copy, and the same global batch on any number of devices or processes
(partitionable threefry). The trainer makes it inside its jitted train step, from the step number on the device
(`SyntheticIterator(on_step=True)`): no program of its own to dispatch, so a run on `synthetic` measures the trainer
alone. `SyntheticIterator.batch(k)` makes the same batch as a jitted function of its own.

    image  uint8 [N, S, S, 3]   normalised on the device like real images (`clipjax.step.prepare_images`)
    text   int32 [N, L]         start token, random ids, an end token (the largest id) at a random position
    nan    int32 [N]            only with `nan_steps`: 1 where the image must become NaN (see below)

Fault injection (for tests and drills; `data.synthetic_nan_steps`, `data.synthetic_seconds_per_batch`): at the
training steps in `nan_steps` (counted from 1 like metrics.jsonl: batch k feeds step k + 1) every image becomes NaN
where images become float, on the device (the "nan" flag travels with the batch); `seconds_per_batch` simulates a
slow input pipeline, paid on a background thread that keeps `prefetch` batches ahead, not in the training loop.

Letters: N global batch, S image side, L context length.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from clipjax import sharding as shd


def _hash_bytes(salt: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint8 `shape` of pseudo-random bytes: murmur3's finalizer of each element's global index and `salt` (uint32).
    A pure function of the index, so any sharding of the output computes the same values; a few integer operations
    an element (a counter-based generator such as threefry costs ~20 rounds, which on a CPU competes with the
    training step for the same cores)."""
    x = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape) * jnp.uint32(0x9E3779B1) + salt
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        x = (x ^ (x >> shift)) * jnp.uint32(mult)
    return (x ^ (x >> 16)).astype(jnp.uint8)


def make_batch(k: jax.Array, *, seed: int, n: int, size: int, length: int, vocab: int,
               nan_steps: tuple[int, ...] = (), mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """Global batch `k` (an integer scalar, traced or not): traceable, so a jitted step can make its own batch. With
    `mesh`, each field is constrained to the batch sharding (every device makes its own rows)."""
    key = jax.random.fold_in(jax.random.key(seed), jnp.asarray(k).astype(jnp.uint32))
    k_img, k_len, k_ids = jax.random.split(key, 3)
    image = _hash_bytes(jax.random.bits(k_img, (), jnp.uint32), (n, size, size, 3))  # uniform pixels
    ends = jax.random.randint(k_len, (n, 1), 2, length)  # position of the end token: [N, 1]
    ids = jax.random.randint(k_ids, (n, length), 1, vocab - 2)  # [N, L]
    pos = jnp.arange(length)[None, :]  # [1, L]
    text = jnp.where(pos == 0, vocab - 2, jnp.where(pos < ends, ids, jnp.where(pos == ends, vocab - 1, 0)))
    batch = {"image": image, "text": text.astype(jnp.int32)}
    if nan_steps:  # batch k feeds training step k + 1
        poisoned = jnp.isin(jnp.asarray(k).astype(jnp.int32) + 1, jnp.asarray(sorted(nan_steps), jnp.int32))
        batch["nan"] = jnp.full((n,), poisoned, jnp.int32)
    if mesh is not None:
        batch = {name: jax.lax.with_sharding_constraint(x, shd.batch_sharding(mesh, x.ndim))
                 for name, x in batch.items()}
    return batch


@functools.lru_cache(maxsize=8)
def _generator(mesh: Mesh, **batch_args):
    """`make_batch` jitted: batch index → batch, born in the batch sharding of `mesh` (one dispatch per batch)."""
    make = functools.partial(make_batch, **batch_args)
    fields = jax.eval_shape(make, np.uint32(0))
    return jax.jit(make, out_shardings={k: shd.batch_sharding(mesh, v.ndim) for k, v in fields.items()})


class SyntheticIterator:
    """Endless synthetic global batches on `mesh` (see the module docstring); `get_state`/`set_state` resume.

    `on_step=True` (the trainer): `next()` yields an empty batch, after the simulated delay if any, and the train step
    makes batch k itself with `make(k)` from its step number (batch k feeds step k + 1, so k is the state's step)."""

    def __init__(self, *, global_batch_size: int, image_size: int, context_length: int, seed: int, mesh: Mesh,
                 vocab_size: int = 49408, nan_steps: Sequence[int] = (), seconds_per_batch: float = 0.0,
                 prefetch: int = 2, on_step: bool = False):
        if global_batch_size % shd.batch_device_count(mesh):
            raise ValueError(f"global batch {global_batch_size} not divisible by the "
                             f"{shd.batch_device_count(mesh)} batch devices")
        if context_length < 3 or vocab_size < 4:
            raise ValueError(f"synthetic text needs context_length ≥ 3 and vocab_size ≥ 4, got {context_length}, "
                             f"{vocab_size}")
        self.mesh, self.on_step = mesh, bool(on_step)
        self.seconds_per_batch, self.prefetch = float(seconds_per_batch), max(1, prefetch)
        self._batch_args = dict(seed=int(seed), n=global_batch_size, size=image_size, length=context_length,
                                vocab=vocab_size, nan_steps=tuple(sorted({int(s) for s in nan_steps})))
        self.position = 0
        self.skipped = 0  # the clipjax.data.core.TrainData interface: nothing is ever skipped, no random-access source
        self.skipped_by_source: dict[str, int] = {}
        self.sources: list = []
        self.step_batch = self.make if self.on_step else None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def make(self, k: jax.Array) -> dict[str, jax.Array]:
        """Global batch k, traceable (`make_batch`): what a train step calls to make its own batch."""
        return make_batch(k, **self._batch_args, mesh=self.mesh)

    def batch(self, k: int) -> dict[str, jax.Array]:
        """Global batch k (feeds training step k + 1), made by a jitted function of its own."""
        return _generator(self.mesh, **self._batch_args)(np.uint32(k))

    def _next_batch(self, k: int) -> dict[str, jax.Array]:
        return {} if self.on_step else self.batch(k)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if not self.seconds_per_batch:
            out = self._next_batch(self.position)
        else:
            if self._thread is None:
                self._start()
            out = self._queue.get()
            if isinstance(out, BaseException):
                self.close()
                raise out
        self.position += 1
        return out

    # -------------------------------------------------------------------------------------------- slow pipeline

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self.position, self._stop), daemon=True,
                                        name="clipjax-synthetic")
        self._thread.start()

    def _produce(self, k: int, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                time.sleep(self.seconds_per_batch)
                batch = self._next_batch(k)
                while not stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                k += 1
        except BaseException as e:  # handed to the consumer
            self._queue.put(e)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None

    # -------------------------------------------------------------------------------------------- state

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.close()
        self.position = int(state["position"])
