"""Fine-tune a pretrained CLIP as a classifier whose head starts as its zero-shot classifier (WiSE-FT recipe).

Run:   python -m clipjax.main --config=configs/finetune.py:init_from=PATH[,data=SPEC] --workdir=DIR
       (PATH: anything clipjax.load accepts; add init_config=NAME_OR_JSON for an open_clip state dict)
Then:  python -m clipjax.wise_ft --zeroshot PATH --finetuned DIR --alphas 0,0.25,0.5,0.75,1 \\
           --eval-data SPEC --eval-split test,heldout
The run is the one trainer's (`clipjax.train`, task "classify"): checkpoints, exact resume after any stop,
SIGTERM handling and sharding (`--config.mesh.fsdp=-1`) as in pretraining; `clipjax.finetune` describes the outputs.
CPU smoke run with the tiny test model (the tests' "folded" tokenizer maps CLIP's BPE ids into its 1000-id
vocabulary; tests/run_cli.py registers it; the default data, the embedded scenes dataset, is built on first use):
       python tests/run_cli.py clipjax.main --config=configs/finetune.py:init_from=tests/fixtures/hf_clip,\\
tokenizer=folded,runlocal --workdir=/tmp/ft
Recipe (Wortsman et al. 2022, WiSE-FT, ImageNet): AdamW lr 3e-5, weight decay 0.1, batch 512, 10 epochs, cosine
with 500 warm-up steps, head initialised from the zero-shot classifier; β2 0.999, ε 1e-8. `runlocal` shrinks the
batch, the number of steps and the evaluation for a CPU.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # noqa: E402


def get_config(arg=None):
    a = parse_arg(arg, init_from="", init_config="", data="scenes", tokenizer="", runlocal=False)
    c = base_config()
    c.task = "classify"
    c.model.name = ""  # the architecture of init_from
    c.init_from = a.init_from  # the weights to fine-tune
    c.init_config = a.init_config  # their config when clipjax.load needs one
    c.batch_size = 512
    c.total_steps = 25_000  # ~10 ImageNet epochs at batch 512
    c.warmup_steps = 500
    c.lr = 3e-5
    c.frozen = ()  # ("visual",): train the head only (a linear probe started from the zero-shot head)
    c.log_every = 50
    c.ckpt_every = 1000
    c.eval_every = 1000

    c.optimizer.weight_decay = 0.1
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8

    c.data.train = a.data  # "scenes" | "dir:PATH" | an ImageFolder path | a prepared TFDS name
    c.data.eval = a.data  # "" to skip evaluation
    c.data.tokenizer = a.tokenizer  # "": CLIP BPE; "sentencepiece:PATH"; a registered name

    if a.runlocal:
        c.batch_size, c.total_steps, c.warmup_steps, c.log_every, c.ckpt_every = 16, 4, 1, 1, 2
        c.lr = 1e-4
        c.data.eval_batch_size, c.data.max_eval_examples = 64, 128
    return c
