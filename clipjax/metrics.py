"""Metrics: one JSON object per logged step in `metrics.jsonl`, the same scalars as TensorBoard events, a progress
line with rate and ETA, and analytic training FLOPs for MFU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
import time
import uuid
from typing import Any

from clipjax import paths
from clipjax.models.config import CLIPConfig

log = logging.getLogger(__name__)


class MetricWriter:
    """Append-only JSONL + TensorBoard writer (only process 0 writes).

    In an object store (gs://, s3://), which cannot append, metrics.jsonl is kept in memory (read once) and written
    whole after every row, as one object (a reader sees the previous rows or the new ones, never a torn file);
    TensorBoard events are written to a local staging directory and their files uploaded to `WORKDIR/tensorboard/`
    after every row. A failed upload is retried with the next row."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.path = paths.as_path(workdir) / "metrics.jsonl"
        self._remote = paths.is_remote(self.path)
        self._lines: list[str] | None = None  # in an object store: the rows of metrics.jsonl, once read
        self._tb = None
        self._tb_staging: pathlib.Path | None = None
        tb_dir = self.path.parent / "tensorboard"
        if enabled and self._remote:
            self._tb_staging = pathlib.Path(tempfile.mkdtemp(prefix="clipjax-tensorboard-"))
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                # in a store, a suffix keeps two writers of the same second from replacing each other's file
                suffix = f".{uuid.uuid4().hex[:8]}" if self._remote else ""
                self._tb = SummaryWriter(str(self._tb_staging or tb_dir), filename_suffix=suffix)
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                log.warning("tensorboardX not installed: no TensorBoard events")

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _py(v) for k, v in scalars.items()}}
        if self._remote:
            self._remote_lines().append(json.dumps(row) + "\n")
            paths.write_object(self.path, "".join(self._lines))
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
            self._upload_events()

    def truncate_after(self, step: int) -> int:
        """Drop the rows of steps after `step` (a resumed run writes them again; step 0 too when starting over), so a
        crash between a log line and its checkpoint leaves no duplicate rows. Atomic; returns the lines removed (rows
        dropped and damaged lines, which are kept in a copy)."""
        if not self.enabled:
            return 0
        if self._remote:
            lines = list(self._remote_lines())
        elif not self.path.is_file():
            return 0
        else:
            lines = self.path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
        damaged = [i + 1 for i, line in enumerate(lines) if _row(line) is None and line.strip()]
        kept = [line for line in lines if _row_step(line) is None or _row_step(line) < step
                or (_row_step(line) == step and step > 0)]
        kept = [line for line in kept if line.strip() and _row(line) is not None]
        if kept and not kept[-1].endswith("\n"):  # a last row cut at its newline: the next row must not join it
            kept[-1] += "\n"
        removed = len([line for line in lines if line.strip()]) - len(kept)  # the damaged lines too (kept in a copy)
        dropped = removed - len(damaged)
        if damaged:  # a row cut short (a run killed while writing it) or garbled: keep the file as it was
            copy = keep_damaged_copy(self.path, paths.read_bytes(self.path))
            log.warning("%s: line %s cannot be read (cut short or garbled); kept the %d readable rows up to step %d "
                        "(the file as it was is kept as %s)", self.path, ", ".join(map(str, damaged)), len(kept), step,
                        copy.name)
        if kept != lines:
            self._replace(kept)
        if dropped:
            log.info("%s: dropped %d rows after step %d (written again on resume)", self.path, dropped, step)
        return removed

    def _replace(self, lines: list[str]) -> None:
        """metrics.jsonl holding exactly `lines`, atomically (a temporary file renamed; in a store, one object)."""
        paths.write_text(self.path, "".join(lines))
        if self._remote:
            self._lines = list(lines)

    def _remote_lines(self) -> list[str]:
        """The rows of metrics.jsonl in the object store, read on first use (none when it does not exist yet)."""
        if self._lines is None:
            with paths.storage_errors(self.path, "read"):
                exists = self.path.exists()
            text = paths.read_bytes(self.path).decode("utf-8", errors="replace") if exists else ""
            self._lines = text.splitlines(keepends=True)  # a garbled line is dropped by truncate_after
        return self._lines

    def _upload_events(self) -> None:
        """The staged TensorBoard event files, uploaded whole to WORKDIR/tensorboard/ (object stores only)."""
        if self._tb_staging is not None:
            paths.upload_dir(self._tb_staging, self.path.parent / "tensorboard")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._tb_staging is not None:
            try:
                self._upload_events()
            except paths.StorageError as e:  # events are a log, not state: the run's end is not a failure
                log.warning("TensorBoard events not uploaded: %s", e)
            finally:
                shutil.rmtree(self._tb_staging, ignore_errors=True)
                self._tb_staging = None


def _row(line: str) -> dict[str, Any] | None:
    """The row of one line of metrics.jsonl; None when it is not one (a line cut short, garbled, or empty)."""
    try:
        row = json.loads(line)
        int(row["step"])
    except (ValueError, KeyError, TypeError):
        return None
    return row


def _row_step(line: str) -> int | None:
    row = _row(line)
    if row is None:  # a torn last line of a killed run: dropped with the later rows
        return None if not line.strip() else 1 << 62
    return int(row["step"])


def keep_damaged_copy(path: paths.Path, data: bytes) -> paths.Path:
    """`data` (a damaged workdir file's bytes) written whole beside `path` as `<name>.damaged-<time>`, before `path`
    is rewritten; returns that path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    copy, n = path.parent / f"{path.name}.damaged-{stamp}", 1
    while paths.exists(copy):
        copy, n = path.parent / f"{path.name}.damaged-{stamp}-{n}", n + 1
    if paths.is_remote(copy):
        paths.write_object(copy, data)
    else:
        copy.write_bytes(data)
    return copy


def _py(v: Any) -> Any:
    try:
        return float(v) if not isinstance(v, (str, bool, int)) else v
    except (TypeError, ValueError):
        return str(v)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of `workdir`'s metrics.jsonl (local or in an object store); [] when there is none.
    A line that is not a row (cut short by a killed run, garbled) is skipped with a warning naming it."""
    path = paths.as_path(workdir) / "metrics.jsonl"
    if not (paths.exists(path) if paths.is_remote(path) else path.is_file()):
        return []
    lines = paths.read_bytes(path).decode("utf-8", errors="replace").splitlines()
    out, damaged = [], []
    for i, line in enumerate(lines):
        row = _row(line)
        if row is not None:
            out.append(row)
        elif line.strip():
            damaged.append(i + 1)
    if damaged:
        log.warning("%s: skipped line %s, which cannot be read (cut short or garbled); read the other %d rows", path,
                    ", ".join(map(str, damaged)), len(out))
    return out


class Progress:
    """Periodic progress line: step, rate, ETA, and the latest scalars.

    The rate and the ETA are measured from the first line on: the steps before it include compiling the train step
    (minutes for a large model), which no later step repeats. The first line shows neither; it says how long its
    steps took instead, and leaves out the scalars measured per second (`*per_sec`), which include the compilation
    too."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total = total_steps
        self.start_step = start_step
        self.t_start = time.perf_counter()
        self.t0: float | None = None  # the time of the first line, and its step: where the rate is measured from
        self.step0 = start_step

    def line(self, step: int, scalars: dict[str, float]) -> str:
        now = time.perf_counter()
        head = f"step {step}/{self.total} ({100 * step / self.total:.0f}%)"
        if self.t0 is None or step <= self.step0 or now <= self.t0:
            first = self.t0 is None
            self.t0, self.step0 = now, step
            shown = _scalars({k: v for k, v in scalars.items() if not k.endswith("per_sec")})
            took = f" (first {'step' if step - self.start_step == 1 else 'steps'}, compilation included: " \
                   f"{now - self.t_start:.1f} s)" if first else ""
            return f"{head}{took} {shown}".rstrip()
        rate = (step - self.step0) / (now - self.t0)
        eta = (self.total - step) / rate
        return f"{head} {rate:.2f} steps/s ETA {_hms(eta)} {_scalars(scalars)}".rstrip()


def _scalars(scalars: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in scalars.items() if isinstance(v, float))


def final_scores(last: dict[str, Any]) -> dict[str, float]:
    """What a run ends with, from its last logged metrics: the training loss (and accuracy, when fine-tuning) and
    the evaluation results (`<type>/<name>/<metric>`, `eval/<metric>`)."""
    keys = [k for k in ("loss", "accuracy") if k in last]
    keys += [k for k in last if "/" in k and not k.startswith("data_skipped")]
    return {k: float(last[k]) for k in keys if isinstance(last[k], (int, float)) and not isinstance(last[k], bool)}


def final_line(workdir: str | os.PathLike, step: int | None, total: int, files: list[str],
               last: dict[str, Any]) -> str:
    """The last line of a run: its step, its workdir as given with the files in it named relative to it, and its
    final scores (`final_scores`)."""
    scores = final_scores(last)
    shown = "; " + " ".join(f"{k}={v:.4g}" for k, v in scores.items()) if scores else ""
    return f"done: step {step} of {total} in {workdir} ({', '.join(files)}){shown}"


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---- analytic FLOPs (matmuls and convolutions; 2 FLOPs per multiply-add) ------------------------------------------
# Checked against the dot_general/convolution FLOPs of the traced train step (experiments/bench_train.py records
# both): equal to < 0.01 %. Causal attention is counted in full: both clipjax and open_clip compute all L×L scores
# and mask them. XLA's `cost_analysis` counts ~2-3 % more (it adds element-wise ops).

def _transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    d, l = width, tokens
    per_layer = 2 * l * d * 3 * d + 2 * l * d * d + 2 * 2 * l * d * int(d * mlp_ratio)  # qkv, out, mlp
    attn = 2 * 2 * l * l * d  # scores + weighted sum
    return layers * (per_layer + attn)


def _conv(out_side: int, cin: int, cout: int, k: int) -> float:
    return 2.0 * out_side * out_side * cin * cout * k * k


def _resnet_flops(cfg: CLIPConfig) -> float:
    v = cfg.vision
    s, w = v.image_size, v.width
    total = 0.0
    side = s // 2
    total += _conv(side, 3, w // 2, 3) + _conv(side, w // 2, w // 2, 3) + _conv(side, w // 2, w, 3)
    side //= 2
    inplanes = w
    for stage, depth in enumerate(v.layers):
        planes = w * 2 ** stage
        for i in range(depth):
            stride = 2 if (stage > 0 and i == 0) else 1
            total += _conv(side, inplanes, planes, 1) + _conv(side, planes, planes, 3)
            side_out = side // stride
            total += _conv(side_out, planes, planes * 4, 1)
            if stride > 1 or inplanes != planes * 4:
                total += _conv(side_out, inplanes, planes * 4, 1)
            side, inplanes = side_out, planes * 4
    c, n = inplanes, side * side + 1
    total += 2 * c * c + 2 * 2 * n * c * c + 2 * 2 * n * c + 2 * c * cfg.embed_dim  # q, k/v, attention, c_proj
    return total


def _input_layer_flops(cfg: CLIPConfig) -> float:
    """Forward FLOPs of the layer that reads the pixels (patch conv / first stem conv) for one image."""
    v = cfg.vision
    if v.is_resnet:
        return _conv(v.image_size // 2, 3, v.width // 2, 3)
    n = (v.image_size // v.patch_size) ** 2
    return 2.0 * n * 3 * v.patch_size ** 2 * v.width


def forward_flops_per_sample(cfg: CLIPConfig, text_tokens: int | None = None,
                             patch_tokens: int | None = None) -> float:
    """Forward FLOPs of one (image, text) pair, from the same config the model reads; `patch_tokens`: the ViT patch
    tokens the transformer sees when some are dropped (FLIP; the patch embedding still sees them all)."""
    v, t = cfg.vision, cfg.text
    if v.is_resnet:
        image = _resnet_flops(cfg)
    else:
        n = patch_tokens or (v.image_size // v.patch_size) ** 2
        image = _input_layer_flops(cfg)  # patch conv
        image += _transformer_flops(n + 1, v.width, v.layers, v.mlp_ratio)
        image += 2 * v.width * cfg.embed_dim
    length = text_tokens or t.context_length
    text = _transformer_flops(length, t.width, t.layers, t.mlp_ratio) + 2 * t.width * cfg.embed_dim
    return float(image + text)


def train_flops_per_step(cfg: CLIPConfig, global_batch: int, patch_tokens: int | None = None) -> float:
    """Training FLOPs per step: forward + backward (2 × forward: gradients w.r.t. inputs and weights) for both
    towers, less the pixel gradient nobody needs, plus the N×N similarity matmul of the loss and its two gradients."""
    loss = 3 * 2 * global_batch * global_batch * cfg.embed_dim
    return (3 * forward_flops_per_sample(cfg, patch_tokens=patch_tokens) - _input_layer_flops(cfg)) * global_batch + loss
