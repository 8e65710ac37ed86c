"""The tensors of a PyTorch checkpoint as `clipjax.interop.torch_pickle` reads them: lazy views (`LazyTensor`: a
storage record, offset, shape and strides) that stay on disk until the state dict is known, the checks that bound
what a file can make the reader allocate (`check_tensors`), and their copy out of the storage bytes
(`materialize_all`).

A file cannot make the reader allocate much more than its own size. Before any storage is read, every tensor of
the state dict must be a view that touches each storage element at most once (contiguous, transposed, sliced
or stepped, as `torch.save` writes parameters and their views; not an expanded (stride 0) or overlapping view)
and lie inside its storage; storages may not be larger than the file could hold, and all tensors together may
hold at most `MAX_EXPANSION` times the file's size plus `SLACK_BYTES`. Anything else raises
`UnsafeCheckpointError` naming the file and the tensor.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class UnsafeCheckpointError(ValueError):
    """A checkpoint that could run code (a global outside the allowlist) or exhaust memory (a tensor bigger than
    its storage, an expanded or overlapping view, more tensor bytes than the file's size allows) when loaded."""


MAX_EXPANSION = 2  # tensor bytes a file may produce per byte of file (shared views of one storage add up)
SLACK_BYTES = 16 << 20  # plus this much, for tiny files with small views into one storage


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: np.dtype  # element type of the storage record
    numel: int  # elements in the record
    byte_offset: int = 0  # legacy storage views start inside their root storage


@dataclass
class LazyTensor:
    storage: StorageRef
    offset: int  # in elements of `dtype`
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype
    negate: bool = False
    conjugate: bool = False


# ------------------------------------------------------------------ materialising tensors


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _view_problem(t: LazyTensor) -> str | None:
    """Why view `t` may not be materialised (None when it may): it must touch each storage element at most once
    and lie inside its storage."""
    if 0 in t.shape:
        return None
    dims = sorted((s, n) for n, s in zip(t.shape, t.stride) if n > 1)  # by stride; size-1 dims move nothing
    if any(s == 0 for s, _ in dims):
        return f"is an expanded view (size {t.shape}, stride {t.stride}): it repeats storage elements"
    reach = 0  # the farthest element the smaller-stride dims reach from a start: each next stride must pass it
    for (s, n), (s_next, _) in zip(dims, dims[1:]):
        reach += (n - 1) * s
        if s_next <= reach:  # interleaved strides (e.g. a transposed slice, (6, 9, 27, 1)) pass; repeats do not
            return f"is an overlapping view (size {t.shape}, stride {t.stride}): it repeats storage elements"
    item = t.dtype.itemsize
    capacity = t.storage.numel * t.storage.dtype.itemsize  # bytes in the storage (or legacy storage view)
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride))  # elements from the first to the last
    if (t.offset + span) * item > capacity:
        return (f"needs {(t.offset + span) * item} bytes (offset {t.offset}, size {t.shape}, stride {t.stride}) "
                f"but its storage {t.storage.key!r} holds {capacity}")
    return None


def check_tensors(tensors: dict[str, LazyTensor], path: str, file_size: int) -> None:
    """Refuse, before reading any storage, views that repeat or overrun their storage, storages larger than the
    file allows and more tensor bytes in all than `MAX_EXPANSION` × the file's size + `SLACK_BYTES`."""
    limit = MAX_EXPANSION * file_size + SLACK_BYTES
    total = 0
    for name, t in tensors.items():
        problem = _view_problem(t)
        if problem is not None:
            raise UnsafeCheckpointError(f"{path}: tensor {name!r} {problem}")
        storage_bytes = t.storage.byte_offset + t.storage.numel * t.storage.dtype.itemsize
        if storage_bytes > limit:
            raise UnsafeCheckpointError(f"{path}: tensor {name!r} uses storage {t.storage.key!r} of {storage_bytes} "
                                        f"bytes, more than a {file_size}-byte file can hold")
        total += _numel(t.shape) * t.dtype.itemsize
        if total > limit:
            raise UnsafeCheckpointError(f"{path}: tensor {name!r} brings the tensors to {total} bytes, more than "
                                        f"{MAX_EXPANSION} x the file's {file_size} bytes + {SLACK_BYTES}")


def _materialize(t: LazyTensor, raw: bytes, big_endian: bool, name: str, path: str) -> np.ndarray:
    """Copy tensor `t` (checked by `check_tensors`) out of its storage bytes `raw`, honouring offset and strides."""
    dtype, item = t.dtype, t.dtype.itemsize
    if 0 in t.shape:
        return np.zeros(t.shape, dtype)
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride))  # elements the view touches
    start = t.storage.byte_offset + t.offset * item
    limit = min(len(raw), t.storage.byte_offset + t.storage.numel * t.storage.dtype.itemsize)
    if start + span * item > limit:
        raise ValueError(f"{path}: tensor {name!r} reads past the end of storage {t.storage.key!r} "
                         f"({start + span * item} > {limit} bytes)")
    # Gather as opaque items (as_strided cannot take ml_dtypes), then reinterpret.
    flat = np.frombuffer(raw, np.dtype(f"V{item}"), count=span, offset=start)
    view = np.lib.stride_tricks.as_strided(flat, t.shape, tuple(s * item for s in t.stride), writeable=False)
    items = np.array(view, order="C").reshape(-1)  # [numel]
    unit = item // 2 if dtype.kind == "c" else item  # complex numbers swap each component
    if big_endian and unit > 1:
        items = items.view(f">u{unit}").astype(f"u{unit}")
    out = items.view(dtype).reshape(t.shape)
    if t.conjugate:
        out = np.conj(out)
    if t.negate:
        out = np.negative(out)
    return out


def materialize_all(tensors: dict[str, LazyTensor], read: Callable[[StorageRef], bytes], big_endian: bool,
                     path: str) -> dict[str, np.ndarray]:
    """Check every view (`check_tensors`), then read each storage once (holding one at a time) and copy every
    tensor out of it."""
    check_tensors(tensors, path, os.path.getsize(path))
    by_key: dict[str, list[str]] = {}
    for name, t in tensors.items():
        by_key.setdefault(t.storage.key, []).append(name)
    out: dict[str, np.ndarray] = {}
    for names in by_key.values():
        raw = read(tensors[names[0]].storage)
        root = tensors[names[0]].storage
        expected = root.byte_offset + root.numel * root.dtype.itemsize
        if len(raw) < expected and all(tensors[n].storage.byte_offset == 0 for n in names):
            raise ValueError(f"{path}: storage record {root.key!r} is truncated ({len(raw)} < {expected} bytes)")
        for name in names:
            out[name] = _materialize(tensors[name], raw, big_endian, name, path)
    return {name: out[name] for name in tensors}
