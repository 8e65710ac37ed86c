"""The open_clip side of the benchmarks: a long-lived worker that runs in the parity venv ($CLIPJAX_PARITY_PYTHON) (torch + open_clip).

The JAX harness (`bench_common.TorchWorker`) starts it as a subprocess and sends one JSON command per line on stdin;
each answer is one JSON line on stdout. While the JAX side measures, this process blocks on stdin, so the two never
compete for the cores and the harness can interleave A/B measurements in one run.

Commands
    {"cmd": "info"}                                         → versions, threads
    {"cmd": "setup_train", "model_cfg": {...}, "batch": N, "opt": {...}, "seed": 0}
    {"cmd": "train_steps", "n": K}                          → {"times": [...], "loss": float}
    {"cmd": "setup_infer", "model_cfg": {...}, "batch": N}
    {"cmd": "infer_steps", "what": "image"|"text", "n": K}  → {"times": [...]}
    {"cmd": "matmul", "n": 2048, "reps": 5}                 → {"times": [...]}
    {"cmd": "quit"}

The training step is open_clip's (`open_clip_train.train.train_one_epoch`, fp32): forward, `ClipLoss`, backward,
gradient clipping, AdamW (decay on ≥ 2-D weights except norms/embeddings as open_clip's `exclude` rule), and the
logit-scale clamp to ln 100. Data is one fixed synthetic batch, the JAX side's (`bench_common.random_batch`).
`make_model`, `make_optimizer`, `make_batch` and `train_step` are also what `bench_gpu.py` runs on the GPU (there
under bf16 autocast, eager or torch.compile'd).
"""

from __future__ import annotations

import contextlib
import math

import torch

import open_clip
from open_clip.loss import ClipLoss

from bench_common import random_batch, serve, timed

_state: dict = {}


def make_batch(cfg: dict, n: int, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`bench_common.random_batch` for open_clip: images [N, 3, H, W] float32, tokens [N, L] int64."""
    host = random_batch(cfg, n, seed)
    images = torch.from_numpy(host["image"].transpose(0, 3, 1, 2).copy()).to(device)  # [N, 3, H, W]
    return images, torch.from_numpy(host["text"]).long().to(device)  # [N, L]


def make_model(cfg: dict) -> torch.nn.Module:
    """open_clip's CLIP of an open_clip model-config dict."""
    cfg = dict(cfg)
    embed = cfg.pop("embed_dim")
    return open_clip.CLIP(embed, cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=bool(cfg.get("quick_gelu", False)))


def make_optimizer(model: torch.nn.Module, opt: dict) -> torch.optim.Optimizer:
    """open_clip_train's AdamW: no decay on < 2-D weights, norms, biases and the logit scale."""

    def exclude(name: str, p: torch.Tensor) -> bool:  # open_clip_train/main.py
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                              {"params": [p for n, p in named if not exclude(n, p)],
                               "weight_decay": opt["weight_decay"]}],
                             lr=opt["lr"], betas=(opt["b1"], opt["b2"]), eps=opt["eps"])


def train_step(model, base: torch.nn.Module, optimizer, loss_fn, images, tokens, clip: float | None,
               autocast: torch.dtype | None = None) -> torch.Tensor:
    """One step of open_clip_train: forward and `ClipLoss` (under autocast to `autocast` if given), backward,
    gradient clipping to `clip`, the optimizer, the logit-scale clamp to ln 100 → the loss (not synchronised).
    `model` is `base` or `torch.compile(base)`."""
    context = torch.autocast(device_type=images.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with context:
        image_features, text_features, logit_scale = model(images, tokens)
        total = loss_fn(image_features, text_features, logit_scale)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(base.parameters(), clip, norm_type=2.0)
    optimizer.step()
    with torch.no_grad():
        base.logit_scale.clamp_(0, math.log(100))
    return total


def _setup(model_cfg: dict, batch: int, seed: int, train: bool) -> dict:
    """A case's model (in train or eval mode) and batch, as the worker's state → its parameter count."""
    torch.manual_seed(seed)
    net = make_model(model_cfg).train(train)
    images, tokens = make_batch(model_cfg, batch, seed)
    _state.clear()
    _state.update(model=net, images=images, tokens=tokens)
    return {"params": sum(p.numel() for p in net.parameters())}


def setup_train(model_cfg: dict, batch: int, opt: dict, seed: int = 0) -> dict:
    out = _setup(model_cfg, batch, seed, train=True)
    _state.update(optimizer=make_optimizer(_state["model"], opt), loss=ClipLoss(), clip=opt.get("grad_clip_norm"))
    return out


def train_steps(n: int) -> dict:
    s, box = _state, {"loss": float("nan")}

    def step():
        box["loss"] = train_step(s["model"], s["model"], s["optimizer"], s["loss"], s["images"], s["tokens"],
                                 s["clip"]).item()

    return {"times": timed(step, n), "loss": box["loss"]}


def setup_infer(model_cfg: dict, batch: int, seed: int = 0) -> dict:
    return _setup(model_cfg, batch, seed, train=False)


def infer_steps(what: str, n: int) -> dict:
    s = _state
    model = s["model"]
    fn = (lambda: model.encode_image(s["images"])) if what == "image" else (lambda: model.encode_text(s["tokens"]))
    with torch.inference_mode():
        return {"times": timed(fn, n)}


def matmul(n: int, reps: int) -> dict:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return {"times": timed(lambda: a @ b, reps)}


def info() -> dict:
    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "threads": torch.get_num_threads()}


def main() -> None:
    serve({"info": info, "setup_train": setup_train, "train_steps": train_steps, "setup_infer": setup_infer,
           "infer_steps": infer_steps, "matmul": matmul})


if __name__ == "__main__":
    main()
