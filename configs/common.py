"""Shared config pieces: every key the trainer reads, with its default (the one place defaults live), and
`parse_arg` for `--config=file.py:a=1,b=x`. Importable as `clipjax.configs.common` when clipjax is installed."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults):
    """`"res=224,runlocal"` → ConfigDict with typed values (types from `defaults`; a bare name means True)."""
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for part in arg.split(","):
        if not part:
            continue
        key, _, value = part.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} unknown; valid: {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            out[key] = value.lower() not in ("0", "false", "no") if value else True
        else:
            out[key] = kind(value)
    return out


def base_config() -> ml_collections.ConfigDict:
    """Every key a recipe may set, with defaults; recipes override what differs."""
    c = ml_collections.ConfigDict()
    c.task = "contrastive"  # "contrastive" (CLIP / SigLIP / LiT) | "classify" (fine-tune a classifier head)
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 256  # global
    c.lr = 5e-4
    c.warmup_steps = 100
    c.log_every = 10
    c.ckpt_every = 500
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.eval_every = 500
    c.loss = "clip"  # "clip" | "siglip" | "clip_tiled" (task "contrastive")
    c.label_smoothing = 0.0  # task "classify"
    c.accum_steps = 1
    c.frozen = ()  # parameter prefixes to lock, e.g. ("visual",) for LiT
    c.reinit = ()  # prefixes that keep their fresh init over init_from (LiT: ("text",))
    c.init_from = ""  # weights to start from: anything clipjax.load accepts
    c.init_config = ""  # its config when clipjax.load needs one
    c.max_nonfinite_steps = 10
    c.compilation_cache = ""  # persistent XLA cache: "" the user's cache dir, "off", or a path (clipjax.compile_cache)
    c.peak_flops_per_device = 0.0  # set to report MFU (e.g. 197e12 for a TPU v5e chip, bf16)
    # A workdir resumes only with the settings its steps ran with (its config.json), but for those that do not change
    # the numbers (clipjax.config_checks.RESUME_FREE_KEYS: total_steps, log_every, data.workers, ...). To resume with
    # others, name them here, comma-separated ("batch_size,model.dtype"; "optimizer" for all its keys): the change is
    # then recorded in the workdir's config_history.jsonl. The checks of these keys: clipjax/config_checks.py
    c.allow_resume_changes = ""
    # mesh axis sizes (-1: the rest); slices: TPU slices, data parallel over the data-centre network (0: as found)
    c.mesh = ml_collections.ConfigDict({"slices": 0, "data": -1, "fsdp": 1, "tensor": 1})

    c.model = ml_collections.ConfigDict()
    c.model.name = "ViT-B-32"
    c.model.dtype = "float32"  # computation dtype; "bfloat16" on accelerators
    c.model.remat = "none"  # "none" | "full" | "dots" | "dots_no_batch"
    c.model.scan_layers = False
    c.model.quick_gelu = ml_collections.FieldReference(None, field_type=bool)  # None: the architecture's own
    c.model.open_clip_config = ml_collections.ConfigDict()  # an open_clip model config; replaces model.name when set
    c.model.init_logit_scale = ml_collections.FieldReference(None, field_type=float)  # None: ln(1/0.07); SigLIP ln 10
    c.model.init_logit_bias = -10.0  # SigLIP only
    c.model.patch_dropout = 0.0  # FLIP: fraction of ViT patch tokens dropped per image in training (never at eval)

    # Phases that train on fewer tokens before full size (clipjax/phases.py): a list of
    # {steps, image_size, context_length, patch_dropout}; the steps after the last phase run at the model's values.
    c.schedule = ml_collections.FieldReference((), field_type=object)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.weight_decay = 0.2
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98  # ViT; ResNets use 0.999
    c.optimizer.eps = 1e-6  # ViT; ResNets use 1e-8
    c.optimizer.grad_clip_norm = 1.0  # global-norm clipping; 0: none

    c.data = ml_collections.ConfigDict()
    c.data.train = "synthetic"  # "scenes" | "dir:/path" | "wds:PATTERN" | an ImageFolder | a TFDS name | "synthetic"
    c.data.train_split = "train"
    # {spec: weight} or ((spec, weight), ...), of any kinds, wds: streams too; when set, replaces `train`. Not a
    # ConfigDict: its keys could not hold the dots of paths (".tar")
    c.data.mix = ml_collections.FieldReference((), field_type=object)
    c.data.tokenizer = "clip"  # "clip" | "sentencepiece:/path/to/model"
    c.data.crop_scale = (0.9, 1.0)
    c.data.workers = 0  # decoding worker processes per host (0: threads in the training process)
    c.data.num_threads = 2  # decoding threads per host (per worker process when workers > 0)
    # wds: streams (alone or in data.mix): samples in each stream's seeded shuffle buffer, per host (1: shard order);
    # a larger one mixes further across shards, and a resume reads its samples again (wds.DEFAULT_SHUFFLE_BUFFER)
    c.data.shuffle_buffer = 1000
    # Fault injection for tests and drills, read by the synthetic source only: all-NaN images at these steps (the
    # trainer must skip and count them) and a delay per batch (a slow input pipeline).
    c.data.synthetic_nan_steps = ()
    c.data.synthetic_seconds_per_batch = 0.0
    # The head's evaluation when classifying (task "classify"): "" skips it; the zero-shot prompts that build the head
    c.data.eval = ""
    c.data.eval_split = "test"
    c.data.eval_batch_size = 256
    c.data.max_eval_examples = 0  # 0: the whole split
    c.data.templates = ml_collections.FieldReference(None, field_type=object)  # None: the dataset's own set

    c.evals = ml_collections.ConfigDict()
    return c


def pod_recipe(c: ml_collections.ConfigDict, *, model: str, lr: float, runlocal: bool,
               data: str = "") -> ml_collections.ConfigDict:
    """The paper / open_clip recipe for a pod: global batch 32 768, AdamW wd 0.2, warm-up 10 000, cosine. `data` is
    the training data spec (e.g. "dir:/data/laion" or "wds:gs://bucket/laion/{00000..41455}.tar"); without it the
    trainer stops at once and says what to pass."""
    c.model.name = model
    c.lr = lr
    c.batch_size = 32768
    c.warmup_steps = 10000
    c.total_steps = 32 * 400_000_000 // 32768  # 32 epochs of 400M pairs
    c.model.dtype = "bfloat16"
    c.model.remat = "dots_no_batch"
    c.model.scan_layers = True
    c.mesh = ml_collections.ConfigDict({"slices": 0, "data": 1, "fsdp": -1, "tensor": 1})
    c.ckpt_every = 2000
    c.log_every = 100
    c.eval_every = 5000
    c.data.train = data  # "": no default data for a pod: the trainer asks for it
    if runlocal:  # a CPU smoke run of the same recipe
        c.batch_size, c.total_steps, c.warmup_steps = 8, 2, 1
        c.model.dtype, c.model.remat, c.model.scan_layers = "float32", "none", False
        c.ckpt_every, c.log_every = 2, 1
        c.data.train = "synthetic"
        c.mesh = ml_collections.ConfigDict({"slices": 0, "data": -1, "fsdp": 1, "tensor": 1})
    return c
