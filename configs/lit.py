"""LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"): a pretrained image tower, locked,
and a text tower trained — from scratch by default — to align with it.

Run:       python -m clipjax.main --config=configs/lit.py:init_from=PATH,model=NAME --workdir=DIR
           (PATH: anything clipjax.load accepts, NAME its architecture, e.g. ViT-B-32-quickgelu for OpenAI's
           ViT-B/32; init_config=NAME_OR_JSON when clipjax.load needs one; reinit_text=False keeps the pretrained
           text tower as the starting point ("LiT with a pretrained text tower", also unlocked))
CPU smoke: python -m clipjax.main --config=configs/lit.py:runlocal --workdir=/tmp/lit
Recipe: the paper's "Lu" setting — locked image tower, unlocked randomly initialised text tower: the image tower
gets no gradients and no optimizer state (`frozen`), the text tower's weights are re-drawn (`reinit`). Contrastive
softmax loss, AdamW (the paper uses lr 1e-3 and weight decay 1e-4 with its large batches), cosine schedule.
The locked tower runs in inference mode: a ViT stays bit-identical, a ResNet keeps its BatchNorm running statistics.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # noqa: E402


def get_config(arg=None):
    a = parse_arg(arg, init_from="", init_config="", model="ViT-B-32-quickgelu", data="scenes", reinit_text=True,
                  runlocal=False)
    c = base_config()
    c.model.name = a.model  # must be the architecture of init_from
    c.init_from = a.init_from
    c.init_config = a.init_config
    c.frozen = ("visual",)  # locked image tower: no gradients, no optimizer state, no weight decay
    c.reinit = ("text",) if a.reinit_text else ()  # these variables keep their fresh initialisation
    c.lr = 1e-3
    c.optimizer.weight_decay = 1e-4
    c.batch_size = 16384
    c.warmup_steps = 2000
    c.total_steps = 50_000
    c.data.train = a.data
    if a.runlocal:
        c.model.name = "ViT-T-demo"
        c.batch_size, c.total_steps, c.warmup_steps = 8, 2, 1
        c.ckpt_every, c.log_every = 2, 1
        c.data.train = "synthetic"
    return c
