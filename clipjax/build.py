"""What a training config builds: the model config (`model_config`), the optimizer (`make_tx`, with the prefixes that
do not train), the device mesh (`make_train_mesh`), the phases of the run (`make_phases`), the jitted, sharded update
step (`jit_train_step`; the step itself: `clipjax.step`) and the per-host training data (`make_data`; the iterators
themselves: `clipjax.data`). The trainer (`clipjax.train`) and ahead-of-time compilation (`clipjax.aot`) build the
same step from these.
Letters: N global batch, E embed dim, K classes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from clipjax import phases as phases_lib
from clipjax import sharding as shd
from clipjax.config_checks import ConfigError, _from_config
from clipjax.models.config import CLIPConfig
from clipjax.models.specs import get_model_config
from clipjax.optim import make_optimizer
from clipjax.phases import Phase, PhasedData
from clipjax.run_control import COUNTERS
from clipjax.step import batch_shardings, train_step
from clipjax.tasks import task_class

log = logging.getLogger(__name__)


# =============================================================================================== model & optimizer

def model_config(config: ml_collections.ConfigDict, pretrained: Any = None) -> CLIPConfig:
    """The CLIPConfig of a training config: a named/JSON architecture plus numerics options. An empty
    `model.name` (and no `model.open_clip_config`) takes the architecture of the `init_from` weights."""
    m = config.model
    if m.open_clip_config:
        if m.name and _names_an_architecture(m.name):  # e.g. --config.model.name=ViT-B-32 on configs/demo.py
            raise ConfigError(f"config.model.name={m.name!r} names an architecture, but config.model.open_clip_config "
                              f"gives one too and would be used: add --config.model.open_clip_config={{}} to train "
                              f"{m.name}, or leave model.name a label")
        cfg = get_model_config(m.open_clip_config.to_dict())
    elif m.name:
        cfg = get_model_config(m.name)
    elif pretrained is not None:
        cfg = pretrained.config.replace(scan_layers=False, remat="none")
    else:
        raise ConfigError("config.model.name is empty and config.init_from is not set: name an architecture "
                          "(clipjax.list_models()) or give the weights to start from")
    kw: dict[str, Any] = dict(dtype=m.dtype, remat=m.remat, scan_layers=bool(m.scan_layers))
    if m.quick_gelu is not None:
        kw["quick_gelu"] = bool(m.quick_gelu)
    if config.loss == "siglip":
        kw["init_logit_bias"] = float(m.init_logit_bias)
        kw["init_logit_scale"] = float(m.init_logit_scale if m.init_logit_scale is not None else math.log(10.0))
    elif m.init_logit_scale is not None:
        kw["init_logit_scale"] = float(m.init_logit_scale)
    return cfg.replace(**kw)


def _names_an_architecture(name: str) -> bool:
    try:
        get_model_config(name)
    except ValueError:
        return False
    return True


def frozen_prefixes(config: ml_collections.ConfigDict, params: Any) -> tuple[str, ...]:
    """Parameter prefixes that do not train: `config.frozen`, plus, when classifying, everything of the CLIP but its
    image tower (the text tower and temperature only built the head's starting point)."""
    frozen = tuple(config.frozen)
    return frozen + task_class(config).frozen(params, frozen)


def make_tx(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
    o = config.optimizer
    return make_optimizer(params, lr=config.lr, warmup_steps=config.warmup_steps, total_steps=config.total_steps,
                          weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                          grad_clip_norm=o.grad_clip_norm or None, frozen=frozen_prefixes(config, params))


def make_train_mesh(config: ml_collections.ConfigDict, devices: Any = None) -> Mesh:
    """The mesh of `config.mesh` over `devices` (default: all of this run's), checked against the batch."""
    mesh = _from_config("config.mesh", shd.make_mesh,
                        dict(config.mesh) if isinstance(config.mesh, ml_collections.ConfigDict) else config.mesh,
                        devices)
    n_batch_devices = shd.batch_device_count(mesh)
    if config.batch_size % (n_batch_devices * config.accum_steps):
        raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by the batch devices × "
                          f"accum_steps ({n_batch_devices} × {config.accum_steps})")
    return mesh


# ============================================================================================ step & phases

def jit_train_step(model, tx, config, mesh: Mesh, state_shardings, *, stop_flags: bool = False,
                   fields: dict[str, int] | None = None, patch_dropout: float = 0.0,
                   make_batch: Callable[[jax.Array], dict[str, jax.Array]] | None = None):
    """`train_step` jitted with its shardings and the state donated. `fields`: the batch's fields and ranks (default:
    the task's; the synthetic source may add its "nan" flags); `patch_dropout`: the phase's (FLIP).

    `make_batch`: the step makes its own batch, `make_batch(state.step)` (the synthetic source), merged under the
    fields it is given (`fields={}`: none).

    `stop_flags`: the batch also carries "stop": int32 [N], each process's rows set to 1 when it was asked to stop;
    metrics["stop_requested"] is their maximum, the same on every process, so all processes agree on when to stop.
    metrics[COUNTERS] packs what the loop reads of every step into one int32 [3] array: the non-finite streak and total
    and the stop request (0 without `stop_flags`).
    """
    step = functools.partial(
        train_step, model=model, tx=tx, **task_class(config).step_options(config), mesh=mesh,
        accum_steps=int(config.accum_steps), frozen=frozen_prefixes(config, state_shardings.params),
        patch_dropout=float(patch_dropout))
    in_batch = batch_shardings(mesh, task_class(config).fields if fields is None else fields)
    if stop_flags:
        in_batch["stop"] = shd.batch_sharding(mesh, 1)
    inner = step

    def step(state, batch):
        batch = dict(batch)
        stop = jnp.max(batch.pop("stop")) if stop_flags else jnp.zeros((), jnp.int32)  # [N] → did any process ask?
        if make_batch is not None:
            batch = {**make_batch(state.step), **batch}
        state, metrics = inner(state, batch)
        counters = jnp.stack([metrics["nonfinite_streak"], metrics["nonfinite_total"], stop])
        return state, {**metrics, **({"stop_requested": stop} if stop_flags else {}), COUNTERS: counters}

    # activations are sharded by their logical names (clipjax/sharding.py) while the step is traced
    return jax.jit(shd.with_activation_sharding(step, mesh), in_shardings=(state_shardings, in_batch),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))


def make_phases(config: ml_collections.ConfigDict, cfg: CLIPConfig) -> list[Phase]:
    if config.model.patch_dropout and cfg.vision.is_resnet:  # checked with the config, not when the step is traced
        raise ConfigError(f"config.model.patch_dropout={config.model.patch_dropout:g}: patch dropout needs a ViT "
                          f"image tower (this model's is a ResNet)")
    return _from_config("config.schedule", phases_lib.make_phases, config.schedule, config.total_steps,
                        cfg.vision.image_size, cfg.text.context_length, float(config.model.patch_dropout),
                        None if cfg.vision.is_resnet else cfg.vision.patch_size)


def _phase_config(cfg: CLIPConfig, phase: Phase) -> tuple[CLIPConfig, int | None]:
    """The model config as a phase runs it (for FLOP counts): its image size and text length, and the patch tokens
    it keeps under patch dropout (None: all)."""
    vision = dataclasses.replace(cfg.vision, image_size=phase.image_size)
    kept = None
    if phase.patch_dropout and not cfg.vision.is_resnet:
        kept = max(1, int((phase.image_size // cfg.vision.patch_size) ** 2 * (1 - phase.patch_dropout)))
    text = dataclasses.replace(cfg.text, context_length=phase.context_length)
    return cfg.replace(vision=vision, text=text), kept


# =============================================================================================== data

def make_data(config: ml_collections.ConfigDict, cfg: CLIPConfig, seed: int, mesh: Mesh, phase: Phase | None = None):
    """The per-host training iterator named by `config.data.train` (or a mix), decoding at the phase's image size
    (the model's by default); with labels when classifying."""
    d = config.data
    image_size = phase.image_size if phase else cfg.vision.image_size
    context_length = phase.context_length if phase else cfg.text.context_length
    kw = dict(global_batch_size=config.batch_size, image_size=image_size, context_length=context_length, seed=seed,
              process_index=jax.process_index(), process_count=jax.process_count())
    spec = d.train if not d.mix else dict(d.mix)
    if not spec:
        raise ConfigError("config.data.train is empty: name the training data, e.g. --config=configs/vit_b32.py:"
                          "data=dir:/data/laion400m (an ingested dataset) or --config.data.train=SPEC; 'synthetic' "
                          "for a smoke run")
    labels = task_class(config).labels  # classify: labels, no captions
    if spec == "synthetic":
        if labels:
            raise ConfigError("config.data.train='synthetic' has no labels: classifying needs a labelled dataset")
        from clipjax.data.synthetic import SyntheticIterator

        return SyntheticIterator(global_batch_size=config.batch_size, image_size=image_size,
                                 context_length=context_length, seed=seed, mesh=mesh,
                                 vocab_size=cfg.text.vocab_size, nan_steps=tuple(d.synthetic_nan_steps),
                                 seconds_per_batch=float(d.synthetic_seconds_per_batch), on_step=True)
    from clipjax.data.pipeline import make_train_iterator
    from clipjax.data.tokenizer import get_tokenizer

    if labels:
        if d.mix:
            raise ConfigError("config.data.mix: classifying reads one labelled dataset (config.data.train)")
        return make_train_iterator(spec, tokenizer=_no_text, scale=tuple(d.crop_scale), num_threads=d.num_threads,
                                   workers=d.workers, split=d.train_split, labels=True, **kw)
    try:
        tokenizer = get_tokenizer(d.tokenizer or None, context_length, cfg.text.vocab_size)
    except OSError as e:  # e.g. a SentencePiece model file that does not exist
        raise ConfigError(f"config.data.tokenizer={d.tokenizer!r}: {e}") from e
    return make_train_iterator(spec, tokenizer=tokenizer, scale=tuple(d.crop_scale), num_threads=d.num_threads,
                               workers=d.workers, split=d.train_split, shuffle_buffer=d.get("shuffle_buffer"), **kw)


def _no_text(texts, context_length: int) -> np.ndarray:
    """The tokenizer of a run that reads no text (classifying): zeros [N, L], never sent to the device."""
    return np.zeros((len(texts), context_length), np.int32)


def _warn_small_dataset(data: PhasedData, batch_size: int) -> None:
    sizes = [len(s) for s in data.sources]
    if sizes and batch_size > sum(sizes):
        log.warning("config.batch_size=%d is larger than the training data (%d records): every batch repeats "
                    "records", batch_size, sum(sizes))
