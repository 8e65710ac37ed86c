"""Train-step throughput, clipjax vs open_clip, same model / batch / fp32 / AdamW / contrastive loss, one run.

    python experiments/bench_train.py                     # both cases → results/train.json
    python experiments/bench_train.py --case small        # ViT-S-16-small, batch 128
    python experiments/bench_train.py --case b32 --no-torch --scan   # JAX only, a variant (for exploring)

clipjax side: `clipjax.train.make_train_state` + `clipjax.train.jit_train_step` (jitted with shardings and state
donation exactly as the trainer does) on a 1-device mesh, lowered and compiled ahead of time so compile time is
measured apart from the steps. open_clip side: `torch_worker.py` in the parity venv ($CLIPJAX_PARITY_PYTHON) (forward, ClipLoss, backward,
clip-grad 1.0, AdamW, logit-scale clamp). Rounds alternate the two; each figure is a median of the timed steps after
warm-up. FLOPs: the analytic `clipjax.metrics.train_flops_per_step` and XLA's own count (`cost_analysis`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from bench_common import (TorchWorker, command_line, interleave, median, optimizer_recipe, random_batch, serve, stamp,
                          train_config, write_json)

CASES = {"small": ("ViT-S-16-small", 128), "b32": ("ViT-B-32", 32)}


def _train_config(model_name: str, batch: int, scan: bool, remat: str, dtype: str = "float32"):
    return train_config(batch, model_name=model_name, scan=scan, remat=remat, dtype=dtype)


def open_clip_dict(cfg) -> dict[str, Any]:
    """The open_clip model-config dict of a clipjax config (what `open_clip.CLIP` is built from)."""
    return cfg.to_open_clip()


def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


class JaxTrain:
    """A compiled clipjax train step on a fixed synthetic batch."""

    def __init__(self, model_name: str, batch: int, *, scan: bool = False, remat: str = "none", devices: int = 1,
                 dtype: str = "float32"):
        import jax

        from clipjax import sharding as shd
        from clipjax.models import CLIP
        from clipjax.train import jit_train_step, make_train_state, make_tx, model_config

        config = _train_config(model_name, batch, scan, remat, dtype)
        self.config = config
        self.cfg = model_config(config)
        mesh = shd.make_mesh({"data": devices}, devices=jax.devices()[:devices])
        model = CLIP(self.cfg)
        state, shardings, tx = make_train_state(model, lambda p: make_tx(config, p), 0, mesh)
        step = jit_train_step(model, tx, config, mesh, shardings)
        host = random_batch(open_clip_dict(self.cfg), batch)
        self.batch = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
        t0 = time.perf_counter()
        lowered = step.lower(state, self.batch)
        t1 = time.perf_counter()
        self.step = lowered.compile()
        t2 = time.perf_counter()
        self.state, metrics = self.step(state, self.batch)
        jax.block_until_ready(metrics)
        t3 = time.perf_counter()
        self.compile = {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "first_step_s": t3 - t2,
                        "first_step_total_s": t3 - t0}
        self.xla_flops = _cost_flops(self.step)
        self.loss = float(metrics["loss"])

    def steps(self, n: int) -> list[float]:
        import jax

        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.state, metrics = self.step(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
            times.append(time.perf_counter() - t0)
        self.loss = float(metrics["loss"])
        return times


def run_case(name: str, worker: TorchWorker | None, rounds: int, per_round: int, warmup: int, **variant) -> dict:
    from clipjax.metrics import train_flops_per_step

    model_name, batch = CASES[name]
    jx = JaxTrain(model_name, batch, **variant)
    flops = train_flops_per_step(jx.cfg, batch)
    out: dict[str, Any] = {"case": name, "model": model_name, "batch": batch, "variant": variant,
                           "compile": jx.compile, "flops_per_step_analytic": flops,
                           "flops_per_step_xla": jx.xla_flops}
    jx.steps(warmup)
    if worker is not None:
        t0 = time.perf_counter()
        worker("setup_train", model_cfg=open_clip_dict(jx.cfg), batch=batch, opt=optimizer_recipe(jx.config))
        first = worker("train_steps", n=1)["times"][0]
        out["torch_setup_s"], out["torch_first_step_s"] = time.perf_counter() - t0, first
        worker("train_steps", n=max(warmup - 1, 0))
        tj, tt = interleave(jx.steps, lambda k: worker("train_steps", n=k)["times"], rounds, per_round)
    else:
        tj, tt = jx.steps(rounds * per_round), []
    out["jax"] = _summary(tj, batch, flops)
    out["jax"]["loss"] = jx.loss
    if tt:
        out["torch"] = _summary(tt, batch, flops)
        out["speedup"] = out["torch"]["step_s"] / out["jax"]["step_s"]
    out["load_avg_after"] = list(os.getloadavg())
    return out


def _summary(times: list[float], batch: int, flops: float) -> dict:
    step = median(times)
    return {"step_s": step, "samples_per_s": batch / step, "gflops_per_s": flops / step / 1e9,
            "times": [round(t, 4) for t in times]}


# ---- exploration: clipjax variants (XLA flags, model options) A/B'd in subprocesses, interleaved -----------------

def serve_variant() -> None:
    """JSON-lines worker (same protocol as torch_worker.py) running one clipjax variant; its XLA_FLAGS come from
    the environment the orchestrator gave it."""
    from clipjax import compile_cache

    compile_cache.enable("off")  # compile times are measured, never read from a cache
    worker: dict[str, JaxTrain] = {}

    def setup_train(case: str, **options) -> dict:
        import clipjax

        jx = worker["train"] = JaxTrain(*CASES[case], **options)
        return {"compile": jx.compile, "xla_flops": jx.xla_flops, "xla_flags": os.environ.get("XLA_FLAGS"),
                "clipjax": os.path.dirname(clipjax.__file__)}

    def train_steps(n: int) -> dict:
        return {"times": worker["train"].steps(n), "loss": worker["train"].loss}

    serve({"setup_train": setup_train, "train_steps": train_steps})


def ab(case: str, variants: list[str], rounds: int, per_round: int, warmup: int) -> list[dict]:
    """Each variant "label|XLA_FLAGS|key=value,..." runs in its own worker process; rounds alternate over them."""
    import sys

    workers, rows = [], []
    for spec in variants:
        label, flags, opts = (spec.split("|") + ["", ""])[:3]
        kw: dict[str, Any] = {}
        for item in filter(None, opts.split(",")):
            k, v = item.split("=")
            kw[k] = v if k.startswith("env_") else {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)
        env = {"XLA_FLAGS": flags.strip()}
        if "pkg" in kw:  # a copy of the clipjax package to import instead (A/B of model code)
            env["PYTHONPATH"] = kw.pop("pkg")
        for key in [k for k in kw if k.startswith("env_")]:  # env_NAME=value → environment variable NAME
            env[key[4:]] = str(kw.pop(key))
        w = TorchWorker(python=sys.executable, script=__file__, args=["--worker"], env=env)
        info = w("setup_train", case=case, **kw)
        w("train_steps", n=warmup)
        workers.append(w)
        rows.append({"label": label, "xla_flags": env["XLA_FLAGS"], "options": kw, "compile": info["compile"],
                     "times": []})
        print(f"{label}: {info['clipjax']} compile {info['compile']}", flush=True)
    for r in range(rounds):
        order = list(range(len(workers)))
        order = order if r % 2 == 0 else order[::-1]
        for i in order:
            rows[i]["times"] += workers[i]("train_steps", n=per_round)["times"]
    for w in workers:
        w.close()
    base = median(rows[0]["times"])
    for row in rows:
        row["step_s"] = median(row["times"])
        row["speedup_vs_first"] = base / row["step_s"]
        print(f"{row['label']:28s} step {row['step_s']:.3f} s  x{row['speedup_vs_first']:.3f}  "
              f"(min {min(row['times']):.3f}, n={len(row['times'])})", flush=True)
    return rows


def main() -> None:
    from clipjax.cpu import use_huge_pages

    use_huge_pages()  # as the command-line entry points do (re-executes this process; clipjax/cpu.py)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--scan", action="store_true")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="", help="results/<name>.json (default: print only)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ab", action="append", metavar="LABEL|XLA_FLAGS|k=v,...",
                    help="A/B clipjax variants in subprocesses (first = baseline); e.g. 'ynn-off|"
                         "--xla_cpu_experimental_ynn_fusion_type=|scan=true'")
    args = ap.parse_args()
    if args.worker:
        return serve_variant()
    if args.ab:
        rows = ab((args.case or ["small"])[0], args.ab, args.rounds, args.per_round, args.warmup)
        if args.out:
            write_json(args.out, {**stamp(command_line()), "case": (args.case or ["small"])[0], "variants": rows})
        return
    from clipjax import compile_cache

    compile_cache.enable("off")  # compile times are measured, never read from a cache
    variant = {"scan": args.scan, "remat": args.remat, "devices": args.devices}
    cases = []
    with (TorchWorker() if not args.no_torch else _nothing()) as worker:
        for name in args.case or ["small", "b32"]:
            cases.append(run_case(name, worker, args.rounds, args.per_round, args.warmup, **variant))
            print(json.dumps({k: v for k, v in cases[-1].items() if k not in ("jax", "torch")} | {
                "jax_samples_per_s": cases[-1]["jax"]["samples_per_s"],
                "torch_samples_per_s": cases[-1].get("torch", {}).get("samples_per_s")}), flush=True)
    if args.out:
        write_json(args.out, {**stamp(command_line()), "cases": cases})


def _nothing():
    import contextlib

    return contextlib.nullcontext(None)


if __name__ == "__main__":
    main()
