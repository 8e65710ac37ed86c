"""Metrics: one JSON object per logged step in `metrics.jsonl`, the same scalars as TensorBoard events, a progress
line with rate and ETA, and analytic training FLOPs for MFU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import time
from typing import Any

from clipjax.models.config import CLIPConfig

log = logging.getLogger(__name__)


class MetricWriter:
    """Append-only JSONL + TensorBoard writer (only process 0 writes)."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                log.warning("tensorboardX not installed: no TensorBoard events")

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _py(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _py(v: Any) -> Any:
    try:
        return float(v) if not isinstance(v, (str, bool, int)) else v
    except (TypeError, ValueError):
        return str(v)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """Periodic progress line: step, rate, ETA, and the latest scalars."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()

    def line(self, step: int, scalars: dict[str, float]) -> str:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items() if isinstance(v, float))
        return f"step {step}/{self.total} ({100 * step / self.total:.0f}%) {rate:.2f} steps/s ETA {_hms(eta)} {shown}"


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---- analytic FLOPs (matmuls and convolutions; 2 FLOPs per multiply-add; training = 3 × forward) ---------------

def _transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float, causal: bool) -> float:
    d, l = width, tokens
    per_layer = 2 * l * d * 3 * d + 2 * l * d * d + 2 * 2 * l * d * int(d * mlp_ratio)  # qkv, out, mlp
    attn = 2 * 2 * l * l * d  # scores + weighted sum
    if causal:
        attn /= 2
    return layers * (per_layer + attn)


def _resnet_flops(cfg: CLIPConfig) -> float:
    v = cfg.vision
    s, w = v.image_size, v.width
    total = 0.0

    def conv(out_side: int, cin: int, cout: int, k: int) -> float:
        return 2.0 * out_side * out_side * cin * cout * k * k

    side = s // 2
    total += conv(side, 3, w // 2, 3) + conv(side, w // 2, w // 2, 3) + conv(side, w // 2, w, 3)
    side //= 2
    inplanes = w
    for stage, depth in enumerate(v.layers):
        planes = w * 2 ** stage
        for i in range(depth):
            stride = 2 if (stage > 0 and i == 0) else 1
            total += conv(side, inplanes, planes, 1) + conv(side, planes, planes, 3)
            side_out = side // stride
            total += conv(side_out, planes, planes * 4, 1)
            if stride > 1 or inplanes != planes * 4:
                total += conv(side_out, inplanes, planes * 4, 1)
            side, inplanes = side_out, planes * 4
    c, n = inplanes, side * side + 1
    total += 2 * c * c + 2 * 2 * n * c * c + 2 * 2 * n * c + 2 * c * cfg.embed_dim  # q, k/v, attention, c_proj
    return total


def forward_flops_per_sample(cfg: CLIPConfig, text_tokens: int | None = None) -> float:
    """Forward FLOPs of one (image, text) pair, from the same config the model reads."""
    v, t = cfg.vision, cfg.text
    if v.is_resnet:
        image = _resnet_flops(cfg)
    else:
        n = (v.image_size // v.patch_size) ** 2
        image = 2 * n * 3 * v.patch_size ** 2 * v.width  # patch conv
        image += _transformer_flops(n + 1, v.width, v.layers, v.mlp_ratio, causal=False)
        image += 2 * v.width * cfg.embed_dim
    length = text_tokens or t.context_length
    text = _transformer_flops(length, t.width, t.layers, t.mlp_ratio, causal=True) + 2 * t.width * cfg.embed_dim
    return float(image + text)


def train_flops_per_step(cfg: CLIPConfig, global_batch: int) -> float:
    """Training FLOPs per step: 3 × forward for both towers, plus the B×B similarity matmuls of the loss."""
    loss = 3 * 2 * 2 * global_batch * global_batch * cfg.embed_dim
    return 3 * forward_flops_per_sample(cfg) * global_batch + loss
