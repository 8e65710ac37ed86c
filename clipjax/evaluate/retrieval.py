"""Zero-shot image–text retrieval: Recall@K in both directions, several captions per image (as CLIP_benchmark).

    image retrieval (text → image)   every caption is a query; a hit when its own image is among the top K images
    text retrieval  (image → text)   every image is a query; a hit when any of its captions is among the top K texts

Scores are cosine similarities. Ties are broken by index (the lower index ranks first), so results are
deterministic. Non-finite features (a model with NaN or Inf weights) are a `NonFiniteFeaturesError`, never a
score: NaN similarities would otherwise rank every positive first. Metric names follow CLIP_benchmark:
``image_retrieval_recall@K``, ``text_retrieval_recall@K``.

Letters: I images, T texts (captions), E embed dim, Q queries in a chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clipjax.evaluate import datasets
from clipjax.evaluate.features import Encoder, finite_context, image_features, make_tokenizer, require_finite
from clipjax.models.config import CLIPConfig

DEFAULT_KS = (1, 5, 10)
_CHUNK = 1024


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def best_positive_rank(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Rank (0 = first) of the best-ranked positive of each row, descending scores, ties to the lower index.

    scores [Q, D], positive bool [Q, D] (every row has at least one positive) → int [Q].
    """
    masked = np.where(positive, scores, -np.inf)  # [Q, D]
    best = masked.max(axis=1, keepdims=True)  # [Q, 1]
    first = np.argmax(positive & (scores == best), axis=1)  # [Q] lowest index among the best positives
    above = (scores > best).sum(axis=1)  # [Q]
    index = np.arange(scores.shape[1])[None, :]  # [1, D]
    tied_before = ((scores == best) & (index < first[:, None])).sum(axis=1)  # [Q]
    return above + tied_before


def recall_at_k(image_features: np.ndarray, text_features: np.ndarray, text_to_image: Sequence[int],
                ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@K both ways. image_features [I, E], text_features [T, E], text_to_image [T] (the image of each text)."""
    img = _normalize(require_finite(image_features, "image features", "images"))  # [I, E]
    txt = _normalize(require_finite(text_features, "text features", "texts"))  # [T, E]
    owner = np.asarray(text_to_image, np.int64)  # [T]
    n_img, n_txt = img.shape[0], txt.shape[0]
    if owner.shape != (n_txt,) or (n_txt and (owner.min() < 0 or owner.max() >= n_img)):
        raise ValueError(f"text_to_image must give an image index in [0, {n_img}) for each of the {n_txt} texts")
    if np.bincount(owner, minlength=n_img).min(initial=1) == 0:
        raise ValueError("every image needs at least one caption")
    rank_t2i = np.concatenate([  # [T]
        best_positive_rank(txt[s:s + _CHUNK] @ img.T,  # [Q, I]
                           owner[s:s + _CHUNK, None] == np.arange(n_img)[None, :])
        for s in range(0, n_txt, _CHUNK)])
    rank_i2t = np.concatenate([  # [I]
        best_positive_rank(img[s:s + _CHUNK] @ txt.T,  # [Q, T]
                           np.arange(s, min(s + _CHUNK, n_img))[:, None] == owner[None, :])
        for s in range(0, n_img, _CHUNK)])
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(np.mean(rank_t2i < k))
        out[f"text_retrieval_recall@{k}"] = float(np.mean(rank_i2t < k))
    return out


class RetrievalEvaluator:
    """Image↔text Recall@K on a captioned split, for any weights of `model_cfg` (`run(variables)`)."""

    task = "retrieval"

    def __init__(self, name: str, model_cfg: CLIPConfig, *, data: str, split: str | None = None,
                 batch_size: int = 256, max_examples: int | None = None, tokenizer: str | None = None,
                 ks: Sequence[int] = DEFAULT_KS, progress: bool = False, cache_images: bool = True):
        self.name, self.cfg, self.data = name, model_cfg, data
        self.ks = tuple(int(k) for k in ks)
        batches, _, self.split = datasets.open_eval_data(
            data, split, task=self.task, image_size=model_cfg.vision.image_size, batch_size=batch_size,
            max_examples=max_examples)
        self.batches = datasets.Cached(batches) if cache_images else batches
        self.batch_size, self.progress = batch_size, progress
        self.tokenize = make_tokenizer(tokenizer, model_cfg)
        self.encoder = Encoder(model_cfg)
        self._tokens: tuple[tuple[str, ...], np.ndarray] | None = None

    def _caption_tokens(self, captions: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 [T, L], text_to_image [T]); tokenised once per distinct caption list."""
        flat = tuple(c for caps in captions for c in caps)
        owner = np.asarray([i for i, caps in enumerate(captions) for _ in caps], np.int64)  # [T]
        if self._tokens is None or self._tokens[0] != flat:
            self._tokens = (flat, np.asarray(self.tokenize(list(flat)), np.int32))
        return self._tokens[1], owner

    def evaluate(self, variables: Any) -> dict[str, Any]:
        with finite_context(f"eval {self.name!r} on {self.data!r} split {self.split!r}"):
            return self._evaluate(variables)

    def _evaluate(self, variables: Any) -> dict[str, Any]:
        feats = image_features(self.encoder, variables, self.batches, progress=self.progress,
                               total=len(self.batches))
        missing = [k for k, caps in zip(feats.keys, feats.captions) if not caps]
        if missing:
            raise ValueError(f"retrieval on {self.data!r} split {self.split!r}: {len(missing)} images without "
                             f"captions (first: {missing[0]!r})")
        tokens, owner = self._caption_tokens(feats.captions)
        txt = require_finite(self.encoder.texts(variables, tokens, self.batch_size), "caption features",
                             "captions")  # [T, E]
        out: dict[str, Any] = recall_at_k(feats.features, txt, owner, self.ks)
        out.update(num_images=int(len(feats.keys)), num_texts=int(len(owner)))
        return out

    def run(self, variables: Any) -> dict[str, float]:
        m = self.evaluate(variables)
        out = {}
        for k in self.ks:
            out[f"retrieval/{self.name}/image_r{k}"] = m[f"image_retrieval_recall@{k}"]
            out[f"retrieval/{self.name}/text_r{k}"] = m[f"text_retrieval_recall@{k}"]
        return out
