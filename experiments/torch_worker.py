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
logit-scale clamp to ln 100. Data is one fixed synthetic batch, as on the JAX side.
"""

from __future__ import annotations

import math
import time

import torch

import open_clip
from open_clip.loss import ClipLoss

from bench_common import serve

_state: dict = {}


def _batch(cfg: dict, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = cfg["vision_cfg"]["image_size"]
    text_cfg = cfg["text_cfg"]
    length, vocab = text_cfg.get("context_length", 77), text_cfg.get("vocab_size", 49408)
    images = torch.randn(n, 3, size, size, generator=g)  # [N, 3, H, W]
    tokens = torch.randint(1, vocab - 1, (n, length), generator=g)  # [N, L]
    eot = torch.randint(2, length, (n,), generator=g)
    tokens[torch.arange(n), eot] = vocab - 1  # EOT = argmax
    return images, tokens


def _model(cfg: dict) -> torch.nn.Module:
    cfg = dict(cfg)
    embed = cfg.pop("embed_dim")
    return open_clip.CLIP(embed, cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=bool(cfg.get("quick_gelu", False)))


def setup_train(model_cfg: dict, batch: int, opt: dict, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = _model(model_cfg).train()

    def exclude(name: str, p: torch.Tensor) -> bool:  # open_clip_train/main.py
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = list(model.named_parameters())
    decay = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    no_decay = [p for n, p in named if exclude(n, p) and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                                   {"params": decay, "weight_decay": opt["weight_decay"]}],
                                  lr=opt["lr"], betas=(opt["b1"], opt["b2"]), eps=opt["eps"])
    images, tokens = _batch(model_cfg, batch, seed)
    _state.clear()
    _state.update(model=model, optimizer=optimizer, loss=ClipLoss(), images=images, tokens=tokens,
                  clip=opt.get("grad_clip_norm"))
    return {"params": sum(p.numel() for p in model.parameters())}


def train_steps(n: int) -> dict:
    s = _state
    model, optimizer, loss_fn = s["model"], s["optimizer"], s["loss"]
    times, loss = [], float("nan")
    for _ in range(n):
        t0 = time.perf_counter()
        image_features, text_features, logit_scale = model(s["images"], s["tokens"])
        total = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if s["clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s["clip"], norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss = total.item()
        times.append(time.perf_counter() - t0)
    return {"times": times, "loss": loss}


def setup_infer(model_cfg: dict, batch: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = _model(model_cfg).eval()
    images, tokens = _batch(model_cfg, batch, seed)
    _state.clear()
    _state.update(model=model, images=images, tokens=tokens)
    return {"params": sum(p.numel() for p in model.parameters())}


def infer_steps(what: str, n: int) -> dict:
    s = _state
    model = s["model"]
    fn = (lambda: model.encode_image(s["images"])) if what == "image" else (lambda: model.encode_text(s["tokens"]))
    times = []
    with torch.inference_mode():
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"times": times}


def matmul(n: int, reps: int) -> dict:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return {"times": times}


def info() -> dict:
    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "threads": torch.get_num_threads()}


def main() -> None:
    serve({"info": info, "setup_train": setup_train, "train_steps": train_steps, "setup_infer": setup_infer,
           "infer_steps": infer_steps, "matmul": matmul})


if __name__ == "__main__":
    main()
