"""WiSE-FT (Wortsman et al. 2022): interpolate zero-shot and fine-tuned weights, θ = (1 − α)·θ_zs + α·θ_ft.

    python -m clipjax.wise_ft --zeroshot A --finetuned B --alpha 0.5 --out C
    python -m clipjax.wise_ft --zeroshot A --finetuned B --alphas 0,0.25,0.5,0.75,1 --out C
    python -m clipjax.wise_ft --zeroshot A --finetuned B --alphas 0,0.25,0.5,0.75,1 --eval-data SPEC \
        [--eval-split test,heldout] [--alpha 0.5 --out C]

A and B are `clipjax.finetune` outputs or anything `clipjax.load` accepts (`--zeroshot-config` /
`--finetuned-config` when it needs a config), of the same architecture. Every variable is interpolated: both towers,
logit_scale, BatchNorm statistics, and the classification head when B is a `clipjax.finetune` output. A plain CLIP
has no head: its end of the head is its zero-shot classifier for B's class names and templates — exactly the head
fine-tuning started from when A is the model B was fine-tuned from. α = 0 gives A (with that head), α = 1 gives B,
bit for bit.

`--out C` writes the model at `--alpha` (default 0.5) as `clipjax.finetune` does (`clipjax.finetune.load_finetuned(C)`;
the weights are an open_clip state dict, C/model.safetensors with C/open_clip_config.json). `--alphas` with `--out`
and without `--eval-data` writes the model at every alpha instead, each in its own directory: C/alpha_0,
C/alpha_0.25, ..., C/alpha_1 (`f"alpha_{a:g}"`).
`--eval-data SPEC` evaluates every α of `--alphas` on each `--eval-split`: `head_top1`, the head's top-1 over all
of the dataset's classes (when there is a head), and `zeroshot_top1`, the top-1 of a zero-shot classifier built
from the interpolated model's own text tower over the split's classes (`clipjax.evaluate.zeroshot`). The table is
printed and, with `--out`, written to `C/wise_ft.json` beside the model at `--alpha`.

Bad input prints one line `error: ...` on stderr and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from clipjax import cli, paths
from clipjax.export import numpy_variables
from clipjax.finetune import (Head, check_new_dir, eval_batches, evaluate_head, load_finetuned, save_finetuned,
                              zeroshot_head)
from clipjax.interop.load import Pretrained


def _same_architecture(a: Pretrained, b: Pretrained) -> None:
    def plain(p: Pretrained):  # what defines the function; pooling at the largest id ≡ pooling at argmax
        t = p.config.text
        eot = None if t.eot_token_id == t.vocab_size - 1 else t.eot_token_id
        return p.config.replace(dtype="float32", remat="none", scan_layers=False, init_logit_scale=0.0,
                                text=dataclasses.replace(t, eot_token_id=eot))

    if plain(a) != plain(b):
        raise ValueError(f"{a.source} and {b.source} have different architectures: {plain(a)} vs {plain(b)}")


def interpolate(a: Any, b: Any, alpha: float) -> Any:
    """(1 − α)·a + α·b leaf by leaf, in float32; `a` and `b` must have the same tree structure and shapes."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        raise ValueError("the two models' variables have different structures (different architectures?)")

    def mix(x, y):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        if x.shape != y.shape:
            raise ValueError(f"cannot interpolate tensors of shapes {x.shape} and {y.shape}")
        return np.float32(1 - alpha) * x + np.float32(alpha) * y

    return jax.tree.map(mix, a, b)


def wise_ft(zeroshot: Pretrained, finetuned: Pretrained, alpha: float, zeroshot_head: Head | None = None,
            finetuned_head: Head | None = None) -> tuple[Pretrained, Head | None]:
    """The model (and head, when both ends have one) at `alpha` between the zero-shot and fine-tuned ends."""
    _same_architecture(zeroshot, finetuned)
    variables = interpolate(numpy_variables(zeroshot), numpy_variables(finetuned), alpha)
    cfg = finetuned.config.replace(scan_layers=False, remat="none")
    head = None
    if zeroshot_head is not None and finetuned_head is not None:
        mixed = interpolate({"kernel": zeroshot_head.kernel, "bias": zeroshot_head.bias},
                            {"kernel": finetuned_head.kernel, "bias": finetuned_head.bias}, alpha)
        head = Head(mixed["kernel"], mixed["bias"])
    return Pretrained(cfg, variables, f"wise_ft(alpha={alpha})"), head


def load_ends(zeroshot: str, finetuned: str, zeroshot_config: Any = None, finetuned_config: Any = None):
    """(A, B, A's head, B's head, classifier metadata); A's head is built from B's class names when A has none."""
    a, head_a, meta_a = load_finetuned(zeroshot, zeroshot_config)
    b, head_b, meta_b = load_finetuned(finetuned, finetuned_config)
    _same_architecture(a, b)
    meta = meta_b if head_b is not None else meta_a
    if (head_a is None) != (head_b is None):
        if not meta.get("classnames") or not meta.get("templates"):
            raise ValueError(f"{finetuned if head_b is not None else zeroshot} has no classifier.json with the class "
                             f"names and templates to build the other end's zero-shot head from")
        other = a if head_a is None else b
        built = zeroshot_head(other, meta["classnames"], meta["templates"], meta.get("tokenizer"))
        head_a, head_b = (built, head_b) if head_a is None else (head_a, built)
    if head_a is not None and head_a.kernel.shape != head_b.kernel.shape:
        raise ValueError(f"the heads have different shapes: {head_a.kernel.shape} vs {head_b.kernel.shape}")
    return a, b, head_a, head_b, meta


def evaluate_alphas(a: Pretrained, b: Pretrained, head_a: Head | None, head_b: Head | None, alphas: Sequence[float],
                    data: str, splits: Sequence[str], *, templates: Any = None, tokenizer: str | None = None,
                    batch_size: int = 256, max_examples: int | None = None) -> list[dict[str, float]]:
    """One row per alpha: {"alpha", "<split>/zeroshot_top1", ["<split>/head_top1"]} (see the module docstring)."""
    from clipjax.evaluate.zeroshot import ZeroShotEvaluator

    size = b.config.vision.image_size
    zs = {s: ZeroShotEvaluator(s, b.config, data=data, split=s, templates=templates, tokenizer=tokenizer,
                               batch_size=batch_size, max_examples=max_examples) for s in splits}
    heads = {s: eval_batches(data, s, size, batch_size, max_examples) for s in splits} if head_b is not None else {}
    rows = []
    for alpha in alphas:
        model, head = wise_ft(a, b, alpha, head_a, head_b)
        row = {"alpha": float(alpha)}
        for s in splits:
            if s in heads:
                row[f"{s}/head_top1"] = evaluate_head(model, head, heads[s])["top1"]
            row[f"{s}/zeroshot_top1"] = zs[s].evaluate(model.variables)["acc1"]
        rows.append(row)
        print("  ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    return rows


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{flag} must be comma-separated finite numbers, got {text!r}")
    return values


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m clipjax.wise_ft", description=__doc__)
    p.add_argument("--zeroshot", required=True, help="the zero-shot (pretrained) weights")
    p.add_argument("--finetuned", required=True, help="the fine-tuned weights (e.g. a clipjax.finetune output)")
    p.add_argument("--zeroshot-config", default=None, help="config for --zeroshot when clipjax.load needs one")
    p.add_argument("--finetuned-config", default=None, help="config for --finetuned when clipjax.load needs one")
    p.add_argument("--alpha", type=float, default=None,
                   help="mixing coefficient of the model written to --out (default 0.5)")
    p.add_argument("--alphas", default=None,
                   help="comma-separated alphas to evaluate with --eval-data (default: --alpha); without "
                        "--eval-data, the alphas whose models --out writes, one directory each (OUT/alpha_A)")
    p.add_argument("--out", default=None,
                   help="write the model at --alpha to this new directory (with --alphas and no --eval-data: "
                        "every alpha's model, in OUT/alpha_A)")
    p.add_argument("--eval-data", default=None, help="dataset spec to evaluate on (scenes, dir:PATH, ImageFolder)")
    p.add_argument("--eval-split", default="test", help="comma-separated splits of --eval-data")
    p.add_argument("--templates", default=None, help="zero-shot templates (default: the classifier's, else the "
                                                     "dataset's own set)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for zero-shot (default: the classifier's, else CLIP)")
    p.add_argument("--batch-size", type=cli.integer(1), default=256)
    p.add_argument("--max-examples", type=cli.integer(0), default=None,
                   help="evaluate at most this many images per split (0: all)")
    return p


def run(argv: list[str] | None = None) -> int:
    """Parse `argv`, evaluate and/or write the interpolated model; bad input raises."""
    args = _parser().parse_args(argv)
    if args.out is None and not args.eval_data:
        raise ValueError("nothing to do: give --out (write the model at --alpha) and/or --eval-data (evaluate "
                         "--alphas)")
    every = bool(args.alphas) and not args.eval_data  # --alphas --out: a model per alpha
    if every and args.alpha is not None:
        raise ValueError("give --alpha (the one model written to --out) or --alphas (a model per alpha, in "
                         "OUT/alpha_A), not both, without --eval-data")
    alpha = 0.5 if args.alpha is None else args.alpha
    if not math.isfinite(alpha):
        raise ValueError(f"--alpha must be a finite number, got {alpha}")
    alphas = _floats(args.alphas, "--alphas") if args.alphas else [alpha]
    if len({f"{a:g}" for a in alphas}) != len(alphas):
        raise ValueError(f"--alphas names an alpha twice: {args.alphas!r}")
    outs = {}  # alpha → the directory its model is written to
    if args.out is not None:
        check_new_dir(args.out)
        outs = {a: paths.as_path(args.out) / f"alpha_{a:g}" for a in alphas} if every else {alpha: args.out}
        for directory in outs.values():
            check_new_dir(directory)
    a, b, head_a, head_b, meta = load_ends(args.zeroshot, args.finetuned, args.zeroshot_config, args.finetuned_config)
    rows = []
    if args.eval_data:
        splits = [s for s in args.eval_split.split(",") if s]
        rows = evaluate_alphas(a, b, head_a, head_b, alphas, args.eval_data, splits,
                               templates=args.templates or meta.get("templates"),
                               tokenizer=args.tokenizer or meta.get("tokenizer"), batch_size=args.batch_size,
                               max_examples=args.max_examples)
    for mix, directory in outs.items():
        model, head = wise_ft(a, b, mix, head_a, head_b)
        classifier = {**meta, "wise_ft": {"zeroshot": args.zeroshot, "finetuned": args.finetuned, "alpha": mix}}
        out = save_finetuned(directory, model, head, classifier)
        if rows:
            paths.write_text(out / "wise_ft.json", json.dumps({"results": rows}, indent=2) + "\n")
        print(f"wrote {out} (alpha {mix:g})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: 0, or 2 after one `error: ...` line for bad input."""
    return cli.run_main(run, argv)


if __name__ == "__main__":
    from clipjax.cpu import use_huge_pages

    use_huge_pages()  # re-executes the process first (XLA:CPU's per-execution temporaries; see clipjax/cpu.py)
    sys.exit(main())
