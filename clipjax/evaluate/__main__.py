"""Command line: evaluate any model `clipjax.load` accepts, and write a CLIP_benchmark-style JSON summary.

    python -m clipjax.evaluate --model PATH [--config NAME_OR_JSON] --task zeroshot|retrieval|linear_probe \\
        --data SPEC [--split SPLIT] [--templates FILE|imagenet|simple|single|...] [--classnames FILE|imagenet|...] \\
        [--tokenizer clip|sentencepiece:PATH] [--batch-size 256] [--max-examples N] [--out results.json]

--model and --out may be in an object store (gs://, s3://; `pip install 'clipjax[gcs]'`).

--data: "scenes" (zero-shot defaults to its held-out split of unseen colour–shape pairs), "dir:PATH" or PATH of
an ingested dataset, PATH of an ImageFolder (class names from the folder names, or --classnames), or a prepared
TFDS name. The summary is {"dataset", "model", "pretrained", "task", "metrics": {...}, "language": "en"} with
CLIP_benchmark's metric names (acc1, acc5, mean_per_class_recall; image_retrieval_recall@K,
text_retrieval_recall@K; lp_acc1, ...); "metrics"."split" is the split that was evaluated.

Bad input (weights, data, arguments) and a model whose features are NaN or Inf print one line `error: ...` on
stderr and exit with status 2 (CLIPJAX_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

from clipjax import cache_dir, cli, paths

TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval", "linear_probe": "linear_probe"}
SPLIT_HELP = ("split to evaluate. Default: for 'scenes', heldout with --task zeroshot and test otherwise; for an "
              "ImageFolder, test (it has a single split: the whole folder is read whatever --split says); for any "
              "other dataset the first of test, validation, val, train that it has, else its first split, so a "
              "dataset ingested with a train split only is evaluated on train (metrics.split in the summary says "
              "which). linear_probe refuses a test split equal to --train-split")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m clipjax.evaluate", description=__doc__)
    p.add_argument("--model", required=True, help="anything clipjax.load accepts (HF dir, .pt, .safetensors, workdir)")
    p.add_argument("--config", default=None, help="model config name or open_clip JSON, when the weights need one")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", required=True, help="scenes | dir:PATH | PATH (ingested dataset or ImageFolder) | TFDS")
    p.add_argument("--split", default=None, help=SPLIT_HELP)
    p.add_argument("--train-split", default="train", help="linear probe: the split the classifier is fitted on")
    p.add_argument("--templates", default=None, help="template set name, file (one per line with {}) or a template")
    p.add_argument("--classnames", default=None, help="class-name list name (imagenet, cifar10, ...) or file")
    p.add_argument("--tokenizer", default=None,
                   help="clip (default) | sentencepiece:PATH | a name registered with "
                        "clipjax.data.tokenizer.register_tokenizer")
    p.add_argument("--batch-size", type=cli.integer(1), default=256)
    p.add_argument("--max-examples", type=cli.integer(0), default=None,
                   help="evaluate at most this many examples (0: all)")
    p.add_argument("--max-train-examples", type=cli.integer(0), default=None,
                   help="linear probe: cap the training examples (0: all)")
    p.add_argument("--cache-dir", default=str(cache_dir.path("zeroshot")),
                   help="zero-shot classifier cache ('' disables; default $XDG_CACHE_HOME/clipjax/zeroshot or "
                        "~/.cache/clipjax/zeroshot)")
    p.add_argument("--out", default=None, help="write the JSON summary here")
    return p.parse_args(argv)


def _tokenizer_of(args: argparse.Namespace, model_path: str) -> str | None:
    """--tokenizer, else the tokenizer a clipjax training workdir (local or in an object store) was trained with."""
    if args.tokenizer:
        return args.tokenizer
    model = paths.as_path(model_path)
    cfg_file = model / "config.json"
    if paths.is_dir(model / "checkpoints") and paths.is_file(cfg_file):
        return json.loads(paths.read_text(cfg_file)).get("config", {}).get("data", {}).get("tokenizer")
    return None


def _model_key(path: str, source: str) -> str:
    """The zero-shot classifier cache's key of a model: its path, source and newest modification time."""
    if paths.is_remote(path):
        return _remote_model_key(path, source)
    p = pathlib.Path(path)
    stamp = max((q.stat().st_mtime_ns for q in [p, *p.iterdir()]), default=0) if p.is_dir() else p.stat().st_mtime_ns
    return f"{os.path.abspath(path)}|{source}|{stamp}"


def _remote_model_key(path: str, source: str) -> str:
    """`_model_key` of a model in an object store (modification times of its objects, in seconds)."""
    p = paths.as_path(path)
    with paths.storage_errors(p):
        objects = [q for q in p.iterdir() if not q.is_dir()] if p.is_dir() else [p]
        stamp = max((q.stat().mtime for q in objects), default=0)
    return f"{p}|{source}|{stamp}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Load `args.model` and evaluate it; non-finite features are an error naming the model and the data."""
    from clipjax.evaluate.features import finite_context
    from clipjax.interop.load import load

    model = load(args.model, args.config)
    with finite_context(f"model {args.model}"):
        return _evaluate_model(args, model)


def _evaluate_model(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """The summary of `args.task` for the loaded `model` (evaluators are named after the task)."""
    from clipjax.evaluate.linear_probe import LinearProbeEvaluator
    from clipjax.evaluate.retrieval import RetrievalEvaluator
    from clipjax.evaluate.zeroshot import ClassifierCache, ZeroShotEvaluator

    cfg, tokenizer = model.config, _tokenizer_of(args, args.model)
    common = dict(data=args.data, split=args.split, batch_size=args.batch_size, max_examples=args.max_examples,
                  progress=True, cache_images=False)
    if args.task == "zeroshot":
        ev = ZeroShotEvaluator(args.task, cfg, templates=args.templates, classnames=args.classnames,
                               tokenizer=tokenizer, cache=ClassifierCache(args.cache_dir or None),
                               model_key=_model_key(args.model, model.source), **common)
    elif args.task == "retrieval":
        ev = RetrievalEvaluator(args.task, cfg, tokenizer=tokenizer, **common)
    else:
        ev = LinearProbeEvaluator(args.task, cfg, train_split=args.train_split,
                                  max_train_examples=args.max_train_examples, **common)
    start = time.perf_counter()
    metrics = ev.evaluate(model.variables)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    metrics["split"] = ev.split
    return {"dataset": args.data, "model": args.config or _model_name(cfg), "pretrained": os.fspath(args.model),
            "task": TASKS[args.task], "metrics": _json_safe(metrics), "language": "en",
            "model_config": cfg.to_open_clip()}


def _model_name(cfg) -> str:
    """The registered name of `cfg`'s architecture, or "custom"."""
    from clipjax.models.specs import get_model_config, list_models

    plain = cfg.replace(dtype="float32", remat="none", scan_layers=False)
    for name in list_models():
        if get_model_config(name).replace(init_logit_scale=plain.init_logit_scale) == plain:
            return name
    return "custom"


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv`, evaluate, print the JSON summary (and write it to --out); bad input raises."""
    args = parse_args(argv)
    if args.out:
        _check_out(args.out)
    from clipjax import compile_cache

    compile_cache.enable()
    result = evaluate(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        paths.write_text(args.out, text + "\n")  # atomically (in a store: one upload)
    return result


def _check_out(out: str) -> None:
    """Refuses an --out that cannot be written before the evaluation (which may take hours) runs."""
    if paths.is_dir(paths.as_path(out)):
        raise ValueError(f"--out {out} is a directory; give the path of the JSON file to write")
    if paths.is_remote(out):
        return
    parent = pathlib.Path(out).parent
    existing = next(d for d in (parent, *parent.parents) if d.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{pathlib.Path(out).name}.", suffix=".check"):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write a file in {parent} ({e.strerror or e})") from None


def main(argv: list[str] | None = None) -> int:
    """The command line: 0, or 2 after one `error: ...` line for bad input."""
    return cli.run_main(run, argv)


if __name__ == "__main__":
    from clipjax.cpu import use_huge_pages

    use_huge_pages()  # re-executes the process first (XLA:CPU's per-execution temporaries; see clipjax/cpu.py)
    sys.exit(main())
