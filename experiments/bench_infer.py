"""Inference throughput, clipjax vs open_clip: `encode_image` and `encode_text`, ViT-B-32, batch 64, fp32, one run.

    python experiments/bench_infer.py                      # → prints JSON; run_all.py records it
    python experiments/bench_infer.py --model ViT-S-16-small --batch 128

clipjax: `CLIP.encode_image` / `encode_text` under `jax.jit` (randomly initialised weights: speed does not depend on
them). open_clip: the same methods in `torch.inference_mode()`, eval mode, in `torch_worker.py`. Rounds alternate the
two; figures are medians of the timed calls after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from bench_common import TorchWorker, command_line, interleave, median, stamp, write_json


class JaxInfer:
    """Jitted encode_image / encode_text of a randomly initialised clipjax CLIP."""

    def __init__(self, model_name: str, batch: int):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from clipjax.models import CLIP, get_model_config

        self.cfg = get_model_config(model_name)
        model = CLIP(self.cfg)
        s, length, vocab = self.cfg.vision.image_size, self.cfg.text.context_length, self.cfg.text.vocab_size
        rng = np.random.default_rng(0)
        images = jnp.asarray(rng.standard_normal((batch, s, s, 3)).astype(np.float32))  # [B, H, W, 3]
        text = rng.integers(1, vocab - 1, (batch, length)).astype(np.int32)  # [B, L]
        text[np.arange(batch), rng.integers(2, length, batch)] = vocab - 1
        tokens = jnp.asarray(text)
        variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1], tokens[:1])
        self.fns, self.compile = {}, {}
        for what, method, x in (("image", "encode_image", images), ("text", "encode_text", tokens)):
            fn = jax.jit(lambda v, x, method=method: model.apply(v, x, method=method))
            t0 = time.perf_counter()
            compiled = fn.lower(variables, x).compile()
            self.compile[what] = time.perf_counter() - t0
            self.fns[what] = lambda compiled=compiled, x=x: compiled(variables, x).block_until_ready()
            self.fns[what]()

    def steps(self, what: str, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.fns[what]()
            out.append(time.perf_counter() - t0)
        return out


def run(model_name: str, batch: int, worker: TorchWorker | None, rounds: int, per_round: int) -> dict[str, Any]:
    jx = JaxInfer(model_name, batch)
    if worker is not None:
        worker("setup_infer", model_cfg=jx.cfg.to_open_clip(), batch=batch)
    out: dict[str, Any] = {"model": model_name, "batch": batch, "compile_s": jx.compile}
    for what in ("image", "text"):
        jx.steps(what, 1)
        if worker is not None:
            worker("infer_steps", what=what, n=2)  # warm-up
            tj, tt = interleave(lambda k: jx.steps(what, k),
                                lambda k: worker("infer_steps", what=what, n=k)["times"], rounds, per_round)
        else:
            tj, tt = jx.steps(what, rounds * per_round), []
        row = {"jax_s": median(tj), "jax_per_s": batch / median(tj), "jax_times": [round(t, 4) for t in tj]}
        if tt:
            row.update(torch_s=median(tt), torch_per_s=batch / median(tt), torch_times=[round(t, 4) for t in tt],
                       speedup=median(tt) / median(tj))
        out[f"encode_{what}"] = row
    out["load_avg_after"] = list(os.getloadavg())
    return out


def main() -> None:
    from clipjax.cpu import use_huge_pages

    use_huge_pages()  # as the command-line entry points do (re-executes this process; clipjax/cpu.py)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default="", help="results/<name>.json (default: print only)")
    args = ap.parse_args()
    import contextlib

    from clipjax import compile_cache

    compile_cache.enable("off")  # compile times are measured, never read from a cache
    with (contextlib.nullcontext(None) if args.no_torch else TorchWorker()) as worker:
        result = run(args.model, args.batch, worker, args.rounds, args.per_round)
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if not kk.endswith("times")} if isinstance(v, dict) else v)
                      for k, v in result.items()}, indent=1))
    if args.out:
        write_json(args.out, {**stamp(command_line()), **result})


if __name__ == "__main__":
    main()
