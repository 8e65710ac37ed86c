"""Fine-tune a pretrained CLIP as a classifier whose head starts as its zero-shot classifier (WiSE-FT recipe).

Run:   python -m clipjax.finetune --config=configs/finetune.py:init_from=PATH[,data=SPEC] --workdir=DIR
       (PATH: anything clipjax.load accepts; add init_config=NAME_OR_JSON for an open_clip state dict)
Then:  python -m clipjax.wise_ft --zeroshot PATH --finetuned DIR --alphas 0,0.25,0.5,0.75,1 \
           --eval-data SPEC --eval-split test,heldout
CPU smoke run with the tiny test model ("folded" maps CLIP's BPE ids into its 1000-id vocabulary; the default data,
the embedded scenes dataset, is built on first use):
       python -m clipjax.finetune --config=configs/finetune.py:init_from=tests/fixtures/hf_clip,tokenizer=folded,\
runlocal --workdir=/tmp/ft
Recipe (Wortsman et al. 2022, WiSE-FT, ImageNet): AdamW lr 3e-5, weight decay 0.1, batch 512, 10 epochs, cosine
with 500 warm-up steps, head initialised from the zero-shot classifier; β2 0.999, ε 1e-8. `runlocal` shrinks the
batch, the number of steps and the evaluation for a CPU.
"""

import sys, os  # noqa: E401

sys.path.insert(0, os.path.dirname(__file__))
from common import parse_arg  # noqa: E402

import ml_collections  # noqa: E402


def get_config(arg=None):
    a = parse_arg(arg, init_from="", init_config="", data="scenes", tokenizer="", runlocal=False)
    c = ml_collections.ConfigDict()
    c.init_from = a.init_from  # the weights to fine-tune
    c.init_config = a.init_config  # their config when clipjax.load needs one
    c.seed = 0
    c.batch_size = 512
    c.total_steps = 25_000  # ~10 ImageNet epochs at batch 512
    c.warmup_steps = 500
    c.lr = 3e-5
    c.label_smoothing = 0.0
    c.frozen = ()  # ("visual",): train the head only (a linear probe started from the zero-shot head)
    c.log_every = 50
    c.mesh = "dp"  # data parallel; parameters are replicated

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # computation dtype ("bfloat16" on accelerators); parameters stay float32

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.weight_decay = 0.1
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip_norm = 1.0

    c.data = ml_collections.ConfigDict()
    c.data.train = a.data  # "scenes" | "dir:PATH" | an ImageFolder path | a prepared TFDS name
    c.data.train_split = "train"
    c.data.eval = a.data  # "" to skip evaluation
    c.data.eval_split = "test"
    c.data.eval_batch_size = 256
    c.data.max_eval_examples = 0  # 0: the whole split
    # None: the dataset's own set; else a set name, a file, one template with {} or a list of them
    c.data.templates = ml_collections.FieldReference(None, field_type=object)
    c.data.tokenizer = a.tokenizer  # "": CLIP BPE; "sentencepiece:PATH"; "folded" for test models
    c.data.crop_scale = (0.9, 1.0)
    c.data.num_threads = 2

    if a.runlocal:
        c.batch_size, c.total_steps, c.warmup_steps, c.log_every = 16, 4, 1, 1
        c.lr = 1e-4
        c.data.eval_batch_size, c.data.max_eval_examples = 64, 128
    return c
