"""A train step compiled ahead of time, on disk: written by `python -m clipjax.aot --save_executable=PATH`, run by
`python -m clipjax.main --compiled=PATH` (`clipjax.train` calls `prebuilt`).

The file is a header line (what the step was made for: devices, mesh, processes, jax / jaxlib / libtpu versions and
a fingerprint of the lowered program) and the executable JAX serialised. Before running one, the trainer lowers its
own step for this run and compares: another chip count or kind, another software version or another program (model,
batch, optimizer, schedule, code) is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"CLIPJAX-EXECUTABLE 1\n"


class AotError(ValueError):
    """A topology, a compiled step or a file that cannot be used as asked (one line for the user)."""


def versions() -> dict[str, str]:
    """The software that decides what a compiled program is: jax, jaxlib and (on TPU) libtpu."""
    import importlib.metadata

    import jax
    import jaxlib

    out = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    try:
        out["libtpu"] = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def abstract_batch(config: Any, mesh: Any, image_size: int, context_length: int,
                   stop_flags: bool) -> dict[str, Any]:
    """The global batch as the data pipeline makes it, as ShapeDtypeStructs with the trainer's shardings."""
    import jax
    import jax.numpy as jnp

    from clipjax import sharding as shd
    from clipjax.tasks import task_class

    n = int(config.batch_size)
    every = {"image": ((n, image_size, image_size, 3), jnp.uint8), "text": ((n, context_length), jnp.int32),
             "label": ((n,), jnp.int32)}
    shapes = {field: every[field] for field in task_class(config).fields}
    if stop_flags:
        shapes["stop"] = ((n,), jnp.int32)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()}


def program_digest(lowered: Any) -> str:
    """A fingerprint of the lowered program: equal for the same step, config and device layout."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def _signature(program_or_mesh: Any, devices: list[Any], processes: int) -> dict[str, Any]:
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "chips": len(devices),
            "processes": processes, "mesh": {k: int(v) for k, v in program_or_mesh.shape.items()}}


def save_executable(path: str, compiled: Any, program: Any, devices: list[Any], topology: str) -> None:
    """Write `compiled` with what it was made for (the program's fingerprint, devices, versions)."""
    from jax.experimental.serialize_executable import serialize

    from clipjax import paths

    payload, _, _ = serialize(compiled)
    meta = {"topology": topology, "program": program_digest(program.lowered), "versions": versions(),
            **_signature(program.mesh, devices, program.processes)}
    paths.write_bytes(path, MAGIC + json.dumps(meta).encode() + b"\n" + payload)


def read_executable(path: str) -> tuple[dict[str, Any], bytes]:
    from clipjax import paths

    try:
        data = paths.read_bytes(paths.as_path(path))
    except OSError as e:
        raise AotError(f"--compiled={path}: cannot read it ({e.strerror or e})") from None
    if not data.startswith(MAGIC) or b"\n" not in data[len(MAGIC):]:
        raise AotError(f"--compiled={path}: not a step written by python -m clipjax.aot --save_executable")
    header, payload = data[len(MAGIC):].split(b"\n", 1)
    try:
        return json.loads(header), payload
    except ValueError:
        raise AotError(f"--compiled={path}: its header is damaged") from None


def prebuilt(path: str, make_step: Any, config: Any, cfg: Any, mesh: Any, state: Any, phase: Any) -> Any:
    """`make_step` (the trainer's step factory) that returns the step compiled in `path` for `phase`'s batches, after
    checking it was made for these devices, this config and this software; other phases compile as usual."""
    import jax
    from jax.experimental.serialize_executable import deserialize_and_load

    from clipjax.step import abstract_with_shardings
    from clipjax.tasks import task_class
    from clipjax.config_checks import ConfigError

    try:
        meta, payload = read_executable(path)
    except AotError as e:
        raise ConfigError(str(e)) from None
    if config.data.train == "synthetic" and not config.data.get("mix"):
        raise ConfigError(f"--compiled={path}: the step was compiled for batches from a dataset; config.data.train="
                          f"'synthetic' makes its batches inside the step (compile it here instead)")
    devices = list(mesh.devices.flat)
    here = _signature(mesh, devices, jax.process_count())
    theirs = {k: meta.get(k) for k in here}
    if theirs != here:
        diff = ", ".join(f"{k} {theirs[k]!r} there, {here[k]!r} here" for k in here if theirs[k] != here[k])
        raise ConfigError(f"--compiled={path} was made for other devices (topology {meta.get('topology')}): {diff}")
    if meta.get("versions") != versions():
        raise ConfigError(f"--compiled={path} was made with {meta.get('versions')}, this run has {versions()}: "
                          f"compile it again with this software")
    stop_flags = jax.process_count() > 1
    fields = task_class(config).fields
    batch = abstract_batch(config, mesh, phase.image_size, phase.context_length, stop_flags)
    jitted = make_step(fields=fields, patch_dropout=phase.patch_dropout)
    lowered = jitted.lower(abstract_with_shardings(jax.tree.map(lambda x: x.sharding, state), state), batch)
    if program_digest(lowered) != meta.get("program"):
        raise ConfigError(f"--compiled={path} holds another program than this config's step (another model, "
                          f"batch, optimizer, schedule or code): compile it again for this config")
    compiled = deserialize_and_load(payload, lowered.in_tree, lowered.out_tree, execution_devices=jax.devices())
    log.info("train step loaded from %s (compiled ahead of time for %s)", path, meta.get("topology"))
    used = {"done": False}

    def make(fields=None, patch_dropout=0.0, make_batch=None):
        if not used["done"] and make_batch is None and patch_dropout == phase.patch_dropout and (
                fields is None or dict(fields) == fields_of(batch)):
            used["done"] = True
            return compiled
        return make_step(fields=fields, patch_dropout=patch_dropout, make_batch=make_batch)

    return make


def fields_of(batch: dict[str, Any]) -> dict[str, int]:
    return {k: v.ndim for k, v in batch.items() if k != "stop"}
