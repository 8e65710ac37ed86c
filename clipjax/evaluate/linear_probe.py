"""Linear probe as in the CLIP paper (appendix A.3): L2-regularised logistic regression on frozen image features.

Features are the model's unit-norm image embeddings (CLIP_benchmark's default). The classifier is multinomial
logistic regression, loss = mean cross-entropy + λ/2 · ||W||² (bias not regularised), fitted full-batch with
L-BFGS (optax, zoom line search) in JAX until max |gradient| ≤ 1e-4 (scikit-learn's criterion) or 1000 steps,
warm-started along the regularisation path. λ is chosen on a validation split
carved from the training features (a seeded random `val_fraction`): a coarse log-spaced sweep, then a finer one
around the best value; the classifier is then refitted on all training features with that λ and scored on the
test split (top-1, top-5, mean per-class recall). Ties in validation accuracy go to the larger λ.
Features holding NaN or Inf (non-finite weights) are a `NonFiniteFeaturesError`; the test split must differ
from the training split (and an ImageFolder, which has no splits, cannot be probed).

Letters: N examples, D feature dim, C classes, K regularisation strengths.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipjax.evaluate import datasets
from clipjax.evaluate.features import Encoder, finite_context, image_features, require_finite
from clipjax.evaluate.zeroshot import classification_metrics
from clipjax.models.config import CLIPConfig

COARSE_GRID = tuple(float(x) for x in np.logspace(-6, 2, 9))  # the paper's range, one point per decade


# ============================================================================================ logistic regression

def _loss(params: dict, x: jax.Array, y1h: jax.Array, l2: jax.Array) -> jax.Array:
    logits = x @ params["w"] + params["b"]  # [N, C]
    ce = -jnp.sum(y1h * jax.nn.log_softmax(logits, axis=-1)) / jnp.maximum(jnp.sum(y1h), 1.0)  # padding rows: 0
    return ce + 0.5 * l2 * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _fit_one(x: jax.Array, y1h: jax.Array, l2: jax.Array, init: dict, *, max_iter: int, tol: float) -> tuple:
    """L-BFGS from `init` until max |gradient| ≤ tol or `max_iter` steps: x [N, D], y1h [N, C] → (params, steps)."""
    fn = functools.partial(_loss, x=x, y1h=y1h, l2=l2)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fn)

    def step(carry):
        params, state, i, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fn)
        gmax = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grad)]))
        return optax.apply_updates(params, updates), state, i + 1, gmax

    def cond(carry):
        return (carry[2] < max_iter) & (carry[3] > tol)

    carry = (init, opt.init(init), jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf, x.dtype))
    params, _, steps, _ = jax.lax.while_loop(cond, step, carry)
    return params, steps


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, l2: float | Sequence[float], *, num_classes: int,
                            max_iter: int = 1000, tol: float = 1e-4, init: dict | None = None) -> dict[str, np.ndarray]:
    """L2-regularised multinomial logistic regression. x [N, D], y [N] → {"w": [K, D, C], "b": [K, C]} for the
    K strengths in `l2` (a float gives K = 1), in the order given. Rows labelled -1 are padding and ignored (so
    fits on subsets can share one compiled shape).

    Strengths are fitted from the largest to the smallest, each warm-started from the previous solution (the
    regularisation path), or from `init` ({"w": [D, C], "b": [C]}) for the first.
    """
    lams = np.atleast_1d(np.asarray(l2, np.float32))  # [K]
    xj = jnp.asarray(x, jnp.float32)  # [N, D]
    y1h = jax.nn.one_hot(jnp.asarray(y, jnp.int32), num_classes, dtype=jnp.float32)  # [N, C]
    params = init if init is not None else {"w": np.zeros((x.shape[1], num_classes), np.float32),
                                            "b": np.zeros((num_classes,), np.float32)}
    params = jax.tree.map(jnp.asarray, params)
    out: dict[int, dict] = {}
    for k in np.argsort(-lams, kind="stable"):
        params, _ = _fit_one(xj, y1h, jnp.asarray(lams[k]), params, max_iter=max_iter, tol=tol)
        out[int(k)] = jax.tree.map(np.asarray, params)
    return {name: np.stack([out[k][name] for k in range(len(lams))]) for name in ("w", "b")}


def predict_logits(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """[K, D, C] weights (or [D, C]) and x [N, D] → logits [K, N, C] (or [N, C])."""
    return np.einsum("nd,...dc->...nc", np.asarray(x, np.float32), params["w"]) + params["b"][..., None, :]


def _accuracy(params: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (predict_logits(params, x).argmax(-1) == y[None, :]).mean(axis=-1)  # [K]


def select_l2(x: np.ndarray, y: np.ndarray, *, num_classes: int, val_fraction: float = 0.2, seed: int = 0,
              grid: Sequence[float] = COARSE_GRID, refine: int = 4, max_iter: int = 1000) -> tuple[float, dict]:
    """λ with the best accuracy on a validation split carved from (x, y). Returns (λ, {λ: val accuracy})."""
    n = x.shape[0]
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"cannot carve a validation split of {val_fraction:.0%} from {n} training examples")
    perm = np.random.default_rng(seed).permutation(n)
    val, train = perm[:n_val], perm[n_val:]
    # The sweep's training rows padded to n (label -1): the same shape as the final fit on all n, one compilation.
    x_fit = np.concatenate([x[train], np.zeros((n_val, x.shape[1]), x.dtype)])  # [N, D]
    y_fit = np.concatenate([y[train], -np.ones(n_val, np.int64)])  # [N]
    scores: dict[float, float] = {}

    def sweep(lams):
        params = fit_logistic_regression(x_fit, y_fit, lams, num_classes=num_classes, max_iter=max_iter)
        scores.update(zip([float(v) for v in lams], _accuracy(params, x[val], y[val]).tolist()))

    def best() -> float:
        top = max(scores.values())
        return max(k for k, v in scores.items() if v == top)

    grid = sorted(float(g) for g in grid)
    sweep(np.asarray(grid))
    if refine and len(grid) > 1:  # a finer log-spaced sweep between the neighbours of the coarse best
        i = grid.index(best())
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        fine = [v for v in np.geomspace(lo, hi, 2 * refine + 1) if float(v) not in scores]
        if fine:
            sweep(np.asarray(fine))
    return best(), dict(sorted(scores.items()))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 num_classes: int | None = None, val_fraction: float = 0.2, seed: int = 0,
                 grid: Sequence[float] = COARSE_GRID, max_iter: int = 1000) -> dict[str, Any]:
    """The full protocol: choose λ on a validation split of train, refit on all of train, score test."""
    train_y, test_y = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
    train_x = require_finite(train_x, "training features", "examples")
    test_x = require_finite(test_x, "test features", "examples")
    c = num_classes or int(max(train_y.max(), test_y.max())) + 1
    lam, sweep = select_l2(train_x, train_y, num_classes=c, val_fraction=val_fraction, seed=seed, grid=grid,
                           max_iter=max_iter)
    params = fit_logistic_regression(train_x, train_y, lam, num_classes=c, max_iter=max_iter)
    m = classification_metrics(predict_logits(params, test_x)[0], test_y)
    out = {"lp_acc1": m["top1"], "lp_mean_per_class_recall": m["mean_per_class_recall"], "l2": lam,
           "val_accuracy": sweep, "num_train": int(train_y.size), "num_test": int(test_y.size), "num_classes": c}
    if "top5" in m:
        out["lp_acc5"] = m["top5"]
    return out


# ============================================================================================ evaluator

class LinearProbeEvaluator:
    """Linear-probe top-1 of a model configuration: features of `train_split` fit, `split` scores."""

    task = "linear_probe"

    def __init__(self, name: str, model_cfg: CLIPConfig, *, data: str, split: str | None = None,
                 train_split: str = "train", batch_size: int = 256, max_examples: int | None = None,
                 max_train_examples: int | None = None, val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = 1000, progress: bool = False, cache_images: bool = True):
        self.name, self.cfg, self.data = name, model_cfg, data
        if datasets.is_image_folder(data):
            raise ValueError(f"linear probe {name!r} on {data!r}: an ImageFolder has no splits to fit on one and test "
                             f"on another; ingest its train and test folders as two splits of one dataset")
        kw = dict(task=self.task, image_size=model_cfg.vision.image_size, batch_size=batch_size,
                  label_space="all")
        train, _, self.train_split = datasets.open_eval_data(data, train_split, max_examples=max_train_examples, **kw)
        test, _, self.split = datasets.open_eval_data(data, split, max_examples=max_examples, **kw)
        wrap = datasets.Cached if cache_images else (lambda b: b)
        if self.split == self.train_split:
            raise ValueError(f"linear probe {name!r} on {data!r}: the test split must differ from the training split "
                             f"{self.train_split!r} (pass another split or train_split)")
        self.train_batches, self.test_batches = wrap(train), wrap(test)
        self.val_fraction, self.seed, self.max_iter, self.progress = val_fraction, seed, max_iter, progress
        self.encoder = Encoder(model_cfg)

    def evaluate(self, variables: Any) -> dict[str, Any]:
        with finite_context(f"eval {self.name!r} on {self.data!r} split {self.train_split!r}"):
            tr = image_features(self.encoder, variables, self.train_batches, progress=self.progress,
                                total=len(self.train_batches), desc="train images")
        with finite_context(f"eval {self.name!r} on {self.data!r} split {self.split!r}"):
            te = image_features(self.encoder, variables, self.test_batches, progress=self.progress,
                                total=len(self.test_batches), desc="test images")
        for what, f in (("train", tr), ("test", te)):
            if (f.labels < 0).any():
                raise ValueError(f"linear probe on {self.data!r}: the {what} split has unlabelled examples")
        return linear_probe(tr.features, tr.labels, te.features, te.labels, val_fraction=self.val_fraction,
                            seed=self.seed, max_iter=self.max_iter)

    def run(self, variables: Any) -> dict[str, float]:
        m = self.evaluate(variables)
        out = {f"linear_probe/{self.name}/top1": m["lp_acc1"]}
        if "lp_acc5" in m:
            out[f"linear_probe/{self.name}/top5"] = m["lp_acc5"]
        return out
