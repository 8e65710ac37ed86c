"""clipjax.interop.torch_pickle: torch-free checkpoint reading, checked against files written by real torch.

Fixtures come from tests/fixtures/make_torch_pickle_fixtures.py (run with torch); expected.json lists, per file,
the names torch itself returns after loading it, and expected.npz holds the values.
"""
from __future__ import annotations

import copyreg
import io
import json
import os
import pathlib
import pickle
import struct
import subprocess
import zipfile

import ml_dtypes
import numpy as np
import pytest

from clipjax.interop.torch_pickle import UnsafeCheckpointError, load_torch_file

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "torch_pickle"
FILES = ["state_dict.pt", "checkpoint.pt", "ddp_model.bin", "legacy.pt", "scripted.pt", "traced.pt",
         "big_endian.pt", "new_dtypes.pt"]
NAME_PREFIX = {"big_endian.pt": "be.", "new_dtypes.pt": "new."}  # how expected.npz keys those files' tensors


def _expected() -> tuple[dict, dict[str, np.ndarray]]:
    meta_path, values_path = FIXTURES / "expected.json", FIXTURES / "expected.npz"
    assert meta_path.exists() and values_path.exists(), (
        "missing fixture: run tests/fixtures/make_torch_pickle_fixtures.py in the parity environment")
    with np.load(values_path) as npz:
        return json.loads(meta_path.read_text()), {k: npz[k] for k in npz.files}


def _np_dtype(torch_name: str) -> np.dtype:
    try:
        return np.dtype(torch_name)
    except TypeError:
        return np.dtype(getattr(ml_dtypes, torch_name))


def _assert_bit_exact(name: str, got: np.ndarray, want: np.ndarray, torch_dtype: str) -> None:
    assert got.dtype == _np_dtype(torch_dtype), (name, got.dtype, torch_dtype)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    # bf16 / fp8 are stored in the npz as their exact float32 values; casting back is lossless.
    assert got.tobytes() == want.astype(got.dtype).tobytes(), name


@pytest.mark.parametrize("file_name", FILES)
def test_fixture_loads_bit_exact(file_name):
    meta, values = _expected()
    sd = load_torch_file(FIXTURES / file_name)
    names = meta["files"][file_name]
    assert list(sd) == names  # same names, same order as torch's state_dict()
    prefix = NAME_PREFIX.get(file_name, "")
    for name in names:
        _assert_bit_exact(name, sd[name], values[prefix + name], meta["dtypes"][prefix + name])
        assert sd[name].flags.c_contiguous and sd[name].flags.writeable


def test_fixture_manifest_covers_every_file():
    meta, _ = _expected()
    assert sorted(meta["files"]) == sorted(FILES)
    assert {"float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool", "uint16", "float8_e4m3fn"} <= set(
        meta["dtypes"].values())


def test_views_and_shared_storage_become_independent_arrays():
    sd = load_torch_file(FIXTURES / "state_dict.pt")
    np.testing.assert_array_equal(sd["tied_rows"], sd["tied"][1:4])  # a view at an offset into tied's storage
    assert not np.shares_memory(sd["tied_rows"], sd["tied"])
    assert sd["proj_t"].shape == (8, 6)  # saved as a transposed (column-major) parameter
    assert sd["context_length"].shape == () and sd["context_length"] == 77


def test_wrapped_checkpoints_unwrap_to_the_plain_state_dict():
    plain = load_torch_file(FIXTURES / "state_dict.pt")
    for name in ("checkpoint.pt", "ddp_model.bin"):  # {"state_dict": sd, ...} and {"model": {"module." + k: v}}
        sd = load_torch_file(FIXTURES / name)
        assert list(sd) == list(plain)
        assert all(sd[k].tobytes() == plain[k].tobytes() for k in plain)


def test_torchscript_archives_return_parameters_and_buffers_only():
    for name in ("scripted.pt", "traced.pt"):
        sd = load_torch_file(FIXTURES / name)
        assert "cache" in sd  # TorchScript keeps non-persistent buffers as buffers
        assert "plain" not in sd and "input_resolution" not in sd  # plain tensor / int attributes
        assert "blocks.1.out.weight" in sd and "blocks.1.out.bias" not in sd  # ModuleList child, bias=None


# ------------------------------------------------------------------ refusing code in pickles


class _Payload:
    """Pickles as a call of `func(*args)`: what a booby-trapped checkpoint contains."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: pathlib.Path) -> list[tuple[_Payload, str]]:
    return [
        (_Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        (_Payload(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        (_Payload(eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
        (_Payload(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
    ]


def _torch_like_zip(path: pathlib.Path, data_pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", b"\0" * 16)


def _assert_refused(path: pathlib.Path, refused: str, marker: pathlib.Path) -> None:
    with pytest.raises(UnsafeCheckpointError) as err:
        load_torch_file(path)
    message = str(err.value)
    assert str(path) in message and refused in message and "\n" not in message
    assert not marker.exists()


def test_control_payload_really_runs_when_unpickled_normally(tmp_path):
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(exec, f"open({str(marker)!r}, 'w').close()")))
    assert marker.exists()  # so the refusal tests below would notice an executed payload


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_plain_pickle_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    for i, (payload, refused) in enumerate(_payloads(marker)):
        path = tmp_path / f"evil{i}.pt"
        path.write_bytes(pickle.dumps({"weight": payload}, protocol=protocol))
        _assert_refused(path, refused, marker)


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_inside_torch_zip_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    for i, (payload, refused) in enumerate(_payloads(marker)):
        path = tmp_path / f"evil{i}.pt"
        state = {"state_dict": {"a.weight": 1.0, "b.weight": payload}, "epoch": 3}
        _torch_like_zip(path, pickle.dumps(state, protocol=protocol))
        _assert_refused(path, refused, marker)


def test_malicious_main_pickle_after_a_valid_legacy_header_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "legacy_evil.pt"
    header = [pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})]
    path.write_bytes(b"".join(header) + pickle.dumps({"w": _Payload(exec, "1")}, protocol=2))
    _assert_refused(path, "builtins.exec", marker)


def test_inst_and_extension_opcodes_go_through_the_allowlist(tmp_path):
    marker = tmp_path / "pwned"
    inst = tmp_path / "inst.pt"  # protocol-0 INST: calls os.system("touch marker") on a stock unpickler
    inst.write_bytes(b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.")
    _assert_refused(inst, "os.system", marker)
    copyreg.add_extension("os", "system", 0x7FFF0001)  # EXT4 opcode: the code is looked up in copyreg's registry
    try:
        ext = tmp_path / "ext.pt"
        command = f"touch {marker}".encode()
        ext.write_bytes(b"\x80\x02\x84\x01\x00\xff\x7fX" + struct.pack("<I", len(command)) + command + b"\x85R.")
        _assert_refused(ext, "os.system", marker)
    finally:
        copyreg.remove_extension("os", "system", 0x7FFF0001)


def test_pickled_module_objects_are_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    _torch_like_zip(path, b"\x80\x02ctorch.nn.modules.linear\nLinear\nq\x00)\x81q\x01}b.")
    _assert_refused(path, "torch.nn.modules.linear.Linear", tmp_path / "unused")


# ------------------------------------------------------------------ corrupt input


def _rewrite_zip(src: pathlib.Path, dst: pathlib.Path, edit) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


def _assert_clear_error(path: pathlib.Path, *needles: str) -> None:
    with pytest.raises(ValueError) as err:
        load_torch_file(path)
    message = str(err.value)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert str(path) in message and "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello, not a checkpoint\n")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    for name in ("empty.pt", "text.pt", "plain.pkl"):
        _assert_clear_error(tmp_path / name, "not a PyTorch checkpoint")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    _assert_clear_error(tmp_path / "other.zip", "no data.pkl")


def test_truncated_files(tmp_path):
    for name in ("state_dict.pt", "scripted.pt", "legacy.pt"):
        data = (FIXTURES / name).read_bytes()
        for keep in (len(data) // 2, len(data) - 50):
            cut = tmp_path / f"cut{keep}_{name}"
            cut.write_bytes(data[:keep])
            _assert_clear_error(cut)


def test_missing_and_short_storage_records(tmp_path):
    missing = tmp_path / "missing.pt"
    _rewrite_zip(FIXTURES / "state_dict.pt", missing, lambda n, d: None if n.endswith("/data/3") else d)
    _assert_clear_error(missing, "missing storage record", "data/3")
    short = tmp_path / "short.pt"
    _rewrite_zip(FIXTURES / "state_dict.pt", short, lambda n, d: d[:-4] if n.endswith("/data/0") else d)
    _assert_clear_error(short, "'0'", "truncated")


def test_unsupported_tensor_kinds_are_named(tmp_path):
    path = tmp_path / "quantized.pt"
    _torch_like_zip(path, b"\x80\x02ctorch._utils\n_rebuild_qtensor\nq\x00.")
    _assert_clear_error(path, "torch._utils._rebuild_qtensor", "unsupported")


# ------------------------------------------------------------------ parity with a live torch


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.detach().contiguous().numpy()


def _assert_matches_torch(ours: dict[str, np.ndarray], ref: dict) -> None:
    assert list(ours) == list(ref)
    for name, tensor in ref.items():
        want = _torch_to_numpy(tensor)
        assert ours[name].dtype == want.dtype and ours[name].shape == want.shape, name
        assert ours[name].tobytes() == want.tobytes(), name


@pytest.mark.parity
def test_parity_random_module_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    rng = np.random.default_rng(0)
    torch.manual_seed(int(rng.integers(1 << 30)))
    width = int(rng.integers(3, 12))

    class Random(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width))
            self.layers = nn.ModuleList([nn.Linear(width, width), nn.LayerNorm(width)])
            self.embed = nn.Embedding(7, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stem(x)  # [B, W, H', W']

    model = Random()
    model.layers[0].half()
    model.embed.to(torch.bfloat16)
    view = model.stem[0].weight.data[1:, :, ::2].transpose(0, 2)  # offset + step + transpose into conv's storage
    model.register_buffer("view", view)
    model.register_buffer("count", torch.randint(-(2**40), 2**40, (5,)))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(model), tmp_path / "script.pt")
    sd = model.state_dict()
    _assert_matches_torch(load_torch_file(tmp_path / "sd.pt"), torch.load(tmp_path / "sd.pt", weights_only=True))
    _assert_matches_torch(load_torch_file(tmp_path / "legacy.pt"), sd)
    _assert_matches_torch(load_torch_file(tmp_path / "script.pt"), torch.jit.load(tmp_path / "script.pt").state_dict())


@pytest.mark.parity
def test_parity_traced_fp16_open_clip_model(tmp_path):
    """A tiny fp16 CLIP traced to TorchScript, the form of OpenAI's released checkpoints."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(16, CLIPVisionCfg(layers=1, width=32, patch_size=8, image_size=16, head_width=16),
                 CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1), quick_gelu=True).eval()
    open_clip.model.convert_weights_to_lp(model)
    image, text = torch.ones(1, 3, 16, 16).half(), torch.zeros(1, 8, dtype=torch.int)
    traced = torch.jit.trace_module(model, {"forward": (image, text), "encode_text": (text,),
                                            "encode_image": (image,)}, check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    (tmp_path / "clip.pt").write_bytes(buf.getvalue())
    ours = load_torch_file(tmp_path / "clip.pt")
    _assert_matches_torch(ours, torch.jit.load(tmp_path / "clip.pt").state_dict())
    assert ours["visual.conv1.weight"].dtype == np.float16 and ours["logit_scale"].dtype == np.float32


# ------------------------------------------------------------------ files that would allocate far more than their size
# Hand-written pickles (no torch needed): a state dict {name: torch._utils._rebuild_tensor_v2(storage, offset, size,
# stride, False, OrderedDict())}, the storage a persistent id ("storage", torch.FloatStorage, key, "cpu", numel).


def _op(value) -> bytes:
    """The opcodes that push `value` (an int, str or tuple of them), without PROTO and STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _tensor(key: str, numel: int, offset: int, size: tuple, stride: tuple, *, legacy: bool = False) -> bytes:
    """Opcodes that push one rebuilt float32 tensor viewing storage `key` (of `numel` elements)."""
    pid = _op("storage") + _global("torch", "FloatStorage") + _op(key) + _op("cpu") + _op(numel)
    pid = b"(" + pid + (_op(None) if legacy else b"") + b"tQ"
    args = pid + _op(offset) + _op(tuple(size)) + _op(tuple(stride)) + b"\x89" + _global("collections", "OrderedDict")
    return _global("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b")Rt" + b"R"


def _state_dict_pickle(tensors: dict[str, bytes]) -> bytes:
    return b"\x80\x02}(" + b"".join(_op(name) + ops for name, ops in tensors.items()) + b"u."


def _zip_checkpoint(path: pathlib.Path, data_pkl: bytes, storages: dict[str, bytes],
                    compression: int = zipfile.ZIP_STORED) -> pathlib.Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def _legacy_checkpoint(path: pathlib.Path, data_pkl: bytes, storages: dict[str, np.ndarray]) -> pathlib.Path:
    header = [pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})]
    body = b"".join(struct.pack("<q", a.size) + a.astype("<f4").tobytes() for a in storages.values())
    path.write_bytes(b"".join(header) + data_pkl + pickle.dumps(list(storages), protocol=2) + body)
    return path


def _assert_unsafe(path: pathlib.Path, *needles: str) -> None:
    with pytest.raises(UnsafeCheckpointError) as err:
        load_torch_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_hand_written_checkpoints_load_when_views_are_plain(tmp_path):
    """The control for the refusals below: the same kind of file with honest views loads, in both formats."""
    values = np.arange(12, dtype=np.float32)
    views = {"w": _tensor("0", 12, 0, (3, 4), (4, 1)), "t": _tensor("0", 12, 0, (4, 3), (1, 4)),
             "rows": _tensor("0", 12, 4, (2, 4), (4, 1)), "step": _tensor("0", 12, 1, (3, 2), (4, 2))}
    zipped = _zip_checkpoint(tmp_path / "ok.pt", _state_dict_pickle(views), {"0": values.tobytes()})
    legacy_views = {"w": _tensor("0", 12, 0, (3, 4), (4, 1), legacy=True),
                    "step": _tensor("0", 12, 1, (3, 2), (4, 2), legacy=True)}
    legacy = _legacy_checkpoint(tmp_path / "ok_legacy.pt", _state_dict_pickle(legacy_views)[2:], {"0": values})
    sd = load_torch_file(zipped)
    grid = values.reshape(3, 4)
    np.testing.assert_array_equal(sd["w"], grid)
    np.testing.assert_array_equal(sd["t"], grid.T)
    np.testing.assert_array_equal(sd["rows"], grid[1:])
    np.testing.assert_array_equal(sd["step"], grid[:, 1::2])
    old = load_torch_file(legacy)
    np.testing.assert_array_equal(old["w"], grid)
    np.testing.assert_array_equal(old["step"], grid[:, 1::2])


@pytest.mark.parametrize("legacy", [False, True])
def test_expanded_view_of_a_tiny_storage_is_refused(tmp_path, legacy):
    """Stride 0: 5 Mi float32 elements (20 MiB, over the allowance for a file of a few hundred bytes) repeating one
    stored element — the shape of a file that asks for gigabytes."""
    n = 5 << 20
    pkl = _state_dict_pickle({"big": _tensor("0", 1, 0, (n,), (0,), legacy=legacy)})
    if legacy:
        path = _legacy_checkpoint(tmp_path / "expand.pt", pkl[2:], {"0": np.ones(1, np.float32)})
    else:
        path = _zip_checkpoint(tmp_path / "expand.pt", pkl, {"0": np.ones(1, np.float32).tobytes()})
    assert path.stat().st_size < 1000
    _assert_unsafe(path, "'big'", "expanded view")


def test_overlapping_view_is_refused(tmp_path):
    """A sliding-window view (size (N, N), stride (1, 1)) of N + N - 1 elements holds N² of them."""
    n = 3000
    pkl = _state_dict_pickle({"window": _tensor("0", 2 * n - 1, 0, (n, n), (1, 1))})
    path = _zip_checkpoint(tmp_path / "window.pt", pkl, {"0": np.zeros(2 * n - 1, np.float32).tobytes()})
    _assert_unsafe(path, "'window'", "overlapping view")


def test_view_past_the_end_of_its_storage_is_refused(tmp_path):
    pkl = _state_dict_pickle({"ok": _tensor("0", 4, 0, (4,), (1,)), "long": _tensor("0", 4, 2, (4,), (1,))})
    path = _zip_checkpoint(tmp_path / "long.pt", pkl, {"0": np.zeros(4, np.float32).tobytes()})
    _assert_unsafe(path, "'long'", "storage '0' holds 16")


def test_tensors_sharing_one_storage_are_capped_by_the_file_size(tmp_path):
    """40 full views of one 1 MiB storage: 40 MiB from a 1 MiB file (over 2 x 1 MiB + 16 MiB)."""
    n = 1 << 18
    views = {f"copy{i}": _tensor("0", n, 0, (n,), (1,)) for i in range(40)}
    path = _zip_checkpoint(tmp_path / "shared.pt", _state_dict_pickle(views),
                           {"0": np.zeros(n, np.float32).tobytes()})
    _assert_unsafe(path, "bytes, more than 2 x the file's")


def test_compressed_records_cannot_inflate_past_the_allowance(tmp_path):
    """A deflated zip member of 64 MiB of zeros is ~64 KiB on disk: neither a storage nor data.pkl may inflate
    past the allowance (torch itself never compresses)."""
    n = 16 << 20
    pkl = _state_dict_pickle({"zeros": _tensor("0", n, 0, (n,), (1,))})
    bomb = _zip_checkpoint(tmp_path / "bomb.pt", pkl, {"0": bytes(4 * n)}, zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1 << 20
    _assert_unsafe(bomb, "'zeros'", "storage '0'")
    big_pickle = b"\x80\x02}(" + _op("pad") + _op("x" * (40 << 20)) + b"u."
    pkl_bomb = _zip_checkpoint(tmp_path / "pkl_bomb.pt", big_pickle, {}, zipfile.ZIP_DEFLATED)
    _assert_unsafe(pkl_bomb, "data.pkl", "inflates")


def test_bytearray_from_a_length_is_refused(tmp_path):
    """`bytearray(n)` is an allowed global (protocol-2 pickles of bytes use it); called with a length it would
    allocate n bytes from a file of a few dozen."""
    path = tmp_path / "alloc.pt"
    path.write_bytes(b"\x80\x02}(" + _op("blob") + _global("__builtin__", "bytearray") + _op((64 << 20,)) + b"Ru.")
    _assert_unsafe(path, "bytearray")
