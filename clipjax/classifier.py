"""The classification head of a fine-tuned CLIP and its files (the library of `clipjax.finetune`, which re-exports
it): the head (`Head`: logits = normalize(image_tower(x)) @ kernel + bias [B, K]) and its zero-shot start
(`zeroshot_head`), its evaluation (`evaluate_head`, `head_metrics`, `eval_batches`), and the directory a fine-tuning
run writes (`save_finetuned` / `load_finetuned`: model.safetensors, open_clip_config.json, head.safetensors,
classifier.json). The trainer's classify task (`clipjax.tasks.ClassifyTask`) builds on these.

Letters: B batch, E embed dim, K classes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import paths
from clipjax.interop.load import Pretrained, load

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


def save_head(head: Head, path: str | os.PathLike) -> None:
    from clipjax.export import save_safetensors

    save_safetensors({"kernel": np.asarray(head.kernel, np.float32), "bias": np.asarray(head.bias, np.float32)}, path)


def load_head(path: str | os.PathLike) -> Head:
    from safetensors.numpy import load_file

    with paths.local_copy(path) as local:
        t = load_file(os.fspath(local))
    if set(t) != {"kernel", "bias"} or t["kernel"].ndim != 2 or t["bias"].shape != t["kernel"].shape[1:]:
        raise ValueError(f"{path}: expected tensors kernel [E, K] and bias [K], got "
                         f"{ {k: v.shape for k, v in t.items()} }")
    return Head(t["kernel"], t["bias"])


def check_new_dir(out: str | os.PathLike) -> None:
    """Refuses `out` when it holds a model already, or is a training workdir: `clipjax.load` reads a workdir's
    checkpoint, so a model written beside it would never be the one loaded."""
    from clipjax.export import is_training_workdir

    directory = paths.as_path(out)
    if paths.exists(directory / WEIGHTS):
        raise FileExistsError(f"{out} already holds a model ({WEIGHTS}); choose a new directory")
    with paths.storage_errors(directory):
        workdir = paths.is_dir(directory) and is_training_workdir(directory)
    if workdir:
        raise FileExistsError(f"{out} is a clipjax training workdir (clipjax.load would read its checkpoint, not "
                              f"this model); choose a new directory")


def save_finetuned(out: str | os.PathLike, model: Pretrained, head: Head | None = None,
                   classifier: dict[str, Any] | None = None, *, replace: bool = False) -> paths.Path:
    """Write `model` (and `head`, `classifier` metadata) so that `load_finetuned(out)` reads them back exactly.

    The files are written in a fresh sub-directory and then moved into `out` one by one (each move atomic), so a
    crash never leaves a half-written file; in an object store (gs://, s3://) they are written in a local temporary
    directory and uploaded one by one, each as one object. `replace`: overwrite these files when `out` already holds
    them (the trainer rewriting its own outputs); otherwise a directory that holds a model is refused."""
    remote = paths.is_remote(out)
    out = paths.as_path(out)
    if not replace:
        check_new_dir(out)
    if not remote:
        out.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".finetuned-", dir=None if remote else out))
    try:
        _write_finetuned(staging, model, head, classifier)
        if remote:
            paths.upload_dir(staging, out)
        else:
            for f in sorted(staging.iterdir()):
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_finetuned(directory: pathlib.Path, model: Pretrained, head: Head | None,
                     classifier: dict[str, Any] | None) -> None:
    """The files of `save_finetuned`, written into the local `directory`."""
    from clipjax.export import export_open_clip

    export_open_clip(model, directory, name=pathlib.Path(OPEN_CLIP_CONFIG).stem)
    if head is not None:
        save_head(head, directory / HEAD_FILE)
    if classifier is not None:
        (directory / CLASSIFIER_FILE).write_text(json.dumps(classifier, indent=2) + "\n")


def load_finetuned(path: str | os.PathLike, config: Any = None) -> tuple[Pretrained, Head | None, dict[str, Any]]:
    """(model, head or None, classifier metadata or {}) from a `save_finetuned` directory (local or in an object
    store), or plain CLIP weights (anything `clipjax.load(path, config)` accepts: no head, no metadata)."""
    p = paths.as_path(path)
    if not (paths.is_dir(p) and paths.is_file(p / OPEN_CLIP_CONFIG) and paths.is_file(p / WEIGHTS)):
        return load(path, config), None, {}
    model = load(p / WEIGHTS, config if config is not None else p / OPEN_CLIP_CONFIG)
    head = load_head(p / HEAD_FILE) if paths.is_file(p / HEAD_FILE) else None
    meta = json.loads(paths.read_text(p / CLASSIFIER_FILE)) if paths.is_file(p / CLASSIFIER_FILE) else {}
    return model, head, meta


# ============================================================================================ evaluation

def evaluate_head(model: Pretrained, head: Head, batches: Any) -> dict[str, float]:
    """Top-1 (and top-5, mean per-class recall) of the head on eval batches ({"image", "label", "mask"})."""
    return head_metrics(model.config, model.variables, head.kernel, head.bias, batches)


def head_metrics(cfg: Any, variables: Any, kernel: np.ndarray, bias: np.ndarray, batches: Any) -> dict[str, float]:
    """`evaluate_head` for CLIP variables that may live on a training mesh."""
    from clipjax.evaluate.features import Encoder, image_features
    from clipjax.evaluate.zeroshot import classification_metrics

    feats = image_features(Encoder(cfg), variables, batches)  # unit norm [N, E]
    logits = feats.features @ np.asarray(kernel) + np.asarray(bias)  # [N, K]
    m = classification_metrics(logits, feats.labels)
    return {k: v for k, v in m.items() if k != "per_class_recall"}


def eval_batches(spec: str, split: str, image_size: int, batch_size: int, max_examples: int | None = None):
    """Re-iterable eval batches whose labels index all of the dataset's classes (as the head's do)."""
    from clipjax.evaluate import datasets

    batches, _, _ = datasets.open_eval_data(spec, split, task="zeroshot", image_size=image_size,
                                            batch_size=batch_size, max_examples=max_examples, label_space="all")
    return datasets.Cached(batches)


def reads_training_records(train: str, train_split: str, eval_spec: str, eval_split: str) -> bool:
    """Whether the evaluation data is the training data: the same dataset and split, or the same ImageFolder (a
    single split, read whatever the split name)."""
    from clipjax.data import sources

    def where(spec: str) -> tuple[str, str]:
        try:
            spec = sources.resolve_spec(spec)
        except ValueError:
            return "spec", str(spec)
        if sources.is_image_folder(spec):
            return "folder", os.path.realpath(os.path.expanduser(spec))
        if spec.startswith(sources.DIR_PREFIX):
            return "dir", os.path.realpath(os.path.expanduser(spec[len(sources.DIR_PREFIX):]))
        return "spec", spec

    kind, place = where(train)
    return (kind, place) == where(eval_spec) and (kind == "folder" or train_split == eval_split)
