"""Evaluators by config: ``config.evals`` maps a name to {type, data, ...}; `make_evaluators` builds them.

    c.evals.heldout = dict(type="zeroshot", data="scenes", split="heldout", templates="scenes", batch_size=250)

Each evaluator has ``run(variables) -> {metric_key: float}`` with keys ``<type>/<name>/<metric>``, e.g.
``zeroshot/heldout/top1``, ``retrieval/coco/image_r1`` (text → image), ``retrieval/coco/text_r1`` (image → text),
``linear_probe/scenes/top1``. The trainer runs them every ``eval_every`` steps and at the end. The keys an eval
config may hold are the evaluator's keyword arguments (see the classes); anything else is an error, listed with
the valid keys. A value of None or "" means the evaluator's default (so configs can leave a key overridable).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from clipjax.evaluate.linear_probe import LinearProbeEvaluator
from clipjax.evaluate.retrieval import RetrievalEvaluator
from clipjax.evaluate.zeroshot import ZeroShotEvaluator
from clipjax.models.config import CLIPConfig

EVALUATORS: dict[str, type] = {
    "zeroshot": ZeroShotEvaluator,
    "retrieval": RetrievalEvaluator,
    "linear_probe": LinearProbeEvaluator,
}
_NOT_FROM_CONFIG = {"self", "name", "model_cfg", "cache", "model_key", "progress"}


def config_keys(kind: str) -> list[str]:
    """The keys an eval config of type `kind` accepts (besides ``type``)."""
    params = inspect.signature(EVALUATORS[kind].__init__).parameters
    return sorted(p for p in params if p not in _NOT_FROM_CONFIG)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):  # ml_collections ConfigDict
        return value.to_dict()
    if isinstance(value, list):
        return tuple(value)
    return value


def make_evaluator(name: str, spec: Mapping[str, Any], model_cfg: CLIPConfig, **extra: Any):
    """One evaluator from its config mapping ({type, ...}); `extra` adds keyword arguments (e.g. progress)."""
    spec = {k: _plain(v) for k, v in dict(spec).items()}
    spec = {k: v for k, v in spec.items() if v is not None and v != ""}  # unset: the evaluator's default
    kind = spec.pop("type", None)
    if kind not in EVALUATORS:
        raise ValueError(f"eval {name!r}: unknown type {kind!r}; valid types: {sorted(EVALUATORS)}")
    valid = config_keys(kind)
    unknown = sorted(set(spec) - set(valid))
    if unknown:
        raise ValueError(f"eval {name!r} ({kind}): unknown key(s) {unknown}; valid keys: {valid}")
    if "data" not in spec:
        raise ValueError(f"eval {name!r} ({kind}): missing key 'data' (a dataset spec such as 'scenes' or 'dir:...')")
    return EVALUATORS[kind](name, model_cfg, **spec, **extra)


def make_evaluators(evals: Mapping[str, Any] | None, model_cfg: CLIPConfig, **extra: Any) -> dict[str, Any]:
    """{name: evaluator} for every entry of ``config.evals`` (a ConfigDict or dict of {type, data, ...})."""
    if not evals:
        return {}
    return {name: make_evaluator(name, spec, model_cfg, **extra) for name, spec in dict(evals).items()}
