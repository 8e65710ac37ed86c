"""The CPU demo: a tiny CLIP learns the embedded `scenes` dataset and classifies unseen colour–shape pairs zero-shot.

    python -m clipjax.main --config=configs/demo.py --workdir=runs/demo

Trains "ViT-T-demo" on `scenes` (38 seen colour–shape pairs) and evaluates zero-shot on its held-out split: 10
colour–shape combinations never seen together in training (chance 0.10), every `eval_every` steps and at the end.
Measured result, time and curves: experiments/DEMO.md.

Your own captioned images, ingested with one command (CSV/JSONL of image,caption, img2dataset tar shards, or an
ImageFolder):

    python -m clipjax.data.ingest my_images.csv --output data/mine
    python -m clipjax.main --config=configs/demo.py --workdir=runs/mine --config.data.train=dir:data/mine

The periodic eval follows `data.train`: zero-shot on the dataset's test split (or train, if it has no other) with
its class names — an ImageFolder ingest has them; for captions without class labels use
`--config.evals.heldout.type=retrieval` (image↔text recall) or `configs/demo.py:evals=0`.
Arguments (`--config=configs/demo.py:steps=300,batch=64,evals=0`): steps, batch, evals.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # noqa: E402


def get_config(arg=None):
    a = parse_arg(arg, steps=600, batch=128, evals=True)
    c = base_config()
    c.model.name = "ViT-T-demo"
    c.total_steps = a.steps
    c.batch_size = a.batch
    c.lr = 1e-3
    c.warmup_steps = min(50, a.steps // 10)
    c.optimizer.weight_decay = 0.1
    c.log_every = 10
    c.ckpt_every = 10 ** 9  # a checkpoint at the end (and on SIGTERM/SIGINT)
    c.keep_checkpoints = 1
    c.eval_every = 100
    c.data.train = "scenes"
    c.data.crop_scale = (0.8, 1.0)
    if a.evals:
        c.evals.heldout = ml_collections.ConfigDict(dict(
            type="zeroshot",
            split="",  # "": the dataset's default (scenes → heldout, the unseen pairs; else test, else train)
            templates="",  # "": the dataset's own set (scenes → its 8 caption-style templates; else ImageNet's 80)
            batch_size=250, max_examples=500))
        c.evals.heldout.data = c.data.get_ref("train")
        c.evals.heldout.tokenizer = c.data.get_ref("tokenizer")
    return c
