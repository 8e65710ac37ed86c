"""The checks of a training config, beside its defaults (configs/common.py `base_config`): `check_config` (numbers
that cannot work, unknown tasks, a bad data mix, ...) and the rules of what may change when a workdir resumes
(`RESUME_FREE_KEYS`, `config.allow_resume_changes`). `ConfigError` is the one error of a config that cannot run as
given; the command line reports it in one line."""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable

import ml_collections
from flax import traverse_util

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A training config that cannot run as given (unknown names, shapes that do not fit, wrong weights)."""


def _from_config(what: str, fn: Callable, *args, **kwargs):
    """`fn(*args, **kwargs)`, reporting a ValueError as a ConfigError about `what` (a config key)."""
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from e


TASKS = ("contrastive", "classify")


# (key, test, the rule in words) of numbers that would otherwise run wrongly or fail late
_NUMBER_RULES = (
    ("seed", lambda v: isinstance(v, int) and v >= 0, "must be a non-negative integer"),
    ("keep_checkpoints", lambda v: isinstance(v, int) and v >= 1,
     "must be a positive integer (the newest checkpoints kept; 0 would keep none)"),
    ("lr", lambda v: math.isfinite(v) and v >= 0, "must be a finite number ≥ 0"),
    ("optimizer.weight_decay", lambda v: math.isfinite(v) and v >= 0, "must be a finite number ≥ 0"),
    ("optimizer.b1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optimizer.b2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optimizer.eps", lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0"),
    ("optimizer.grad_clip_norm", lambda v: math.isfinite(v) and v >= 0, "must be a finite number ≥ 0 (0: no clipping)"),
    ("model.patch_dropout", lambda v: 0 <= v < 1, "must be in [0, 1) (the fraction of patch tokens dropped)"),
    ("model.init_logit_scale", math.isfinite, "must be a finite number (or None: the loss's default)"),
    ("model.init_logit_bias", math.isfinite, "must be a finite number"),
    ("data.num_threads", lambda v: isinstance(v, int) and v >= 1, "must be a positive integer"),
    ("data.workers", lambda v: isinstance(v, int) and v >= 0,
     "must be a non-negative integer (0: decode on threads of this process)"),
)


def check_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config as it will run: numbers that cannot work are a ConfigError naming the key; a warm-up that does not
    fit a short run (e.g. `--config.total_steps=5` on a recipe with 50 warm-up steps) is clipped, with a warning.
    Returns a copy (the caller's config is not changed); its `data.mix` is ((spec, weight), ...) pairs."""
    plain = config.to_dict()
    data = plain.get("data") or {}
    if isinstance(data.get("mix"), dict):  # pairs: a spec may hold dots, which a ConfigDict key may not
        data["mix"] = tuple(data["mix"].items())
    config = ml_collections.ConfigDict(plain, type_safe=False)
    for key in ("total_steps", "batch_size", "accum_steps", "log_every", "ckpt_every", "eval_every"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.{key}={value!r}: must be a positive integer")
    if config.warmup_steps < 0:
        raise ConfigError(f"config.warmup_steps={config.warmup_steps}: must be ≥ 0")
    if config.warmup_steps >= config.total_steps:
        clipped = config.total_steps // 10
        log.warning("config.warmup_steps=%d does not fit config.total_steps=%d: warm-up clipped to %d steps",
                    config.warmup_steps, config.total_steps, clipped)
        config.warmup_steps = clipped
    if config.task not in TASKS:
        raise ConfigError(f"config.task={config.task!r}; valid: {', '.join(TASKS)}")
    if config.max_nonfinite_steps < 1:
        raise ConfigError(f"config.max_nonfinite_steps={config.max_nonfinite_steps}: must be ≥ 1")
    mix = config.data.get("mix") or ()
    if (not isinstance(mix, (tuple, list))
            or any(not isinstance(p, (tuple, list)) or len(p) != 2 or not isinstance(p[0], str) for p in mix)
            or len({p[0] for p in mix}) != len(mix)):
        raise ConfigError(f"config.data.mix={mix!r}: give {{spec: weight}} or ((spec, weight), ...), each spec once")
    bad = [p for p in mix if isinstance(p[1], bool) or not isinstance(p[1], (int, float)) or not 0 < p[1] < math.inf]
    if bad:
        raise ConfigError(f"config.data.mix: weights must be positive and finite numbers, got {bad}")
    for key, ok, rule in _NUMBER_RULES:
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, (dict, ml_collections.ConfigDict)) else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value)):
            raise ConfigError(f"config.{key}={value!r}: {rule}")
    scale = config.data.get("crop_scale")
    if scale is not None and (len(scale) != 2 or not all(isinstance(v, (int, float)) for v in scale)
                              or not 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"config.data.crop_scale={tuple(scale)!r}: must be (MIN, MAX) with 0 < MIN <= MAX <= 1 (the "
                          f"fraction of the image area a random crop keeps)")
    allow = config.get("allow_resume_changes") or ""
    if not isinstance(allow, str):
        raise ConfigError(f"config.allow_resume_changes={allow!r}: must be comma-separated config keys, e.g. "
                          f"'batch_size,model.dtype'")
    keys = set(_all_keys(plain))
    unknown = [k for k in allowed_changes(config) if k.rstrip(".") not in keys]
    if unknown:
        raise ConfigError(f"config.allow_resume_changes: unknown config key(s) {', '.join(unknown)}")
    buffer = config.data.get("shuffle_buffer", 1)
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
        raise ConfigError(f"config.data.shuffle_buffer={buffer!r}: must be a positive integer (the samples each wds: "
                          f"stream shuffles in; 1 reads them in shard order)")
    return config


def _all_keys(d: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a nested dict, groups (e.g. "optimizer") included."""
    return [k for key, v in d.items()
            for k in (f"{prefix}{key}", *(_all_keys(v, f"{prefix}{key}.") if isinstance(v, dict) else ()))]


def flat_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in traverse_util.flatten_dict(d, sep=".").items()}


# Keys that may differ when a workdir resumes: how long the run goes (total_steps: the learning rate's cosine decay
# then ends elsewhere, which is warned about), what it logs, evaluates, checkpoints and keeps, what only a fresh start
# reads (init_from, ...), and how the same computation is laid out (devices, accumulation, remat, scan, decoding
# processes and threads; the rounding of sums may differ). Every other key changes the numbers of the steps or the
# data they read, and is refused unless named in config.allow_resume_changes; the architecture has its own check.
# A key ending in "." stands for every key under it.
RESUME_FREE_KEYS = (
    "total_steps", "log_every", "ckpt_every", "eval_every", "evals.", "keep_checkpoints", "async_checkpoints",
    "max_nonfinite_steps", "compilation_cache", "peak_flops_per_device", "allow_resume_changes",
    "init_from", "init_config", "reinit", "mesh.", "accum_steps",
    "model.name", "model.open_clip_config.", "model.quick_gelu", "model.init_logit_scale", "model.init_logit_bias",
    "model.remat", "model.scan_layers",
    "data.workers", "data.num_threads", "data.synthetic_seconds_per_batch",
    "data.eval", "data.eval_split", "data.eval_batch_size", "data.max_eval_examples", "data.templates",
)
_UNKNOWN = object()  # a key one of the two configs lacks


def as_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def matches(key: str, names: Any) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) or key.startswith(n + ".") for n in names)


def allowed_changes(config: ml_collections.ConfigDict) -> list[str]:
    return [k.strip() for k in str(config.get("allow_resume_changes") or "").split(",") if k.strip()]


def resume_changes(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, value now)} of the dotted config keys that differ. A key that a config.json of an older
    version lacks is compared with its default (configs/common.py), as it ran with it."""
    from clipjax.configs.common import base_config

    defaults = flat_dict(as_json(check_config(base_config())))
    then, now = flat_dict(saved), flat_dict(as_json(config))
    changes = {}
    for key in sorted(set(then) | set(now)):
        old, new = then.get(key, defaults.get(key, _UNKNOWN)), now.get(key, _UNKNOWN)
        if old is not _UNKNOWN and new is not _UNKNOWN and old != new:
            changes[key] = (old, new)
    return changes
