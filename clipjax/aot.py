"""Will it fit? Compile the trainer's step for a pod before renting it:

    python -m clipjax.aot --config=configs/vit_l14.py --topology=v5e:16x16 [--num_slices=2] [--config.key=value ...]
                          [--save_executable=PATH]

The same flags and config overrides as `python -m clipjax.main`. The step compiled is the trainer's own
(`clipjax.train.jit_train_step` on the mesh of `clipjax.train.make_train_mesh`, with the state of
`clipjax.step.abstract_train_state`), built for compile-only devices of the topology: the real TPU compiler lowers,
partitions and sizes it on this machine, with no TPU (`pip install "clipjax[tpu]"` brings the compiler, libtpu).
The batch is the one the data pipeline gives (uint8 images, int32 tokens or labels), so a recipe without data
compiles as it will run on its data.

Prints progress, then as the last stdout line one JSON object: topology, num_slices, chips, device_kind, mesh,
global_batch, compile_s, bytes_per_chip {arguments, temporaries, outputs, aliased}, bytes_per_chip_total (arguments +
temporaries + outputs − aliased: outputs that reuse a donated argument's memory count once), hbm_bytes_per_chip,
fits (total ≤ 90 % of HBM), total_argument_bytes (the whole state and batch, unsharded), collectives (counts in the
compiled program), cross_slice (the collectives whose groups span slices, with their bytes) and model_flops_per_step.
A program that does not fit ends with one `error:` line and exit status 2.

`--topology=local` compiles for this process's own devices (with `--local_device_count=N`, N simulated CPU devices).
`--save_executable=PATH` writes the compiled step; `python -m clipjax.main --compiled=PATH` runs it instead of
compiling, after checking that it was made for these devices, this config and this jax / libtpu (one line if not).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any

import numpy as np

from clipjax.executable import AotError, abstract_batch, save_executable, versions

log = logging.getLogger(__name__)

FIT_FRACTION = 0.9  # a program fits when it needs at most this share of a chip's memory
GiB = 1 << 30
# HBM per chip by the device kind JAX reports (compile-only devices report no memory statistics)
HBM_BYTES = {
    "TPU v2": 8 * GiB,
    "TPU v3": 16 * GiB,
    "TPU v4": 32 * GiB,
    "TPU v4 lite": 8 * GiB,
    "TPU v5 lite": 16 * GiB,  # v5e
    "TPU v5": 95 * GiB,  # v5p
    "TPU v6 lite": 32 * GiB,  # v6e (Trillium)
}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


# ============================================================================================ devices

def topology_devices(name: str, num_slices: int = 1) -> list[Any]:
    """Compile-only devices of a TPU topology such as "v5e:16x16" (`num_slices` copies of it), or this process's
    devices for "local"."""
    import jax

    if num_slices < 1:
        raise AotError(f"--num_slices={num_slices}: must be a positive integer")
    if name == "local":
        if num_slices != 1:
            raise AotError("--topology=local has one slice; simulate slices with --config.mesh.slices=K")
        return list(jax.devices())
    try:
        import libtpu  # noqa: F401  (the TPU compiler; not a dependency of the default install)
    except ImportError:
        raise AotError(f"--topology={name}: compiling for a TPU needs libtpu: pip install 'clipjax[tpu]' (or "
                       f"'jax[tpu]')") from None
    from jax.experimental import topologies

    for key, value in (("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_SKIP_MDS_QUERY", "1"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):  # compiling only: no metadata server, no chip to lock
        os.environ.setdefault(key, value)
    kw = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kw).devices)
    except Exception as e:  # noqa: BLE001  (JaxRuntimeError INVALID_ARGUMENT / NOT_FOUND from libtpu)
        msg = str(e).split("\n")[0]
        raise AotError(f"--topology={name}: not a TPU topology libtpu knows ({msg}); e.g. v5e:16x16, v5p:8x8x8, "
                       f"v6e:8x16, v4:4x4x8") from None


def hbm_bytes(device: Any) -> int | None:
    """A chip's memory: as the runtime reports it, else the table of known chips; host memory for a CPU device."""
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
        if limit:
            return int(limit)
    except Exception:  # noqa: BLE001  (compile-only devices report nothing)
        pass
    if device.platform == "cpu":
        import jax

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, len(jax.local_devices()))
    return HBM_BYTES.get(device.device_kind)


# ============================================================================================ the program

@dataclasses.dataclass
class Program:
    """The trainer's step for a config on some devices, lowered (not yet compiled)."""
    config: Any
    cfg: Any
    mesh: Any
    lowered: Any
    global_batch: int
    flops: float
    total_argument_bytes: int
    processes: int
    state: Any = None  # the abstract train state (ShapeDtypeStructs with their shardings)


def lower(config: Any, devices: list[Any]) -> Program:
    """Lower the trainer's step of `config` (a checked copy is made) for `devices`."""
    import jax

    from clipjax import train as tr
    from clipjax.metrics import train_flops_per_step
    from clipjax.models.clip import CLIP
    from clipjax.step import abstract_train_state
    from clipjax.tasks import task_class

    config = tr.check_config(config)
    mesh = tr.make_train_mesh(config, devices)
    task_type = task_class(config)
    task_type.check(config)  # an unknown loss is one line before anything is built
    if not config.model.name and not config.model.open_clip_config:
        raise tr.ConfigError("config.model.name is empty: name the architecture to compile (the weights of "
                             "config.init_from are not read ahead of time)")
    cfg = tr._from_config("config.model", tr.model_config, config)
    phase = tr.make_phases(config, cfg)[0]
    num_classes = tr._from_config("config.data", task_type.from_config, config, cfg).num_classes  # classify: names
    model = CLIP(cfg)
    state, shardings, tx = tr._from_config(
        "config", abstract_train_state, model, lambda p: tr._from_config("config.frozen", tr.make_tx, config, p),
        mesh, num_classes)
    processes = len({d.process_index for d in devices})
    batch = abstract_batch(config, mesh, phase.image_size, phase.context_length, stop_flags=processes > 1)
    step = tr.jit_train_step(model, tx, config, mesh, shardings, stop_flags=processes > 1,
                             fields={k: v.ndim for k, v in batch.items() if k != "stop"},
                             patch_dropout=phase.patch_dropout)
    lowered = step.lower(state, batch)
    phase_cfg, kept = tr._phase_config(cfg, phase)
    total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves((state, batch)))
    return Program(config, cfg, mesh, lowered, int(config.batch_size),
                   train_flops_per_step(phase_cfg, int(config.batch_size), kept), int(total), processes, state)


# ============================================================================================ the compiled program

_GROUPS = re.compile(r"replica_groups=(\{[{}0-9, ]*\}|\[[0-9,]+\]<=\[[0-9,]+\](?:T\([0-9,]+\))?)")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(([^)]*\)?)\))? \{([^}]*)\}")
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_PAIRS = re.compile(r"source_target_pairs=\{([{}0-9, ]*)\}")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([0-9,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8}


def _iota(text: str) -> np.ndarray:
    """An HLO iota list "[a,b]<=[dims]T(perm)" (or "[dims]T(perm)") as an array of shape [a, b]."""
    m = re.match(r"(?:\[([0-9,]+)\]<=)?\[([0-9,]+)\](?:T\(([0-9,]+)\))?", text.strip())
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape([int(x) for x in m.group(1).split(",")]) if m.group(1) else ids


def _groups(text: str) -> list[list[int]]:
    """Device groups of an HLO `replica_groups=` value: explicit {{0,1},{2,3}} or iota [G,S]<=[dims]T(perm)."""
    if text.startswith("{"):
        return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([0-9, ]*)\}", text[1:-1])]
    return _iota(text).tolist()


def _mesh_groups(axes: str, device_ids: str | None, over: str) -> list[list[int]]:
    """Device groups of `replica_groups=mesh['a'=4,'b'=2], device_ids=(…) {'a'}`: devices that differ only along
    the named axes."""
    names, sizes = zip(*((k.strip().strip("'"), int(v)) for k, v in (a.split("=") for a in axes.split(","))))
    n = math.prod(sizes)
    if not device_ids:
        ids = np.arange(n)
    elif "[" in device_ids:
        ids = _iota(device_ids)
    else:
        ids = np.array([int(x) for x in device_ids.split(",") if x.strip()])
    ids = ids.reshape(sizes)
    along = [names.index(a.strip().strip("'")) for a in over.split(",") if a.strip()]
    rest = [i for i in range(len(names)) if i not in along]
    return ids.transpose(rest + along).reshape(-1, math.prod(sizes[i] for i in along) if along else 1).tolist()


def _result_bytes(line: str, op: str) -> int:
    """Bytes an HLO collective moves per device: the arrays of its result type (the text between '=' and the op); an
    async all-gather or permute's result pairs input and output, so only the larger counts."""
    head = line.split("=", 1)[1].split(f" {op}", 1)[0]
    sizes = [_ITEMSIZE[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(head)]
    if f"{op}-start(" in line and op in ("all-gather", "collective-permute"):
        return max(sizes, default=0)
    return sum(sizes)


def collectives(hlo: str, slice_of: Any = None) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Counts of each collective in compiled HLO text (an async pair counts once), and, given `slice_of` (partition
    id → slice), the traffic between slices: {op: {"count", "bytes"}}, bytes per device summed over instructions. A
    TPU multi-slice program keeps its collectives inside a slice and sends over the data-centre network with
    `send` instructions marked with the collective they serve (counted here by that collective); elsewhere a
    collective crosses slices when one of its device groups spans them."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    cross: dict[str, dict[str, int]] = {}
    op_re = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for line in hlo.splitlines():
        dcn = _MEGASCALE.search(line) if " send(" in line else None
        if dcn is not None and slice_of is not None:  # a TPU multi-slice program: the data-centre network's transfers
            entry = cross.setdefault(dcn.group(1).lower().replace("_", "-"), {"count": 0, "bytes": 0})
            entry["count"] += 1
            payload = _SHAPE.search(line.split("=", 1)[1])
            entry["bytes"] += _ITEMSIZE[payload.group(1)] * math.prod(int(d) for d in payload.group(2).split(",") if d)
            continue
        m = op_re.search(line)
        if not m or "=" not in line.split(m.group(0))[0]:
            continue
        op = m.group(1)
        counts[op] += 1
        if slice_of is None:
            continue
        if op == "collective-permute":
            p = _PAIRS.search(line)
            groups = _groups("{" + p.group(1) + "}") if p else []
        elif (g := _MESH_GROUPS.search(line)) is not None:
            groups = _mesh_groups(*g.groups())
        elif (g := _GROUPS.search(line)) is not None:
            groups = _groups(g.group(1))
        else:  # no groups: all devices
            groups = [[0, -1]]
        if any(len({slice_of(i) for i in group}) > 1 for group in groups):
            entry = cross.setdefault(op, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += _result_bytes(line, op)
    return counts, cross


_EXHAUSTED = re.compile(r"([0-9.]+)([KMGT]?)\)? exceeds available HBM \(?([0-9.]+)([KMGT]?)")
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _needed_from_error(message: str) -> tuple[int | None, int | None]:
    """(bytes needed, bytes available) from the TPU compiler's RESOURCE_EXHAUSTED message, where it says them."""
    m = _EXHAUSTED.search(message)
    if not m:
        return None, None
    return int(float(m.group(1)) * _UNIT[m.group(2)]), int(float(m.group(3)) * _UNIT[m.group(4)])


def report(program: Program, topology: str, num_slices: int, devices: list[Any]) -> tuple[dict[str, Any], Any]:
    """Compile `program` and describe it (see the module docstring); returns (report, compiled or None)."""
    mesh = program.mesh
    out: dict[str, Any] = {
        "topology": topology, "num_slices": num_slices, "chips": len(devices), "device_kind": devices[0].device_kind,
        "processes": program.processes, "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "global_batch": program.global_batch, "model": program.config.model.name,
        "dtype": program.config.model.dtype, "remat": program.config.model.remat,
        "accum_steps": int(program.config.accum_steps), **versions()}
    hbm = hbm_bytes(devices[0])
    t0 = time.perf_counter()
    try:
        compiled = program.lowered.compile()
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError RESOURCE_EXHAUSTED: the program does not fit)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        needed, available = _needed_from_error(str(e))
        out.update(compile_s=round(time.perf_counter() - t0, 1), bytes_per_chip=None, bytes_per_chip_total=needed,
                   hbm_bytes_per_chip=hbm, fits=False, compiler_error=str(e).split("\n")[0][:400],
                   total_argument_bytes=program.total_argument_bytes, collectives=None,
                   model_flops_per_step=program.flops)
        return out, None
    out["compile_s"] = round(time.perf_counter() - t0, 1)
    mem = compiled.memory_analysis()
    per_chip = {"arguments": int(mem.argument_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
                "outputs": int(mem.output_size_in_bytes), "aliased": int(mem.alias_size_in_bytes)}
    total = per_chip["arguments"] + per_chip["temporaries"] + per_chip["outputs"] - per_chip["aliased"]
    per_slice = len(devices) // mesh.shape["slice"]
    counts, cross = collectives(compiled.as_text(), (lambda p: p // per_slice) if mesh.shape["slice"] > 1 else None)
    out.update(bytes_per_chip=per_chip, bytes_per_chip_total=total, hbm_bytes_per_chip=hbm,
               fits=None if hbm is None else total <= FIT_FRACTION * hbm,
               total_argument_bytes=program.total_argument_bytes, collectives=counts,
               model_flops_per_step=program.flops)
    if mesh.shape["slice"] > 1:
        out["cross_slice"] = cross
    return out, compiled


def refusal(config_name: str, out: dict[str, Any]) -> str:
    """The one line for a program that does not fit."""
    need, hbm = out.get("bytes_per_chip_total"), out.get("hbm_bytes_per_chip")
    amount = (f"needs {'at least ' if out.get('compiler_error') else ''}{need / GiB:.2f} GiB per chip" if need else "needs more memory than a chip has") + (
        f", {hbm / GiB:.2f} GiB available (fits at ≤ {FIT_FRACTION:.0%})" if hbm else "")
    per_chip = out["global_batch"] // out["chips"]
    return (f"{config_name} does not fit {out['topology']} ({out['chips']} chips × {out['device_kind']}): {amount}; try "
            f"a remat policy that keeps fewer activations (--config.model.remat=full; now {out['remat']!r}), a smaller per-chip batch "
            f"(now {per_chip}: --config.accum_steps=2 halves the activations, or lower --config.batch_size), or more "
            f"chips (a larger topology or --num_slices)")


# ============================================================================================ command line

def main(argv: list[str]) -> None:
    del argv
    from clipjax import main as cli_main
    from clipjax.cli import fail

    cli_main._check_launch_flags()
    if cli_main._LOCAL_DEVICES.value:
        flags_env = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags_env} --xla_force_host_platform_device_count={cli_main._LOCAL_DEVICES.value}"
    if cli_main._CONFIG.value is None:
        fail("--config is required (e.g. --config=configs/vit_b32.py)")
    if not _TOPOLOGY.value:
        fail("--topology is required (e.g. --topology=v5e:16x16, or local for this host's devices)")
    if _TOPOLOGY.value != "local":  # compile-only TPU devices: no TPU backend here, no cloud metadata server to ask,
        for key, value in (("JAX_PLATFORMS", "cpu"), ("TPU_WORKER_HOSTNAMES", "localhost"),  # and no chip to lock
                           ("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
            os.environ.setdefault(key, value)
    import jax

    from clipjax import compile_cache

    compile_cache.enable("off")  # a cached executable would hide the compile time (and cannot be serialised)
    config = cli_main._CONFIG.value
    name = os.path.basename(str(_CONFIG_NAME or "the config"))
    try:
        devices = topology_devices(_TOPOLOGY.value, _NUM_SLICES.value)
        what = f"{_TOPOLOGY.value}{f' × {_NUM_SLICES.value} slices' if _NUM_SLICES.value > 1 else ''}"
        print(f"tracing the train step of {name} for {what} ({len(devices)} chips)…", flush=True)
        program = lower(config, devices)
        print(f"compiling for {what} ({len(devices)} chips, mesh "
              f"{ {k: int(v) for k, v in program.mesh.shape.items()} })…", flush=True)
        out, compiled = report(program, _TOPOLOGY.value, _NUM_SLICES.value, devices)
    except cli_main._user_errors() + (AotError,) as e:
        if os.environ.get("CLIPJAX_DEBUG"):
            raise
        fail(str(e))
    del jax
    print(json.dumps(out), flush=True)
    if out["fits"] is False:
        fail(refusal(name, out))
    if _SAVE.value:
        try:
            save_executable(_SAVE.value, compiled, program, devices, _TOPOLOGY.value)
        except (OSError, ValueError, NotImplementedError) as e:
            fail(f"--save_executable={_SAVE.value}: {e}")
        log.info("compiled step written to %s", _SAVE.value)


_CONFIG_NAME: str | None = None


def _define_flags() -> tuple[Any, Any, Any]:
    from absl import flags

    from clipjax import main as cli_main  # noqa: F401  (defines --config, --local_device_count, … as clipjax.main)

    return (flags.DEFINE_string("topology", None, "TPU topology to compile for, e.g. v5e:16x16, v5p:4x4x4, v6e:8x8; "
                                "'local' for this process's devices."),
            flags.DEFINE_integer("num_slices", 1, "Slices of that topology (multi-slice: data parallel across them)."),
            flags.DEFINE_string("save_executable", None, "Write the compiled step here (for clipjax.main --compiled)."))


_TOPOLOGY = _NUM_SLICES = _SAVE = None  # defined by `run` (importing this module defines no flags)


def run() -> None:
    global _CONFIG_NAME, _TOPOLOGY, _NUM_SLICES, _SAVE
    from absl import app

    _TOPOLOGY, _NUM_SLICES, _SAVE = _define_flags()

    from clipjax import main as cli_main
    from clipjax.cli import quiet_storage_clients

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    quiet_storage_clients()
    _CONFIG_NAME = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")), None)
    if any(a in cli_main._HELP_FLAGS for a in sys.argv[1:]):
        try:
            app.run(main)
        except SystemExit as e:
            sys.exit(0 if e.code == 1 else e.code)
    cli_main._check_repeated_flags(sys.argv[1:])
    cli_main._check_overrides(sys.argv[1:])
    app.run(main, flags_parser=cli_main._parse_flags)


if __name__ == "__main__":
    run()
