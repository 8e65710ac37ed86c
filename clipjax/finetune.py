"""Fine-tune a CLIP image tower as a classifier whose head starts as the zero-shot classifier (WiSE-FT, FLYP).

    python -m clipjax.finetune --config=configs/finetune.py:init_from=PATH --workdir=DIR [--config.key=value ...]

Model: logits = normalize(image_tower(x)) @ kernel + bias  [B, K]. The head starts as the zero-shot classifier:
kernel = exp(logit_scale) · W, where W [E, K] holds the class names × prompt templates embedded by the text tower
(normalised, averaged over templates, renormalised: `clipjax.evaluate.zeroshot.build_classifier`), and bias = 0, so
before the first step the classifier predicts exactly what zero-shot CLIP predicts. Training: softmax cross-entropy
on labelled images (random resized crops), AdamW with warm-up + cosine (`clipjax.optim`), data parallel over all
devices. The image tower and the head train (`config.frozen = ("visual",)` trains the head only); the text tower
and logit_scale are kept as loaded.

Data (`config.data.train` / `config.data.eval`): a labelled dataset spec of `clipjax.data.sources` ("scenes",
"dir:PATH" from `clipjax.data.ingest`, a prepared TFDS name) or an ImageFolder path (one subfolder per class).
Labels index the dataset's class names (all classes of the dataset, whatever the split).

The output directory (`--workdir`) receives:
    model.safetensors        the CLIP, image tower fine-tuned, as an open_clip state dict (`clipjax.export`)
    open_clip_config.json    its open_clip model config: clipjax.load(DIR/model.safetensors, DIR/open_clip_config.json)
    head.safetensors         the classification head {"kernel" [E, K], "bias" [K]}
    classifier.json          {"classnames", "templates", "tokenizer", "init_from"}: what the head classifies
    finetune_config.json     the config of the run; metrics.jsonl: loss, accuracy, lr, and the head's accuracy on
                             the eval split at step 0 (the zero-shot classifier) and at the end
`load_finetuned(DIR)` returns (model, head, classifier metadata); open_clip and `python -m clipjax.export` read the
weights as they are. `python -m clipjax.wise_ft` interpolates such a directory with the zero-shot weights.

Letters: B batch, S image side, E embed dim, K classes.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clipjax import sharding as shd
from clipjax.interop.load import Pretrained, load
from clipjax.models.clip import CLIP, l2_normalize

log = logging.getLogger(__name__)
WEIGHTS, OPEN_CLIP_CONFIG = "model.safetensors", "open_clip_config.json"
HEAD_FILE, CLASSIFIER_FILE = "head.safetensors", "classifier.json"


# ============================================================================================ head

@dataclasses.dataclass
class Head:
    """Linear classifier on unit-norm image features: logits = normalize(features) @ kernel + bias."""

    kernel: np.ndarray  # float32 [E, K]
    bias: np.ndarray  # float32 [K]

    def params(self) -> dict[str, jax.Array]:
        return {"kernel": jnp.asarray(self.kernel, jnp.float32), "bias": jnp.asarray(self.bias, jnp.float32)}


def zeroshot_head(model: Pretrained, classnames: Sequence[str], templates: Sequence[str],
                  tokenizer: str | None = None, batch_size: int = 256) -> Head:
    """The zero-shot classifier of `model` as a head: kernel = exp(logit_scale) · W [E, K], bias 0."""
    from clipjax.evaluate.features import make_tokenizer
    from clipjax.evaluate.zeroshot import build_classifier

    w = build_classifier(model.encode_text, make_tokenizer(tokenizer or None, model.config), classnames, templates,
                         batch_size)  # [E, K], unit-norm columns
    return Head(np.float32(np.exp(model.logit_scale)) * w, np.zeros(w.shape[1], np.float32))


def head_logits(features: jax.Array, head: dict[str, jax.Array]) -> jax.Array:
    return l2_normalize(features) @ head["kernel"] + head["bias"]  # [B, E] @ [E, K] → [B, K]


def save_head(head: Head, path: str | os.PathLike) -> None:
    from safetensors.numpy import save_file

    save_file({"kernel": np.asarray(head.kernel, np.float32), "bias": np.asarray(head.bias, np.float32)},
              os.fspath(path))


def load_head(path: str | os.PathLike) -> Head:
    from safetensors.numpy import load_file

    t = load_file(os.fspath(path))
    if set(t) != {"kernel", "bias"} or t["kernel"].ndim != 2 or t["bias"].shape != t["kernel"].shape[1:]:
        raise ValueError(f"{path}: expected tensors kernel [E, K] and bias [K], got "
                         f"{ {k: v.shape for k, v in t.items()} }")
    return Head(t["kernel"], t["bias"])


def check_new_dir(out: str | os.PathLike) -> None:
    if (pathlib.Path(out) / WEIGHTS).exists():
        raise FileExistsError(f"{out} already holds a model ({WEIGHTS}); choose a new directory")


def save_finetuned(out: str | os.PathLike, model: Pretrained, head: Head | None = None,
                   classifier: dict[str, Any] | None = None) -> pathlib.Path:
    """Write `model` (and `head`, `classifier` metadata) so that `load_finetuned(out)` reads them back exactly."""
    from clipjax.export import export_open_clip

    check_new_dir(out)
    out = export_open_clip(model, out, name=pathlib.Path(OPEN_CLIP_CONFIG).stem)
    if head is not None:
        save_head(head, out / HEAD_FILE)
    if classifier is not None:
        (out / CLASSIFIER_FILE).write_text(json.dumps(classifier, indent=2) + "\n")
    return out


def load_finetuned(path: str | os.PathLike, config: Any = None) -> tuple[Pretrained, Head | None, dict[str, Any]]:
    """(model, head or None, classifier metadata or {}) from a `save_finetuned` directory, or plain CLIP weights
    (anything `clipjax.load(path, config)` accepts: no head, no metadata)."""
    p = pathlib.Path(path)
    if not (p.is_dir() and (p / OPEN_CLIP_CONFIG).is_file() and (p / WEIGHTS).is_file()):
        return load(path, config), None, {}
    model = load(p / WEIGHTS, config if config is not None else p / OPEN_CLIP_CONFIG)
    head = load_head(p / HEAD_FILE) if (p / HEAD_FILE).is_file() else None
    meta = json.loads((p / CLASSIFIER_FILE).read_text()) if (p / CLASSIFIER_FILE).is_file() else {}
    return model, head, meta


# ============================================================================================ data

class LabelledImages:
    """Random-access (image, label) pairs of one split of a labelled dataset, with the dataset's class names."""

    def __init__(self, spec: str, split: str = "train"):
        from clipjax.evaluate import datasets

        self.spec, self.split = spec, split
        if datasets.is_image_folder(spec):
            folder = datasets.ImageFolder(spec, image_size=1, batch_size=1)
            self.classnames, self._items, self._source = list(folder.classnames), folder.items, None
        else:
            from clipjax.data import sources

            pspec = datasets.pipeline_spec(spec)
            self._source, self._items = sources.open_source(pspec, split), None
            self.classnames = sources.get_classnames(pspec)

    def __len__(self) -> int:
        return len(self._items) if self._source is None else len(self._source)

    def get(self, index: int) -> tuple[Any, int]:
        """(image path or bytes, label) of example `index`."""
        if self._source is None:
            path, label = self._items[index]
            return path, int(label)
        rec = self._source.record(index)
        return rec.image, int(rec.label)


class TrainBatches:
    """Batch k of an endless shuffled stream, a pure function of (seed, k) — so a run is reproducible.

    Slot t = k·B + i reads example perm_e[t mod N] of epoch e = t // N (perm_e from `default_rng([seed, e])`) with
    a random resized crop drawn from `default_rng([seed, t])`.
    """

    def __init__(self, data: LabelledImages, batch_size: int, image_size: int, seed: int,
                 scale: tuple[float, float] = (0.9, 1.0), num_threads: int = 2):
        if len(data) == 0:
            raise ValueError(f"dataset {data.spec!r} split {data.split!r} is empty")
        self.data, self.batch_size, self.image_size, self.seed = data, batch_size, image_size, seed
        self.scale, self.num_classes = tuple(scale), len(data.classnames)
        self._pool = cf.ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="clipjax-finetune")
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:  # a batch spans at most two epochs
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))  # [N]
        return self._perms[epoch]

    def _load(self, t: int) -> tuple[np.ndarray, int]:
        from clipjax.data.preprocess import train_transform

        n = len(self.data)
        index = int(self._perm(t // n)[t % n])
        image, label = self.data.get(index)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"dataset {self.data.spec!r} split {self.data.split!r}: example {index} has label "
                             f"{label}, outside the {self.num_classes} classes")
        rng = np.random.default_rng([self.seed, t])
        return train_transform(image, self.image_size, rng, scale=self.scale), label  # [S, S, 3]

    def batch(self, k: int) -> dict[str, np.ndarray]:
        rows = list(self._pool.map(self._load, range(k * self.batch_size, (k + 1) * self.batch_size)))
        return {"image": np.stack([r[0] for r in rows]),  # [B, S, S, 3]
                "label": np.asarray([r[1] for r in rows], np.int32)}  # [B]


# ============================================================================================ update step

def _split(variables: dict[str, Any]) -> tuple[dict, dict, dict]:
    """CLIP variables → (image tower params, the other params, BatchNorm statistics)."""
    params = dict(variables["params"])
    return params.pop("visual"), params, dict(variables.get("batch_stats") or {})


def make_train_step(model: CLIP, tx: optax.GradientTransformation, *, train_tower: bool = True,
                    label_smoothing: float = 0.0):
    """step(state, fixed, batch) → (state, metrics); state = {"params": {"visual", "head"}, "opt_state",
    "batch_stats"}, `fixed` = the CLIP params that do not train (text tower, logit_scale)."""

    def loss_fn(trainable, batch_stats, fixed, batch):
        variables = {"params": {**fixed, "visual": trainable["visual"]}}
        if batch_stats:  # ResNet: BatchNorm statistics update while the tower trains
            variables["batch_stats"] = batch_stats
            feats, updated = model.apply(variables, batch["image"], train_tower, method=CLIP.encode_image,
                                         mutable=["batch_stats"])
            batch_stats = updated["batch_stats"]
        else:
            feats = model.apply(variables, batch["image"], train_tower, method=CLIP.encode_image)  # [B, E]
        logits = head_logits(feats, trainable["head"])  # [B, K]
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)  # [B, K]
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        return loss, (batch_stats, accuracy)

    def step(state, fixed, batch):
        (loss, (batch_stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], fixed, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
               "batch_stats": batch_stats}
        return new, {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}

    return step


# ============================================================================================ evaluation

def evaluate_head(model: Pretrained, head: Head, batches: Any) -> dict[str, float]:
    """Top-1 (and top-5, mean per-class recall) of the head on eval batches ({"image", "label", "mask"})."""
    from clipjax.evaluate.features import Encoder, image_features
    from clipjax.evaluate.zeroshot import classification_metrics

    feats = image_features(Encoder(model.config), model.variables, batches)  # unit norm [N, E]
    logits = feats.features @ head.kernel + head.bias  # [N, K]
    m = classification_metrics(logits, feats.labels)
    return {k: v for k, v in m.items() if k != "per_class_recall"}


def eval_batches(spec: str, split: str, image_size: int, batch_size: int, max_examples: int | None = None):
    """Re-iterable eval batches whose labels index all of the dataset's classes (as the head's do)."""
    from clipjax.evaluate import datasets

    batches, _, _ = datasets.open_eval_data(spec, split, task="zeroshot", image_size=image_size,
                                            batch_size=batch_size, max_examples=max_examples, label_space="all")
    return datasets.Cached(batches)


# ============================================================================================ fine-tuning loop

def default_config() -> ml_collections.ConfigDict:
    """Every key `finetune` reads, with the WiSE-FT recipe's values (configs/finetune.py holds the same keys)."""
    c = ml_collections.ConfigDict()
    c.init_from = ""  # the weights to fine-tune: anything clipjax.load accepts
    c.init_config = ""  # their config when clipjax.load needs one
    c.seed = 0
    c.batch_size = 512
    c.total_steps = 25_000
    c.warmup_steps = 500
    c.lr = 3e-5
    c.label_smoothing = 0.0
    c.frozen = ()  # ("visual",): train the head only
    c.log_every = 50
    c.mesh = "dp"
    c.model = ml_collections.ConfigDict({"dtype": "float32"})
    c.optimizer = ml_collections.ConfigDict({"weight_decay": 0.1, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                                             "grad_clip_norm": 1.0})
    c.data = ml_collections.ConfigDict({
        "train": "scenes", "train_split": "train", "eval": "scenes", "eval_split": "test", "eval_batch_size": 256,
        "max_eval_examples": 0, "tokenizer": "", "crop_scale": (0.9, 1.0), "num_threads": 2})
    c.data.templates = ml_collections.FieldReference(None, field_type=object)  # None: the dataset's own set
    return c


def _templates(config: ml_collections.ConfigDict) -> list[str]:
    from clipjax.evaluate.templates import get_templates
    from clipjax.evaluate.zeroshot import default_templates

    return get_templates(config.data.templates or default_templates(config.data.train))


def finetune(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Fine-tune `config.init_from` on `config.data.train`; write the workdir (see the module docstring)."""
    from clipjax.metrics import MetricWriter
    from clipjax.optim import make_optimizer, make_schedule

    check_new_dir(workdir)
    workdir = pathlib.Path(workdir)
    if not config.init_from:
        raise ValueError("config.init_from is required: the weights to fine-tune (anything clipjax.load accepts)")
    pretrained = load(config.init_from, config.init_config or None)
    cfg = pretrained.config.replace(dtype=config.model.dtype)
    model = CLIP(cfg)
    data = LabelledImages(config.data.train, config.data.train_split)
    templates, tokenizer = _templates(config), config.data.tokenizer or None
    head = zeroshot_head(pretrained, data.classnames, templates, tokenizer)
    log.info("zero-shot head: %d classes × %d templates", len(data.classnames), len(templates))

    mesh = shd.make_mesh(config.mesh if isinstance(config.mesh, str) else dict(config.mesh))
    if config.batch_size % shd.batch_device_count(mesh):
        raise ValueError(f"batch_size={config.batch_size} is not divisible by the {shd.batch_device_count(mesh)} "
                         f"batch devices")
    rep = shd.replicated(mesh)
    visual, fixed, batch_stats = _split(pretrained.variables)
    params = {"visual": visual, "head": head.params()}
    o = config.optimizer
    tx = make_optimizer(params, lr=config.lr, warmup_steps=config.warmup_steps, total_steps=config.total_steps,
                        weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, grad_clip_norm=o.grad_clip_norm,
                        frozen=tuple(config.frozen))
    state = jax.device_put({"params": params, "opt_state": tx.init(params), "batch_stats": batch_stats}, rep)
    fixed = jax.device_put(fixed, rep)
    train_tower = not any(p.split("/")[0] == "visual" for p in config.frozen)
    step_fn = jax.jit(make_train_step(model, tx, train_tower=train_tower, label_smoothing=config.label_smoothing),
                      donate_argnums=(0,))
    batches = TrainBatches(data, config.batch_size, cfg.vision.image_size, config.seed,
                           tuple(config.data.crop_scale), config.data.num_threads)
    schedule = make_schedule(config.lr, config.warmup_steps, config.total_steps)

    def current(state) -> tuple[Pretrained, Head]:
        s = jax.device_get(state)
        variables = {"params": {**jax.device_get(fixed), "visual": s["params"]["visual"]}}
        if s["batch_stats"]:
            variables["batch_stats"] = s["batch_stats"]
        h = s["params"]["head"]
        return Pretrained(cfg, variables, f"{workdir}"), Head(np.asarray(h["kernel"]), np.asarray(h["bias"]))

    evals = None
    if config.data.eval:
        evals = eval_batches(config.data.eval, config.data.eval_split, cfg.vision.image_size,
                             config.data.eval_batch_size, config.data.max_eval_examples or None)
    writer = MetricWriter(workdir)
    last: dict[str, float] = {}
    try:
        if evals is not None:
            last = {f"eval/{k}": v for k, v in evaluate_head(*current(state), evals).items()}
            writer.write(0, last)
            log.info("step 0 (zero-shot head): eval top1 %.4f", last["eval/top1"])
        for k in range(config.total_steps):
            batch = batches.batch(k)
            batch = {n: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for n, v in batch.items()}
            state, metrics = step_fn(state, fixed, batch)
            step = k + 1
            if step % config.log_every == 0 or step == config.total_steps:
                m = {n: float(v) for n, v in jax.device_get(metrics).items()}
                if not np.isfinite(m["loss"]):
                    raise FloatingPointError(f"step {step}: non-finite loss {m['loss']}")
                m["lr"] = float(schedule(k))
                writer.write(step, m)
                last.update(m)
                log.info("step %d/%d: loss %.4f accuracy %.3f", step, config.total_steps, m["loss"], m["accuracy"])
        final, final_head = current(state)
        if evals is not None:
            result = {f"eval/{k}": v for k, v in evaluate_head(final, final_head, evals).items()}
            writer.write(config.total_steps, result)
            last.update(result)
            log.info("step %d: eval top1 %.4f", config.total_steps, result["eval/top1"])
    finally:
        writer.close()
    classifier = {"classnames": list(data.classnames), "templates": list(templates), "tokenizer": tokenizer,
                  "init_from": str(config.init_from)}
    save_finetuned(workdir, final, final_head, classifier)
    (workdir / "finetune_config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    return last


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Path of a fine-tuning config file[:arg].",
                                                  lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, "Output directory (must not hold a model yet).")

    def run(_argv):
        if workdir_flag.value is None:
            raise app.UsageError("--workdir is required")
        from clipjax.cpu import apply_cpu_defaults

        apply_cpu_defaults()
        logging.getLogger("absl").setLevel(logging.WARNING)
        finetune(config_flag.value, workdir_flag.value)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    app.run(run, argv)


if __name__ == "__main__":
    main()
