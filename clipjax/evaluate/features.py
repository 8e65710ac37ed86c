"""Feature extraction for evaluation: jitted, batched image and text encoders and the tokenizer of a model.

The encoders take the model variables as an argument, so one compiled function serves every evaluation during
training (weights change, shapes do not). Batches always have the same size (the last one is padded and masked),
so each encoder compiles once. When the variables live on several devices (a training mesh), image batches are
sharded over the mesh's batch axes.

Letters: N examples, B batch, E embed dim, L context length, S image side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from clipjax import sharding as shd
from clipjax.models.clip import CLIP
from clipjax.models.config import CLIPConfig

Tokenizer = Callable[[Sequence[str]], np.ndarray]  # texts → int32 [N, L]

CLIP_VOCAB_SIZE = 49408


# ============================================================================================ non-finite features

class NonFiniteFeaturesError(ValueError):
    """A model gave NaN or Inf features (or classifier weights): no score is computed from them."""


def require_finite(x: Any, what: str, rows: str = "rows") -> np.ndarray:
    """`x` [N, ...] as an array, or NonFiniteFeaturesError naming `what` and how many of its N `rows` hold a NaN
    or Inf (a model with non-finite weights would otherwise score as if it ranked everything first)."""
    x = np.asarray(x)
    if x.ndim == 0 or x.size == 0:
        bad, n = int(x.size and not np.isfinite(x)), 1
    else:
        bad, n = int((~np.isfinite(x.reshape(len(x), -1))).any(axis=1).sum()), len(x)
    if bad:
        raise NonFiniteFeaturesError(f"{what}: {bad} of {n} {rows} hold NaN or Inf (non-finite weights?)")
    return x


@contextlib.contextmanager
def finite_context(prefix: str) -> Iterator[None]:
    """Prefix `prefix: ` to the message of a NonFiniteFeaturesError raised inside (which model, which data)."""
    try:
        yield
    except NonFiniteFeaturesError as e:
        raise NonFiniteFeaturesError(f"{prefix}: {e}") from None


# ============================================================================================ tokenizers

def make_tokenizer(spec: str | None, cfg: CLIPConfig) -> Tokenizer:
    """The tokenizer for `cfg`'s text tower: None/"clip" (CLIP BPE), "sentencepiece:PATH", or a name given to
    `clipjax.data.tokenizer.register_tokenizer`.

    The CLIP tokenizer needs the CLIP vocabulary; a model with another vocabulary size needs its own tokenizer.
    """
    length, vocab = cfg.text.context_length, cfg.text.vocab_size
    if spec in (None, "", "clip") and vocab != CLIP_VOCAB_SIZE:
        raise ValueError(f"the model's vocabulary has {vocab} ids, the CLIP tokenizer {CLIP_VOCAB_SIZE}: pass its "
                         f"tokenizer ('sentencepiece:/path/model.model')")
    from clipjax.data.tokenizer import get_tokenizer

    tok = get_tokenizer(spec or None, context_length=length, vocab_size=vocab)
    return lambda texts: np.asarray(tok(list(texts), length), np.int32)


# ============================================================================================ encoders

@functools.lru_cache(maxsize=16)
def _encoders(cfg: CLIPConfig, mesh: jax.sharding.Mesh | None = None) -> tuple[Callable, Callable]:
    model = CLIP(cfg)

    def image(variables, images):  # [B, S, S, 3] (uint8 pixels or normalised floats) → [B, E] unit norm
        from clipjax.step import prepare_images

        x = model.apply(variables, prepare_images({"image": images}), method=CLIP.encode_image)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def text(variables, tokens):  # [B, L] → [B, E] unit norm
        x = model.apply(variables, tokens, method=CLIP.encode_text)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    return jax.jit(shd.with_activation_sharding(image, mesh)), jax.jit(shd.with_activation_sharding(text, mesh))


def _batch_sharding(variables: Any, ndim: int, batch: int) -> Any:
    """Shard a batch over the mesh the variables live on (None: let jit place it)."""
    leaf = next((x for x in jax.tree.leaves(variables) if isinstance(x, jax.Array)), None)
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
        return None
    if batch % shd.batch_device_count(sharding.mesh):
        return None
    return shd.batch_sharding(sharding.mesh, ndim)


@dataclasses.dataclass
class Encoder:
    """Unit-norm image and text features of one model configuration, for any weights of that configuration."""

    cfg: CLIPConfig

    def _put(self, variables: Any, x: np.ndarray) -> Any:
        sharding = _batch_sharding(variables, x.ndim, x.shape[0])
        return jax.device_put(x, sharding) if sharding is not None else x

    def images(self, variables: Any, images: np.ndarray) -> np.ndarray:
        """float32 [B, S, S, 3] preprocessed images (or uint8 pixels, normalised on the device) → float32 [B, E]
        unit-norm features."""
        encode = _encoders(self.cfg, shd.mesh_of(variables))[0]
        images = np.asarray(images)
        images = images if images.dtype == np.uint8 else images.astype(np.float32)
        return np.asarray(encode(variables, self._put(variables, images)))

    def texts(self, variables: Any, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """int32 [N, L] → float32 [N, E] unit-norm features."""
        encode = _encoders(self.cfg, shd.mesh_of(variables))[1]
        return encode_in_batches(lambda t: np.asarray(encode(variables, self._put(variables, t))),
                                 np.asarray(tokens, np.int32), batch_size, self.cfg.embed_dim)


def encode_in_batches(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch_size: int, dim: int = 0) -> np.ndarray:
    """`fn` over fixed-size chunks of `x` [N, ...] (the last one padded by repeating its final row, so `fn`
    compiles once) → float32 [N, dim]."""
    n = x.shape[0]
    if n == 0:
        return np.zeros((0, dim), np.float32)
    b = min(batch_size, n)
    out = []
    for start in range(0, n, b):
        chunk = x[start:start + b]  # [≤b, ...]
        pad = b - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])  # [b, ...]
        out.append(np.asarray(fn(chunk), np.float32)[:b - pad])  # [≤b, dim]
    return np.concatenate(out)  # [N, dim]


# ============================================================================================ datasets → features

@dataclasses.dataclass
class ImageFeatures:
    """Unit-norm features of an eval split, with what each example carries."""

    features: np.ndarray  # float32 [N, E]
    labels: np.ndarray  # int32 [N]
    captions: list[list[str]]  # N lists
    keys: list[str]


def collect_batches(batches: Iterable[dict]) -> list[dict]:
    """The batches of a source kept in host memory, for evaluations that re-encode the same images."""
    return list(batches)


def image_features(encoder: Encoder, variables: Any, batches: Iterable[dict], *, progress: bool = False,
                   total: int | None = None, desc: str = "images") -> ImageFeatures:
    """Encode every valid row of `batches` ({"image", "label", "mask", "captions", "key"} batches)."""
    feats, labels, captions, keys = [], [], [], []
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=total, desc=desc, unit="batch")
    for batch in batches:
        mask = np.asarray(batch["mask"], bool)  # [B]
        if not mask.any():
            continue
        f = encoder.images(variables, batch["image"])  # [B, E]
        feats.append(f[mask])
        labels.append(np.asarray(batch["label"], np.int32)[mask])
        captions += [list(c) for c, m in zip(batch["captions"], mask) if m]
        keys += [k for k, m in zip(batch["key"], mask) if m]
    if not feats:
        raise ValueError("the evaluation data yielded no examples")
    features = require_finite(np.concatenate(feats), "image features", "images")  # [N, E]
    return ImageFeatures(features, np.concatenate(labels), captions, keys)
