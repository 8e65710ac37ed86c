"""Where the train step's compile time goes: XLA compile of growing parts of the ViT-B-32 train step.

    python experiments/bench_compile.py                       # ViT-B-32, batch 32 → results/compile-<date>.json
    python experiments/bench_compile.py --model ViT-S-16-small --batch 128

Parts: the loss gradient alone; + the optimizer (our AdamW chain, and plain `optax.adamw` for scale); the whole
`clipjax.train.train_step` (non-finite updates skipped with `lax.cond`); and the same step with the skip written as
a `jnp.where` over every parameter and optimizer leaf, as it was before (kept here to show what it cost).
"""

from __future__ import annotations

import argparse
import datetime
import time

from bench_common import command_line, stamp, write_json


def main() -> None:
    from clipjax.cpu import use_huge_pages

    use_huge_pages()  # as the command-line entry points do (re-executes this process; clipjax/cpu.py)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from bench_train import _train_config
    from clipjax import sharding as shd
    from clipjax import step as S
    from clipjax import train as T
    from clipjax import compile_cache
    from clipjax.losses import get_loss
    from clipjax.models import CLIP
    from clipjax.optim import clamp_logit_scale

    compile_cache.enable("off")  # compile times are measured, never read from a cache
    config = _train_config(args.model, args.batch, False, "none")
    cfg = T.model_config(config)
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    model = CLIP(cfg)
    state, shardings, tx = T.make_train_state(model, lambda p: T.make_tx(config, p), 0, mesh)
    s, n = cfg.vision.image_size, args.batch
    batch = {"image": jax.ShapeDtypeStruct((n, s, s, 3), np.float32),
             "text": jax.ShapeDtypeStruct((n, cfg.text.context_length), np.int32)}
    global_loss = S._global_loss(get_loss("clip"), mesh)

    def grads(st, b):
        return S._full_batch_grads(st, b, model, global_loss, ())

    def with_tx(opt):
        def fn(params, opt_state, b):
            loss, g, _ = grads(state.replace(params=params), b)
            u, opt_state = opt.update(g, opt_state, params)
            return optax.apply_updates(params, u), opt_state, loss
        return fn

    def where_step(st, b):  # the earlier formulation of train_step's skip of non-finite updates
        loss, g, new_bs = grads(st, b)
        grad_norm = optax.tree.norm(g)
        u, new_opt = tx.update(g, st.opt_state, st.params)
        new_params = clamp_logit_scale(optax.apply_updates(st.params, u))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, c: jnp.where(finite, a, c), new, old)  # noqa: E731
        return st.replace(step=st.step + 1, params=keep(new_params, st.params),
                          opt_state=keep(new_opt, st.opt_state), batch_stats=keep(new_bs, st.batch_stats)), loss

    plain = optax.adamw(1e-3)
    parts = [
        ("loss gradient", jax.jit(grads), (state, batch)),
        ("+ plain optax.adamw", jax.jit(with_tx(plain), donate_argnums=(0, 1)),
         (state.params, jax.eval_shape(plain.init, state.params), batch)),
        ("+ our AdamW chain (clip, masked decay, schedule)", jax.jit(with_tx(tx), donate_argnums=(0, 1)),
         (state.params, state.opt_state, batch)),
        ("train_step (lax.cond skip)", T.jit_train_step(model, tx, config, mesh, shardings), (state, batch)),
        ("train_step with a jnp.where skip per leaf", jax.jit(where_step, donate_argnums=(0,)), (state, batch)),
    ]
    rows = []
    for label, fn, fargs in parts:
        t0 = time.perf_counter()
        lowered = fn.lower(*fargs)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        rows.append({"part": label, "trace_lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)})
        print(f"{label:50s} trace+lower {t1 - t0:5.1f} s   XLA compile {t2 - t1:5.1f} s", flush=True)
    write_json(f"compile-{args.model}-{datetime.date.today().isoformat()}.json",
               {**stamp(command_line()), "model": args.model, "batch": n, "parts": rows})


if __name__ == "__main__":
    main()
