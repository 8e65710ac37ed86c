"""The weights a training run starts from (`config.init_from`): read with `clipjax.interop.load` (the training
model's architecture for a bare state dict), then checked tensor by tensor and field by field against the model the
config builds. Every failure is a `ConfigError` naming `config.init_from`."""

from __future__ import annotations

from typing import Any

import ml_collections

from clipjax.build import model_config
from clipjax.checkpoint import CheckpointError
from clipjax.config_checks import ConfigError, flat_dict
from clipjax.models.config import CLIPConfig


def load_pretrained(config: ml_collections.ConfigDict):
    """The weights named by `config.init_from` (a `clipjax.interop.load.Pretrained`), or None when it is empty."""
    if not config.init_from:
        return None
    from clipjax.interop.load import load

    source = config.init_from
    named = bool(config.model.name or config.model.open_clip_config)
    bare = str(source).endswith(".safetensors")
    try:  # a bare state dict without init_config is read with the training model's architecture
        plain = model_config(config).replace(scan_layers=False, remat="none") if bare and named else None
        return load(source, config.init_config or plain)
    except ConfigError:
        raise
    except (OSError, ValueError, CheckpointError) as e:  # missing file, refused pickle, wrong tensors, no checkpoint
        raise ConfigError(f"config.init_from: {e}") from e


def init_variables_from(pretrained: Any, config: ml_collections.ConfigDict, cfg: CLIPConfig) -> dict:
    """`pretrained`'s variables, checked tensor by tensor and field by field against `cfg`; raises ConfigError
    naming the first mismatch."""
    from clipjax.interop.load import check_shapes

    source = config.init_from
    plain = cfg.replace(scan_layers=False, remat="none")
    try:
        check_shapes(pretrained.variables, plain, f"{source} (for config.model {config.model.name!r})")
    except ValueError as e:
        raise ConfigError(f"config.init_from: {e}") from e
    theirs = flat_dict(pretrained.config.replace(dtype=cfg.dtype, init_logit_scale=cfg.init_logit_scale).to_dict())
    ours = flat_dict(plain.to_dict())
    diff = [f"{k}: {theirs.get(k)!r} in the weights, {ours[k]!r} in config.model" for k in sorted(ours)
            if theirs.get(k) != ours[k]]
    if diff:
        raise ConfigError(f"config.init_from={source}: architecture differs from config.model: {'; '.join(diff)}")
    variables = pretrained.variables
    if cfg.scan_layers:
        from clipjax.models.layers import stack_layers

        variables = stack_layers(variables)
    return variables


def load_init_variables(config: ml_collections.ConfigDict, cfg: CLIPConfig) -> dict:
    """The weights named by `config.init_from`, checked against `cfg` (see `init_variables_from`)."""
    return init_variables_from(load_pretrained(config), config, cfg)
