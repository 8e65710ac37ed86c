"""Read PyTorch checkpoint files into numpy without torch and without running pickled code.

`load_torch_file` returns a flat state dict (dotted names -> numpy arrays, dtypes preserved) from:

- `torch.save` zip archives (`<root>/data.pkl` + `<root>/data/<key>` storage records) holding a state dict, or a
  training checkpoint dict whose "state_dict" / "model" entry holds one ("module." prefixes from DDP are stripped);
- TorchScript archives written by `torch.jit.save` (OpenAI's released CLIP `.pt` files): `data.pkl` pickles the
  module tree as `__torch__.*` objects; the `__parameters__` / `__buffers__` lists in the archive's `code/` decide
  which tensor attributes `module.state_dict()` would return, so the same names come back here;
- the legacy (pre-1.6, `_use_new_zipfile_serialization=False`) stream: header pickles, the main pickle, the list
  of storage keys, then each storage as an int64 element count followed by its little-endian bytes.

Pickles are read by a restricted unpickler: a global is resolved only from a fixed table of inert stand-ins
(tensor rebuild functions, storage and dtype markers, plain containers); `__torch__.*` classes become attribute
bags. Any other global raises `UnsafeCheckpointError` when the unpickler meets it, before anything runs.
Tensors stay lazy (storage key, offset, shape, strides) until the final state dict is known, so optimizer state
in a training checkpoint is never read from disk.

A file cannot make the reader allocate much more than its own size. Before any storage is read, every tensor of
the state dict must be a view that touches each storage element at most once (contiguous, transposed, sliced
or stepped, as `torch.save` writes parameters and their views; not an expanded (stride 0) or overlapping view)
and lie inside its storage; storages may not be larger than the file could hold, and all tensors together may
hold at most `MAX_EXPANSION` times the file's size plus `SLACK_BYTES`. Anything else raises
`UnsafeCheckpointError` naming the file and the tensor (the lazy tensors, these checks and the copy out of the
storages: `clipjax.interop.torch_tensors`).
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from clipjax.interop.torch_tensors import (MAX_EXPANSION, SLACK_BYTES, LazyTensor, StorageRef,  # noqa: F401
                                          UnsafeCheckpointError, check_tensors, materialize_all)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_NP_DTYPES: dict[str, Any] = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
    "complex64": np.complex64, "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "float8_e8m0fnu": ml_dtypes.float8_e8m0fnu,
}
_STORAGE_CLASSES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}


@dataclass(frozen=True)
class _DtypeMarker:
    """Inert stand-in for a `torch.<dtype>` object, a `torch.<X>Storage` class or a tensor class."""

    name: str

    @property
    def np(self) -> np.dtype:
        return np.dtype(_NP_DTYPES[self.name])


class _ScriptObject:
    """Attribute bag for a pickled `__torch__.*` TorchScript object; `state` is its attribute dict."""

    qualified_name = ""

    def __init__(self, *args: Any, **kwargs: Any):
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


# ------------------------------------------------------------------ stand-ins for the allowlisted globals


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        raise ValueError(f"tensor {what} must be a tuple of ints, got {value!r:.80}")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None
                    ) -> LazyTensor:
    if not isinstance(storage, StorageRef) or not isinstance(storage_offset, int):
        raise ValueError("tensor record does not reference a storage")
    shape, strides = _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride")
    if len(shape) != len(strides) or min(shape + strides + (storage_offset,), default=0) < 0:
        raise ValueError(f"bad tensor geometry: size {shape}, stride {strides}, offset {storage_offset}")
    return LazyTensor(storage, storage_offset, shape, strides, storage.dtype if dtype is None else dtype)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None, dtype: np.dtype | None = None
                       ) -> LazyTensor:
    tensor = _rebuild_tensor(storage, storage_offset, size, stride, dtype)
    if isinstance(metadata, Mapping):  # lazily negated / conjugated views
        tensor.negate, tensor.conjugate = bool(metadata.get("neg")), bool(metadata.get("conj"))
    return tensor


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> LazyTensor:
    if not isinstance(dtype, _DtypeMarker) or dtype.name not in _NP_DTYPES:
        raise ValueError(f"tensor dtype must be a torch dtype, got {dtype!r:.80}")
    return _rebuild_tensor_v2(storage, storage_offset, size, stride, metadata=metadata, dtype=dtype.np)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None) -> Any:
    return data


_TENSOR_TYPES = (_DtypeMarker("Tensor"), _DtypeMarker("Parameter"))
_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func not in _REBUILDERS or new_type not in _TENSOR_TYPES or not isinstance(args, tuple):
        raise ValueError("tensor subclasses are not supported")
    return func(*args)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError("only latin1-encoded bytes literals are allowed")
    return text.encode("latin1")


def _bytearray(source: Any = b"", encoding: Any = None) -> bytearray:
    """`bytearray` as protocol-2 pickles call it (from a latin1 string or bytes), never from a length."""
    if isinstance(source, str) and encoding in ("latin1", "latin-1"):
        return bytearray(source.encode("latin1"))
    if isinstance(source, (bytes, bytearray)) and encoding is None:
        return bytearray(source)
    raise UnsafeCheckpointError(f"refused bytearray({type(source).__name__}): only bytes or a latin1 string may "
                                f"build one, never a length")


def _identity(value: Any, *_: Any) -> Any:
    return value


def _device(kind: Any, index: Any = None) -> str:
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise ValueError(f"bad torch.device arguments {kind!r:.40}, {index!r:.20}")
    return kind if index is None else f"{kind}:{index}"


_ALLOWED: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.bytearray": _bytearray,
    "builtins.complex": complex,
    "_codecs.encode": _codecs_encode,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Tensor": _TENSOR_TYPES[0], "torch.nn.parameter.Parameter": _TENSOR_TYPES[1],
    "torch.Size": tuple, "torch.device": _device,
    "torch.jit._pickle.build_intlist": _identity, "torch.jit._pickle.build_tensorlist": _identity,
    "torch.jit._pickle.build_doublelist": _identity, "torch.jit._pickle.build_boollist": _identity,
    "torch.jit._pickle.restore_type_tag": _identity,
    **{f"torch.{n}": _DtypeMarker(d) for n, d in _STORAGE_CLASSES.items()},
    "torch.storage.UntypedStorage": _DtypeMarker("uint8"),
    **{f"torch.{n}": _DtypeMarker(n) for n in _NP_DTYPES},
}
_UNSUPPORTED_PREFIXES = ("torch._utils._rebuild_", "torch.Q", "torch.jit._pickle.", "torch.float4", "torch.bits",
                         "torch.complex32", "torch.sparse", "torch.per_")


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals only from `_ALLOWED` (plus inert `__torch__.*` bags); storages via `storage_factory`."""

    def __init__(self, file: Any, source: str, storage_factory: Callable[[tuple], Any] | None = None):
        super().__init__(file, encoding="utf-8")
        self._source = source
        self._storage_factory = storage_factory
        self._script_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles spell Python 3 names the Python 2 way (`__builtin__.set`); normalise as pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if module == "__torch__" or module.startswith("__torch__."):
            if qualified not in self._script_classes:
                cls = type(name, (_ScriptObject,), {"qualified_name": qualified})
                self._script_classes[qualified] = cls
            return self._script_classes[qualified]
        if qualified in _ALLOWED:
            return _ALLOWED[qualified]
        if qualified.startswith(_UNSUPPORTED_PREFIXES):
            raise ValueError(f"{self._source}: unsupported tensor kind {qualified!r} (only dense tensors load)")
        raise UnsafeCheckpointError(
            f"{self._source}: refused global {qualified!r}: a checkpoint may only reference tensors, "
            "storages and plain containers"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._storage_factory is None or not isinstance(pid, tuple) or not pid:
            raise ValueError(f"{self._source}: unexpected persistent id {pid!r:.80}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise ValueError(f"{self._source}: unsupported persistent id kind {kind!r:.40}")
        return self._storage_factory(pid[1:])


def _unpickle(file: Any, source: str, storage_factory: Callable[[tuple], Any] | None = None) -> Any:
    """One restricted `pickle.load`; malformed streams become a ValueError naming `source`."""
    try:
        return _RestrictedUnpickler(file, source, storage_factory).load()
    except UnsafeCheckpointError as e:
        if str(e).startswith(source):
            raise
        raise UnsafeCheckpointError(f"{source}: {e}") from None
    except ValueError as e:
        if str(e).startswith(source):
            raise
        raise ValueError(f"{source}: {e}") from None
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError, struct.error,
            RecursionError, MemoryError) as e:
        raise ValueError(f"{source}: corrupt or truncated pickle ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------ storage sources


def _storage_marker(value: Any, source: str) -> np.dtype:
    if not isinstance(value, _DtypeMarker) or value.name not in _NP_DTYPES:
        raise ValueError(f"{source}: storage type must be a torch storage class, got {value!r:.80}")
    return value.np


class _ZipSource:
    """Storage records `<root>/data/<key>` of a zip archive, plus its TorchScript `code/` files."""

    def __init__(self, zf: zipfile.ZipFile, root: str, path: str):
        self.zf, self.root, self.path = zf, root, path
        self.names = set(zf.namelist())
        self.limit = MAX_EXPANSION * os.path.getsize(path) + SLACK_BYTES  # bytes any one record may inflate to

    def storage(self, pid: tuple) -> StorageRef:
        if len(pid) < 4:
            raise ValueError(f"{self.path}: malformed storage id {pid!r:.80}")
        dtype, key, numel = _storage_marker(pid[0], self.path), str(pid[1]), pid[3]
        if not isinstance(numel, int) or numel < 0:
            raise ValueError(f"{self.path}: storage {key!r} has a bad element count {numel!r:.40}")
        return StorageRef(key, dtype, numel)

    def read_text(self, name: str) -> str | None:
        record = self.root + name
        return self.read_record(record).decode("utf-8", "replace") if record in self.names else None

    def read(self, ref: StorageRef) -> bytes:
        """The storage's bytes, at most as many as it declares (a compressed record cannot inflate past them)."""
        record = f"{self.root}data/{ref.key}"
        if record not in self.names:
            raise ValueError(f"{self.path}: missing storage record {record!r}")
        return self.read_record(record, ref.byte_offset + ref.numel * ref.dtype.itemsize)

    def read_record(self, record: str, limit: int | None = None) -> bytes:
        """The record's bytes: at most `limit` (a storage's declared size), else refused past `self.limit`."""
        try:
            with self.zf.open(record) as f:
                data = f.read(self.limit + 1 if limit is None else limit)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{self.path}: cannot read record {record!r} ({e})") from None
        if limit is None and len(data) > self.limit:
            raise UnsafeCheckpointError(f"{self.path}: record {record!r} inflates to more than {self.limit} bytes")
        return data


class _LegacySource:
    """Storages appended after the pickles of a legacy `torch.save` stream, located by their file offsets."""

    def __init__(self, path: str):
        self.path = path
        self.roots: dict[str, tuple[np.dtype, int]] = {}  # key -> (dtype, numel)
        self.offsets: dict[str, tuple[int, int]] = {}  # key -> (file offset, nbytes)

    def storage(self, pid: tuple) -> StorageRef:
        if len(pid) != 5:
            raise ValueError(f"{self.path}: malformed storage id {pid!r:.80}")
        dtype, key, numel, view = _storage_marker(pid[0], self.path), str(pid[1]), pid[3], pid[4]
        if not isinstance(numel, int) or numel < 0:
            raise ValueError(f"{self.path}: storage {key!r} has a bad element count {numel!r:.40}")
        self.roots.setdefault(key, (dtype, numel))
        if view is None:
            return StorageRef(key, dtype, numel)
        if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])):
            raise ValueError(f"{self.path}: malformed storage view {view!r:.80}")
        return StorageRef(key, dtype, view[2], byte_offset=view[1] * dtype.itemsize)

    def locate(self, fh: io.BufferedReader, keys: Any, file_size: int) -> None:
        if not isinstance(keys, list):
            raise ValueError(f"{self.path}: legacy storage key list is missing")
        offset = fh.tell()
        for key in map(str, keys):
            if key not in self.roots:
                raise ValueError(f"{self.path}: storage {key!r} is listed but never referenced")
            fh.seek(offset)
            header = fh.read(8)
            if len(header) < 8:
                raise ValueError(f"{self.path}: truncated file: storage {key!r} is missing")
            count = struct.unpack("<q", header)[0]
            nbytes = count * self.roots[key][0].itemsize
            if count < 0 or offset + 8 + nbytes > file_size:
                raise ValueError(f"{self.path}: truncated file: storage {key!r} needs {nbytes} bytes")
            self.offsets[key] = (offset + 8, nbytes)
            offset += 8 + nbytes

    def read(self, ref: StorageRef) -> bytes:
        if ref.key not in self.offsets:
            raise ValueError(f"{self.path}: missing storage record {ref.key!r}")
        start, nbytes = self.offsets[ref.key]
        with open(self.path, "rb") as fh:
            fh.seek(start)
            return fh.read(nbytes)


# ------------------------------------------------------------------ object tree -> state dict


def _script_declarations(source: _ZipSource | None, qualified: str, cache: dict) -> tuple | None:
    """("module", parameters, buffers | None) or ("class",) for a TorchScript class, read from the archive's
    code/ file; None when the code is not there (then every tensor attribute counts)."""
    if qualified not in cache:
        module, _, cls = qualified.rpartition(".")
        code = source and source.read_text("code/" + module.replace(".", "/") + ".py")
        block = code and re.search(rf"^class {re.escape(cls)}(\(.*?\))?:$(.*?)(?=^\S|\Z)", code, re.M | re.S)
        found = None
        if block:
            lists = [re.search(rf"^\s+{attr} = \[(.*?)\]", block.group(2), re.M | re.S)
                     for attr in ("__parameters__", "__buffers__")]
            names = [re.findall(r"[\"']((?:[^\"'\\]|\\.)*)[\"']", m.group(1)) if m else None for m in lists]
            is_module = block.group(1) == "(Module)" or names[0] is not None
            found = ("module", names[0] or [], names[1]) if is_module else ("class",)
        cache[qualified] = found
    return cache[qualified]


def _script_state_dict(root: _ScriptObject, source: _ZipSource | None, path: str) -> dict[str, LazyTensor]:
    """Parameters and buffers of a TorchScript module tree, named and ordered as `module.state_dict()`."""
    out: dict[str, LazyTensor] = {}
    cache: dict[str, tuple | None] = {}

    def visit(obj: _ScriptObject, prefix: str, ancestors: frozenset[int]) -> None:
        if id(obj) in ancestors or not isinstance(obj.state, Mapping):
            return  # a cycle, or an object with custom (non-dict) state
        _check_depth(ancestors, path)
        decl = _script_declarations(source, obj.qualified_name, cache)
        if decl is not None and decl[0] == "class":
            return  # a TorchScript class, not a module: state_dict() does not descend into it
        tensor_attrs = [k for k, v in obj.state.items() if isinstance(v, LazyTensor)]
        names = tensor_attrs if decl is None else decl[1] + (tensor_attrs if decl[2] is None else decl[2])
        for name in dict.fromkeys(names):
            if isinstance(obj.state.get(name), LazyTensor):
                out[prefix + str(name)] = obj.state[name]
        for key, value in obj.state.items():  # children in attribute order, like nn.Module.state_dict
            if isinstance(value, _ScriptObject):
                visit(value, f"{prefix}{key}.", ancestors | {id(obj)})

    visit(root, "", frozenset())
    return out


def _check_depth(ancestors: frozenset[int], path: str) -> None:
    if len(ancestors) > 256:
        raise ValueError(f"{path}: object tree is nested more than 256 levels deep")


def _flatten(obj: Mapping, prefix: str, out: dict[str, LazyTensor], path: str,
             ancestors: frozenset[int] = frozenset()) -> None:
    _check_depth(ancestors, path)
    for key, value in obj.items():
        if isinstance(value, LazyTensor):
            out[prefix + str(key)] = value
        elif isinstance(value, Mapping) and id(value) not in ancestors:
            _flatten(value, f"{prefix}{key}.", out, path, ancestors | {id(obj)})


def _state_dict_tensors(obj: Any, path: str, source: Any) -> dict[str, LazyTensor]:
    if isinstance(obj, _ScriptObject):
        tensors = _script_state_dict(obj, source, path)
    elif isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        tensors = {}
        _flatten(obj, "", tensors, path)
        if tensors and all(k.startswith("module.") for k in tensors):
            tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    else:
        raise ValueError(f"{path}: expected a state dict or a TorchScript module, found {type(obj).__name__}")
    if not tensors:
        raise ValueError(f"{path}: the checkpoint holds no tensors")
    return tensors


# ------------------------------------------------------------------ file formats


def _load_zip(path: str) -> dict[str, np.ndarray]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path}: truncated or corrupt zip archive ({e})") from None
    with zf:
        names = zf.namelist()
        candidates = [n for n in names if n.rpartition("/")[2] == "data.pkl" and n.count("/") <= 1]
        if not candidates:
            legacy_jit = any(n.endswith("model.json") for n in names)
            what = "a pre-1.4 TorchScript archive (model.json), which is not supported" if legacy_jit else \
                "not a PyTorch checkpoint (no data.pkl record)"
            raise ValueError(f"{path}: zip archive is {what}")
        first_root = names[0].partition("/")[0] + "/"
        record = next((n for n in candidates if n.startswith(first_root)), candidates[0])
        source = _ZipSource(zf, record[: -len("data.pkl")], path)
        order = (source.read_text("byteorder") or "little").strip()
        if order not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder record {order!r:.20}")
        obj = _unpickle(io.BytesIO(source.read_record(record)), path, source.storage)
        tensors = _state_dict_tensors(obj, path, source)
        return materialize_all(tensors, source.read, order == "big", path)


def _load_legacy(path: str) -> dict[str, np.ndarray]:
    source = _LegacySource(path)
    with open(path, "rb") as fh:
        head = fh.read(512)
        if len(head) >= 262 and head[257:262] == b"ustar":
            raise ValueError(f"{path}: the tar-based torch.save format (torch < 0.4) is not supported")
        fh.seek(0)
        try:
            magic = _unpickle(fh, path)
        except UnsafeCheckpointError:
            raise
        except ValueError:
            magic = None
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy torch.save file)")
        if _unpickle(fh, path) != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy torch.save protocol version")
        _unpickle(fh, path)  # sys_info: endianness and type sizes of the writer
        obj = _unpickle(fh, path, source.storage)
        source.locate(fh, _unpickle(fh, path), os.fstat(fh.fileno()).st_size)
    tensors = _state_dict_tensors(obj, path, None)
    return materialize_all(tensors, source.read, False, path)


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat state dict (dotted name -> numpy array, dtype preserved) of a PyTorch checkpoint, without torch.

    Reads `torch.save` zip files (a state dict, or a checkpoint dict with a "state_dict"/"model" entry; a DDP
    "module." prefix is stripped), TorchScript archives from `torch.jit.save` (names as `module.state_dict()`),
    and the legacy non-zip `torch.save` format. Raises `UnsafeCheckpointError` (a ValueError) if the pickle
    references any global outside the allowlist, and ValueError naming the file for corrupt input.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        signature = fh.read(4)
    if signature == b"PK\x03\x04" or zipfile.is_zipfile(path):
        return _load_zip(path)
    return _load_legacy(path)
