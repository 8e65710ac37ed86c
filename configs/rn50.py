"""RN50 with the CLIP paper / open_clip recipe (global batch 32 768, lr 5e-4, wd 0.2, warm-up 10 000, cosine).

Pod:        python -m clipjax.main --config=configs/rn50.py:data=SPEC --workdir=DIR   (on every host)
            SPEC: the training data, e.g. dir:/data/laion400m (from clipjax.data.ingest)
CPU smoke:  python -m clipjax.main --config=configs/rn50.py:runlocal --workdir=/tmp/rn50
  (or any override, e.g. --config.batch_size=8 --config.total_steps=2 --config.data.train=synthetic)
Fits:       v5e-256 (python -m clipjax.aot --config=configs/rn50.py --topology=v5e:16x16): 8.2 GiB per chip of 16 GiB
            (51%) at the paper's global batch 32 768 (128 per chip), as shipped. See experiments/AOT.md.
Reference: OpenAI RN50 reaches the zero-shot ImageNet top-1 listed in clip-facts (paper, Table 11).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg, pod_recipe  # noqa: E402


def get_config(arg=None):
    a = parse_arg(arg, runlocal=False, data="")
    c = pod_recipe(base_config(), model="RN50", lr=5e-4, runlocal=a.runlocal, data=a.data)
    c.optimizer.b2, c.optimizer.eps = 0.999, 1e-8  # the paper's ResNet Adam settings
    return c
