"""Mesh, THE logical-axis rule table, and logical → NamedSharding conversion.

Models name parameter and activation axes logically (embed, mlp, heads, ...); this module alone knows mesh axes.
One rule table serves every strategy; the mesh shape picks it (a mesh axis of size 1 shards nothing):

    data parallel       mesh {"data": -1}                 params replicated, batch split
    FSDP (ZeRO-3)       mesh {"fsdp": -1}                 params + optimizer state split on `embed`, batch split
    FSDP + tensor       mesh {"fsdp": -1, "tensor": 2}    plus heads / MLP / vocab split over `tensor`
    any mix             mesh {"data": 2, "fsdp": 4}
    several slices      mesh {"slices": 2, "fsdp": -1}    data parallel across slices (the data-centre network),
                                                          the other axes inside each slice (its chip links)

The outermost mesh axis, "slice", is the number of TPU slices (default: as many as the devices belong to; 1 on a
single slice, a GPU host or a CPU): parameters are never split over it, so the only traffic between slices is the
batch axes' (the gradient reduction and the contrastive loss's gather of the embeddings).

A dimension that a mesh axis does not divide stays replicated (see `spec_for`), so odd sizes never fail to shard.

Parameters are placed by `logical_shardings`. Activations are constrained where the model is traced: wrap the traced
function with `with_activation_sharding(fn, mesh)` (then jit it), and every `constrain_activation` the model layers
call inside becomes a `jax.lax.with_sharding_constraint` to the rule table's NamedSharding on that mesh; outside such
a function they return their input unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("slice", "data", "fsdp", "tensor")
BATCH_AXES = ("slice", "data", "fsdp")  # the batch (and the contrastive loss) is split over these
SLICES_KEY = "slices"  # the config's name of the slice axis's size (config.mesh.slices; 0 or absent: as found)

# logical axis → mesh axis (or tuple of mesh axes, or None = replicated)
RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("joint", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
    ("layers", None),
)

PRESETS: dict[str, dict[str, int]] = {
    "dp": {"data": -1},
    "fsdp": {"fsdp": -1},
    "fsdp_tp": {"fsdp": -1, "tensor": 2},
}


def make_mesh(shape: Mapping[str, int] | str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (slice, data, fsdp, tensor) mesh. `shape` maps axis → size, one of data/fsdp/tensor may be -1 (= the rest
    of a slice), `slices` the number of slices (0 or absent: the number the devices belong to); or a preset."""
    if shape is None:
        shape = {"data": -1}
    if isinstance(shape, str):
        if shape not in PRESETS:
            raise ValueError(f"unknown mesh preset {shape!r}; valid: {sorted(PRESETS)}")
        shape = PRESETS[shape]
    shape = dict(shape)
    given_slices = int(shape.pop(SLICES_KEY, 0) or 0)
    unknown = set(shape) - set(MESH_AXES[1:])
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} unknown; valid axes: {(SLICES_KEY, *MESH_AXES[1:])}")
    devices = list(devices) if devices is not None else jax.devices()
    found = len({getattr(d, "slice_index", 0) for d in devices})
    slices = given_slices or found
    if slices < 1 or len(devices) % slices:
        raise ValueError(f"mesh {SLICES_KEY}={slices}: {len(devices)} devices are not divisible into {slices} slices")
    if found > 1 and slices != found:
        raise ValueError(f"mesh {SLICES_KEY}={slices}, but the devices belong to {found} slices")
    n = len(devices) // slices  # devices per slice
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES[1:]]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {shape}: at most one axis may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ValueError(f"mesh {shape}: {n} devices{' per slice' if slices > 1 else ''} are not divisible by "
                             f"{known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {shape} needs {math.prod(sizes)} devices{' per slice' if slices > 1 else ''}, there "
                         f"are {n}")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if found > 1:  # chips of a slice on its fast links, slices over the data-centre network
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh((1, *sizes), (slices, 1, 1, 1), devices,
                                                    allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh((slices, *sizes), MESH_AXES, axis_types=axis_types, devices=devices)


def _mesh_axes_of(name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in RULES:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no rule in clipjax.sharding.RULES")


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for an array with logical axis `names`; mesh axes that do not divide a dim are dropped."""
    used: set[str] = set()
    parts = []
    for name, dim in zip(names, shape):
        axes = [a for a in _mesh_axes_of(name) if a not in used and mesh.shape[a] > 1]
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        parts.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*parts)


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` (abstract or concrete)."""

    def one(x):
        if isinstance(x, nn.LogicallyPartitioned) and hasattr(x.value, "shape"):  # not e.g. optax's MaskedNode
            return NamedSharding(mesh, spec_for(x.names, x.value.shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis split over the batch axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_device_count(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ============================================================================================ activations

_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("clipjax_activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None) -> Iterator[None]:
    """While tracing inside this context, `constrain_activation` shards activations over `mesh` by RULES."""
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVE_MESH.reset(token)


def with_activation_sharding(fn: Callable, mesh: Mesh | None) -> Callable:
    """`fn` whose body runs with the activation rules active on `mesh`: jit the result.

        step = jax.jit(shd.with_activation_sharding(step, mesh), in_shardings=..., out_shardings=...)

    The rules are active while `fn` is traced, so the compiled program carries the constraints; `mesh` None (or a
    one-device mesh) gives `fn`'s behaviour without constraints.
    """
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh):
            return fn(*args, **kwargs)

    return wrapped


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `with_activation_sharding` (None outside one)."""
    return _ACTIVE_MESH.get()


def constrain_activation(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Shard activation `x` by its logical axis `names` over the active mesh (`spec_for`: a mesh axis that does not
    divide a dimension is dropped). Without an active mesh, or when no mesh axis applies, `x` is returned as is."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"activation of shape {x.shape} given {len(names)} logical axis names {tuple(names)}")
    spec = spec_for(names, x.shape, mesh)
    if all(part is None for part in spec):
        return x  # nothing to split: leave the layout to XLA rather than force a replicated copy
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh a tree's arrays are laid out on (the first leaf with a NamedSharding), or None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


@dataclasses.dataclass(frozen=True)
class ShardingReport:
    total_bytes: int
    sharded_bytes: int

    @property
    def fraction(self) -> float:
        return self.sharded_bytes / max(self.total_bytes, 1)


def sharded_fraction(arrays: Any) -> ShardingReport:
    """How many parameter bytes are split across devices (MaxText's "sufficiently sharded" check)."""
    total = sharded = 0
    for x in jax.tree.leaves(arrays):
        nbytes = x.size * x.dtype.itemsize
        total += nbytes
        if not x.sharding.is_fully_replicated:
            sharded += nbytes
    return ShardingReport(total, sharded)
