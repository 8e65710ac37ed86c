"""Zero-shot classification as in the CLIP paper: a classifier built from prompts, then argmax over classes.

Classifier (prompt ensembling, paper §3.1.4): for each class, embed every template filled with the class name,
L2-normalise each embedding, average over templates, re-normalise → W [E, C]. Logits = 100 · normalize(image
features) @ W. Metrics: top-1, top-5 (with at least 5 classes) and the mean per-class recall (balanced accuracy,
CLIP_benchmark's ``mean_per_class_recall``). A classifier or image features holding NaN or Inf (non-finite
weights) are a `NonFiniteFeaturesError` naming the data and how many rows; such a classifier is never cached.

Letters: N images, C classes, T templates, E embed dim, L context length.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clipjax.evaluate import datasets, templates as tpl
from clipjax.evaluate.features import (Encoder, encode_in_batches, finite_context, image_features, make_tokenizer,
                                       require_finite)
from clipjax.models.config import CLIPConfig

LOGIT_SCALE = 100.0


# ============================================================================================ classifier

class ClassifierCache:
    """Caches prompt tokens and zero-shot classifiers, in memory and optionally on disk (``directory``).

    Tokens depend only on the tokenizer and the prompts, so they are re-used by every evaluation during training.
    A classifier also depends on the weights: it is cached only under a `model_key` that names fixed weights (a
    checkpoint path and step; the evaluator adds the model config they were read with); evaluations of changing
    weights pass no key and only re-use the tokens.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = pathlib.Path(directory).expanduser() if directory else None
        self._memory: dict[str, np.ndarray] = {}

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get(self, key: str, make: Callable[[], np.ndarray], kind: str) -> np.ndarray:
        if key in self._memory:
            return self._memory[key]
        path = self.directory / f"{kind}-{key}.npy" if self.directory else None
        if path is not None and path.is_file():
            value = np.load(path)
        else:
            value = make()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
                np.save(tmp, value)
                os.replace(tmp, path)
        self._memory[key] = value
        return value


def build_classifier(encode_text: Callable[[np.ndarray], Any], tokenize: Callable[[Sequence[str]], np.ndarray],
                     classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256, *,
                     cache: ClassifierCache | None = None, tokenizer_key: str | None = None,
                     model_key: str | None = None) -> np.ndarray:
    """Zero-shot classifier W float32 [E, C] (columns unit norm).

    `encode_text(tokens [B, L]) → [B, E]` (normalised or not); `tokenize(texts) → int32 [N, L]`. With `cache`,
    tokens are cached under `tokenizer_key` (when given) and W under `model_key` (when given).
    """
    classnames, templates = list(classnames), tpl.check_templates(templates)
    if not classnames:
        raise ValueError("no class names")
    c, t = len(classnames), len(templates)

    def tokens() -> np.ndarray:
        return np.asarray(tokenize(tpl.fill(templates, classnames)), np.int32)  # [C·T, L]

    def classifier() -> np.ndarray:
        toks = cache.get(cache.key("tokens", tokenizer_key, classnames, templates), tokens, "tokens") \
            if cache is not None and tokenizer_key is not None else tokens()
        emb = encode_in_batches(encode_text, toks, batch_size)  # [C·T, E]
        require_finite(emb.reshape(c, -1), "zero-shot classifier (prompt features)", "classes")
        emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        mean = emb.reshape(c, t, -1).mean(axis=1)  # [C, E]
        mean = mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
        return np.ascontiguousarray(mean.T, np.float32)  # [E, C]

    if cache is not None and model_key is not None:
        w = cache.get(cache.key("classifier", model_key, tokenizer_key, classnames, templates), classifier,
                      "classifier")
        return require_finite(w.T, "cached zero-shot classifier", "classes").T
    return classifier()


# ============================================================================================ metrics

def zeroshot_logits(image_features: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    """100 · normalize(image_features) @ classifier: [N, E] × [E, C] → [N, C]."""
    f = require_finite(np.asarray(image_features, np.float32), "image features", "images")
    classifier = require_finite(np.asarray(classifier, np.float32).T, "zero-shot classifier", "classes").T
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)  # [N, E]
    return LOGIT_SCALE * f @ np.asarray(classifier, np.float32)  # [N, C]


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """{"top1", ["top5"], "mean_per_class_recall", "per_class_recall" ([C], NaN for absent classes)}.

    Top-k counts an example as correct when its label is among the k highest logits (ties broken by class
    index); rows with label < 0 are ignored.
    """
    logits, labels = require_finite(logits, "logits", "examples"), np.asarray(labels)
    keep = labels >= 0
    logits, labels = logits[keep], labels[keep]
    n, c = logits.shape
    if n == 0:
        raise ValueError("no labelled examples to score")
    if labels.max() >= c:
        raise ValueError(f"label {labels.max()} out of range for {c} classes")
    order = np.argsort(-logits, axis=1, kind="stable")  # [N, C]
    rank = np.argmax(order == labels[:, None], axis=1)  # [N] position of the true class
    out: dict[str, Any] = {"top1": float(np.mean(rank < 1))}
    if c >= 5:
        out["top5"] = float(np.mean(rank < 5))
    correct = rank == 0
    counts = np.bincount(labels, minlength=c)  # [C]
    hits = np.bincount(labels, weights=correct, minlength=c)  # [C]
    per_class = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)  # [C]
    out["mean_per_class_recall"] = float(np.nanmean(per_class))
    out["per_class_recall"] = per_class.tolist()
    return out


# ============================================================================================ evaluator

def default_templates(spec: str) -> str:
    """Template set used when none is given: the dataset's own (scenes, CIFAR, ImageNet), else ImageNet's 80."""
    if spec == datasets.SCENES:
        return "scenes"
    return datasets.known_name(spec) or "imagenet"


class ZeroShotEvaluator:
    """Zero-shot top-1/top-5 of a model configuration on one dataset split, for any weights (`run(variables)`)."""

    task = "zeroshot"

    def __init__(self, name: str, model_cfg: CLIPConfig, *, data: str, split: str | None = None,
                 templates: str | Sequence[str] | None = None, classnames: str | Sequence[str] | None = None,
                 batch_size: int = 256, max_examples: int | None = None, tokenizer: str | None = None,
                 cache: ClassifierCache | None = None, model_key: str | None = None, progress: bool = False,
                 cache_images: bool = True):
        self.name, self.cfg = name, model_cfg
        self.templates = tpl.get_templates(templates if templates is not None else default_templates(data))
        names = tpl.get_classnames(classnames) if classnames is not None else None
        batches, self.classnames, self.split = datasets.open_eval_data(
            data, split, task=self.task, image_size=model_cfg.vision.image_size, batch_size=batch_size,
            classnames=names, max_examples=max_examples)
        if not self.classnames:
            raise ValueError(f"eval {name!r}: dataset {data!r} split {self.split!r} has no class labels; zero-shot "
                             f"needs class names (classnames=FILE), or evaluate it with type 'retrieval'")
        self.data, self.batches = data, datasets.Cached(batches) if cache_images else batches
        self.batch_size, self.progress = batch_size, progress
        self.tokenizer_spec = tokenizer
        self.tokenize = make_tokenizer(tokenizer, model_cfg)
        self.encoder = Encoder(model_cfg)
        self.cache = cache if cache is not None else ClassifierCache()
        self.model_key = model_key

    def _context(self):
        """Names this eval and its data in a NonFiniteFeaturesError raised inside."""
        return finite_context(f"eval {self.name!r} on {self.data!r} split {self.split!r}")

    def classifier(self, variables: Any, templates: Sequence[str] | None = None) -> np.ndarray:
        """W [E, C] for `variables` (the evaluator's templates unless given)."""
        tok_key = ClassifierCache.key(self.tokenizer_spec, self.cfg.text)
        # the same weights read with another config (e.g. QuickGELU or not) give other text features
        model_key = None if self.model_key is None else ClassifierCache.key(self.model_key, self.cfg.to_dict())
        with self._context():
            return build_classifier(lambda t: self.encoder.texts(variables, t, self.batch_size), self.tokenize,
                                    self.classnames, templates or self.templates, self.batch_size, cache=self.cache,
                                    tokenizer_key=tok_key, model_key=model_key)

    def evaluate(self, variables: Any, templates: Sequence[str] | None = None) -> dict[str, Any]:
        """All metrics (CLIP_benchmark names: acc1, acc5, mean_per_class_recall) plus per-class recall."""
        w = self.classifier(variables, templates)  # [E, C]
        with self._context():
            feats = image_features(self.encoder, variables, self.batches, progress=self.progress,
                                   total=len(self.batches))
        m = classification_metrics(zeroshot_logits(feats.features, w), feats.labels)
        out = {"acc1": m["top1"], "mean_per_class_recall": m["mean_per_class_recall"],
               "num_examples": int(feats.labels.size), "num_classes": len(self.classnames),
               "num_templates": len(templates or self.templates),
               "per_class_recall": dict(zip(self.classnames, m["per_class_recall"]))}
        if "top5" in m:
            out["acc5"] = m["top5"]
        return out

    def run(self, variables: Any) -> dict[str, float]:
        m = self.evaluate(variables)
        out = {f"zeroshot/{self.name}/top1": m["acc1"],
               f"zeroshot/{self.name}/mean_per_class_recall": m["mean_per_class_recall"]}
        if "acc5" in m:
            out[f"zeroshot/{self.name}/top5"] = m["acc5"]
        return out
