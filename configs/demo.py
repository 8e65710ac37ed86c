"""The CPU demo: a tiny CLIP learns the embedded `scenes` dataset and classifies unseen colour–shape pairs zero-shot.

    python -m clipjax.main --config=configs/demo.py --workdir=runs/demo
    python -m clipjax.evaluate --model runs/demo --task zeroshot --data scenes     # the held-out pairs again

Trains a small CLIP (ModifiedResNet image tower, 3-layer text tower, 12.2 M parameters, 6.3 M of them the token
embedding) for 600 steps of 128 pairs on `scenes` (38 colour–shape pairs seen in training) and evaluates zero-shot,
every 100 steps and at the end, on
    heldout  the 10 colour–shape combinations never seen together in training (chance 0.10)
    seen     the 38 seen combinations, on test images (chance 0.026)
The measured accuracies, training time and machine, and an ablation with a ViT image tower (`tower=vit`), are in
experiments/DEMO.md.

Your own captioned images, ingested with one command (CSV/JSONL of image + caption(s), img2dataset tar shards, or
an ImageFolder):

    python -m clipjax.data.ingest my_images.jsonl --output data/mine
    python -m clipjax.main --config=configs/demo.py:evals=0 --workdir=runs/mine --config.data.train=dir:data/mine

then `python -m clipjax.evaluate --model runs/mine ...` (or keep periodic evals and point them at your data:
`--config.evals.heldout.data=PATH/OF/IMAGEFOLDER --config.evals.heldout.templates=FILE`).
Arguments (`--config=configs/demo.py:steps=300,batch=64,evals=0`): steps, batch, evals (0: no periodic evals),
tower (resnet | vit: the ViT image tower of the ablation in experiments/DEMO.md).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # noqa: E402

# ModifiedResNet [1, 1, 1, 1] × width 32 at 64 px (attention pool over 1024 channels); text context 16 (the longest
# scenes caption is 15 tokens with start and end), width 128, 4 heads, 3 layers; embeddings of 128.
DEMO_MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32, "patch_size": None},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
# `tower=vit`: the ablation of experiments/DEMO.md, a ViT image tower of similar cost (4 layers × width 128, patch 8).
VIT_TOWER = {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32}


def get_config(arg=None):
    a = parse_arg(arg, steps=600, batch=128, evals=True, tower="resnet")
    if a.tower not in ("resnet", "vit"):
        raise ValueError(f"configs/demo.py: tower={a.tower!r}; valid: resnet, vit")
    c = base_config()
    c.model.name = "demo"  # the architecture is model.open_clip_config (clear it to use a named model instead)
    model = {**DEMO_MODEL, "vision_cfg": VIT_TOWER} if a.tower == "vit" else DEMO_MODEL
    c.model.open_clip_config = ml_collections.ConfigDict(model)
    c.total_steps = a.steps
    c.batch_size = a.batch
    c.lr = 1e-3
    c.warmup_steps = min(50, a.steps // 10)
    c.optimizer.weight_decay = 0.1
    if a.tower == "resnet":
        c.optimizer.b2, c.optimizer.eps = 0.999, 1e-8  # the paper's ResNet settings (ViT: base_config's 0.98, 1e-6)
    c.log_every = 10
    c.ckpt_every = 10 ** 9  # a checkpoint at the end (and on SIGTERM/SIGINT)
    c.keep_checkpoints = 1
    c.eval_every = 100
    c.data.train = "scenes"
    c.data.crop_scale = (0.8, 1.0)
    if a.evals:
        for name, split in (("heldout", "heldout"), ("seen", "test")):
            c.evals[name] = ml_collections.ConfigDict(dict(
                type="zeroshot", data="scenes", split=split, templates="scenes", batch_size=250, max_examples=0))
            c.evals[name].tokenizer = c.data.get_ref("tokenizer")  # prompts tokenised as the training captions
    return c
