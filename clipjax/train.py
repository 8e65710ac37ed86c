"""The CLIP trainer. Reads top to bottom in fixed sections:

    model & optimizer → train state (born sharded) → update step → data → checkpoint & resume → evals → loop

`make_train_state`, `train_step` and `train` are importable; `python -m clipjax.main` calls `train`.
Letters: N global batch, B per-device batch, A accumulation steps, E embed dim.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import pathlib
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax import sharding as shd
from clipjax.checkpoint import CheckpointError, Checkpointer, check_writable
from clipjax.losses import get_loss
from clipjax.metrics import MetricWriter, Progress, train_flops_per_step
from clipjax.models.clip import CLIP
from clipjax.models.config import CLIPConfig
from clipjax.models.specs import get_model_config
from clipjax.optim import FROZEN, clamp_logit_scale, is_frozen, make_optimizer, make_schedule, param_labels
from clipjax.run_control import Preemption, StepCounters, sum_over_processes

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


# =============================================================================================== model & optimizer

def model_config(config: ml_collections.ConfigDict) -> CLIPConfig:
    """The CLIPConfig of a training config: a named/JSON architecture plus numerics options."""
    m = config.model
    cfg = get_model_config(m.name if not m.get("open_clip_config") else m.open_clip_config.to_dict())
    kw: dict[str, Any] = dict(dtype=m.get("dtype", "float32"), remat=m.get("remat", "none"),
                              scan_layers=bool(m.get("scan_layers", False)))
    if m.get("quick_gelu") is not None:
        kw["quick_gelu"] = bool(m.quick_gelu)
    if config.get("loss", "clip") == "siglip":
        kw["init_logit_bias"] = float(m.get("init_logit_bias", -10.0))
        kw["init_logit_scale"] = float(m.get("init_logit_scale", math.log(10.0)))
    return cfg.replace(**kw)


def make_tx(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
    o = config.optimizer
    return make_optimizer(params, lr=config.lr, warmup_steps=config.warmup_steps, total_steps=config.total_steps,
                          weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                          grad_clip_norm=o.get("grad_clip_norm"), frozen=tuple(config.get("frozen", ())))


def _flat_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def load_init_variables(config: ml_collections.ConfigDict, cfg: CLIPConfig) -> dict:
    """The weights named by `config.init_from`, checked tensor by tensor and field by field against `cfg`; raises
    ConfigError naming the first mismatch. Their own config is read from the source when it has one (HF directory,
    OpenAI .pt, workdir), else `config.init_config`, else (a bare .safetensors state dict) the training model's."""
    from clipjax.interop.load import check_shapes, load

    source = config.init_from
    plain = cfg.replace(scan_layers=False, remat="none")
    bare = str(source).endswith(".safetensors")
    try:
        pretrained = load(source, config.get("init_config") or (plain if bare else None))
        check_shapes(pretrained.variables, plain, f"{source} (for config.model {config.model.name!r})")
    except (OSError, ValueError, CheckpointError) as e:  # missing file, refused pickle, wrong tensors, no checkpoint
        raise ConfigError(f"config.init_from: {e}") from e
    theirs = _flat_dict(pretrained.config.replace(dtype=cfg.dtype, init_logit_scale=cfg.init_logit_scale).to_dict())
    ours = _flat_dict(plain.to_dict())
    diff = [f"{k}: {theirs.get(k)!r} in the weights, {ours[k]!r} in config.model" for k in sorted(ours)
            if theirs.get(k) != ours[k]]
    if diff:
        raise ConfigError(f"config.init_from={source}: architecture differs from config.model: {'; '.join(diff)}")
    variables = pretrained.variables
    if cfg.scan_layers:
        from clipjax.models.layers import stack_layers

        variables = stack_layers(variables)
    return variables


# ============================================================================================ train state

@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any  # BatchNorm running statistics (ModifiedResNet); {} for ViT
    rng: jax.Array
    nonfinite_streak: jax.Array  # consecutive skipped updates (non-finite loss or gradients)
    nonfinite_total: jax.Array


def _dummy_inputs(cfg: CLIPConfig) -> tuple[jax.Array, jax.Array]:
    s = cfg.vision.image_size
    return jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, cfg.text.context_length), jnp.int32)


def make_train_state(model: CLIP, tx_fn: Callable[[Any], optax.GradientTransformation], seed: int, mesh: Mesh,
                     init_variables: dict | None = None, reinit: tuple[str, ...] = ()):
    """Create the train state directly with its final shardings (nothing is materialised unsharded).

    Returns (state, state_shardings, tx). Shapes come from `jax.eval_shape`; parameters are sharded by their
    logical axis names through `clipjax.sharding`; optimizer moments follow their parameters. Variables under a
    `reinit` prefix ("text", "visual/ln_post") keep their fresh initialisation instead of `init_variables`.
    """
    images, tokens = _dummy_inputs(model.config)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens)
    param_shardings = shd.logical_shardings(boxed["params"], mesh)
    abstract_params = nn.meta.unbox(boxed["params"])
    tx = tx_fn(abstract_params)

    def init(rng):
        rng, init_rng = jax.random.split(rng)
        variables = nn.meta.unbox(model.init(init_rng, images, tokens))
        if init_variables is not None:  # start from given weights (fine-tuning); shapes were checked on load
            fresh, variables = variables, {**variables, **init_variables}
            unmatched = [p for p in reinit if FROZEN not in jax.tree.leaves(param_labels(fresh["params"], (p,)))]
            if unmatched:
                raise ConfigError(f"reinit prefixes {unmatched} match no parameter (top: {sorted(fresh['params'])})")
            for col in variables if reinit else ():  # e.g. LiT: a pretrained image tower, a text tower from scratch
                labels = param_labels(variables[col], reinit)
                variables[col] = jax.tree.map(lambda g, f, lab: f if lab == FROZEN else g, variables[col], fresh[col],
                                              labels)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          batch_stats=variables.get("batch_stats", {}), rng=rng,
                          nonfinite_streak=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32))

    abstract = jax.eval_shape(init, jax.random.PRNGKey(seed))
    rep = shd.replicated(mesh)
    shardings = TrainState(
        step=rep, params=param_shardings,
        opt_state=shd.match_by_path(abstract.opt_state, param_shardings, abstract_params, mesh),
        batch_stats=jax.tree.map(lambda _: rep, abstract.batch_stats), rng=rep, nonfinite_streak=rep,
        nonfinite_total=rep)
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
    return state, shardings, tx


def abstract_with_shardings(state_shardings: Any, state: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)


# ============================================================================================ update step

def _global_loss(loss_fn, mesh: Mesh):
    """The contrastive loss over the *global* batch: each device scores its rows inside `jax.shard_map`."""
    axes = shd.BATCH_AXES

    def local(img, txt, scale, bias):
        return loss_fn(img, txt, scale, bias, axes)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()), out_specs=P())


def _apply(model: CLIP, params, batch_stats, images, tokens, frozen: tuple[str, ...] = ()):
    """Forward pass in training mode; a locked image tower (`frozen` names all of "visual", as in LiT) runs in
    inference mode, so its BatchNorm uses and keeps its running statistics."""
    train = not is_frozen("visual", frozen)
    variables = {"params": params}
    if batch_stats:
        out, updated = model.apply({**variables, "batch_stats": batch_stats}, images, tokens, train=train,
                                   mutable=["batch_stats"])
        return out, updated["batch_stats"]
    return model.apply(variables, images, tokens, train=train), batch_stats


def _bias(params) -> jax.Array:
    return params.get("logit_bias", jnp.zeros((), jnp.float32))


def _freeze(params, frozen: tuple[str, ...]):
    """Stop gradients into frozen towers, so their backward pass is never computed."""
    if not frozen:
        return params
    labels = param_labels(params, frozen)
    return jax.tree.map(lambda p, lab: jax.lax.stop_gradient(p) if lab == FROZEN else p, params, labels)


def _full_batch_grads(state, batch, model, global_loss, frozen):
    def loss_of(params):
        params = _freeze(params, frozen)
        out, new_bs = _apply(model, params, state.batch_stats, batch["image"], batch["text"], frozen)
        loss = global_loss(out["image_embeds"], out["text_embeds"], params["logit_scale"], _bias(params))
        return loss, new_bs

    (loss, new_bs), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    return loss, grads, new_bs


def _accumulated_grads(state, batch, model, global_loss, frozen, accum: int, mesh: Mesh):
    """Exact global-batch gradient from A micro-batches (GradCache): embed all micro-batches without keeping
    activations, take the loss gradient w.r.t. the embeddings of the whole batch, then back-propagate each
    micro-batch's embedding gradient through the towers. Equal to the full-batch gradient (BatchNorm aside, whose
    statistics are per micro-batch)."""
    n = batch["image"].shape[0]

    def split(x):  # [N, ...] → [A, N/A, ...]; micro-batch a = rows i·A + a, so each one spans every device
        return x.reshape(n // accum, accum, *x.shape[1:]).swapaxes(0, 1)

    def merge(x):  # inverse of split
        return x.swapaxes(0, 1).reshape(n, *x.shape[2:])

    micro = jax.tree.map(split, batch)
    micro = jax.lax.with_sharding_constraint(
        micro, jax.tree.map(lambda x: NamedSharding(mesh, P(None, shd.BATCH_AXES)), micro))
    params = _freeze(state.params, frozen)

    def embed(p, bs, m):
        out, bs = _apply(model, p, bs, m["image"], m["text"], frozen)
        return (out["image_embeds"], out["text_embeds"]), bs

    def forward(bs, m):
        emb, bs = embed(params, bs, m)
        return bs, emb

    new_bs, (img, txt) = jax.lax.scan(forward, state.batch_stats, micro)  # [A, N/A, E] each
    loss, (g_img, g_txt, g_scale, g_bias) = jax.value_and_grad(global_loss, argnums=(0, 1, 2, 3))(
        merge(img), merge(txt), params["logit_scale"], _bias(params))

    def backward(grads, xs):
        m, gi, gt = xs
        _, vjp = jax.vjp(lambda p: embed(_freeze(p, frozen), state.batch_stats, m)[0], state.params)
        (g,) = vjp((gi, gt))
        return jax.tree.map(jnp.add, grads, g), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, _ = jax.lax.scan(backward, zeros, (micro, split(g_img), split(g_txt)))
    grads = {**grads, "logit_scale": grads["logit_scale"] + g_scale}
    if "logit_bias" in grads:
        grads["logit_bias"] = grads["logit_bias"] + g_bias
    return loss, grads, new_bs


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: CLIP, tx: optax.GradientTransformation,
               loss_fn: Callable, mesh: Mesh, accum_steps: int = 1, frozen: tuple[str, ...] = ()):
    """One optimizer step on a global batch {"image": [N, H, W, 3], "text": [N, L]} → (new state, metrics).

    A non-finite loss or gradient skips the update (params, optimizer and BatchNorm state unchanged) and is counted.
    """
    global_loss = _global_loss(loss_fn, mesh)
    if accum_steps > 1:
        loss, grads, new_bs = _accumulated_grads(state, batch, model, global_loss, frozen, accum_steps, mesh)
    else:
        loss, grads, new_bs = _full_batch_grads(state, batch, model, global_loss, frozen)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        return clamp_logit_scale(optax.apply_updates(state.params, updates)), new_opt, new_bs

    def skip(_):
        return state.params, state.opt_state, state.batch_stats

    # A branch, not a `where` over every leaf: the skip costs nothing and the program stays small (ViT-B-32 compile
    # 19 s → 10 s on CPU; experiments/RESULTS.md).
    params, opt_state, batch_stats = jax.lax.cond(finite, update, skip, None)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "logit_scale": params["logit_scale"],
               "temperature": jnp.exp(params["logit_scale"]), "nonfinite_total": new_state.nonfinite_total,
               "nonfinite_streak": new_state.nonfinite_streak}
    if "logit_bias" in params:
        metrics["logit_bias"] = params["logit_bias"]
    return new_state, metrics


def jit_train_step(model, tx, config, mesh: Mesh, state_shardings, *, stop_flags: bool = False):
    """`train_step` jitted with its shardings and the state donated.

    `stop_flags`: the batch also carries "stop": int32 [N], each process's rows set to 1 when it was asked to stop;
    metrics["stop_requested"] is their maximum, the same on every process, so all processes agree on when to stop.
    """
    step = functools.partial(train_step, model=model, tx=tx, loss_fn=get_loss(config.get("loss", "clip")),
                             mesh=mesh, accum_steps=int(config.get("accum_steps", 1)),
                             frozen=tuple(config.get("frozen", ())))
    batch_shardings = {"image": shd.batch_sharding(mesh, 4), "text": shd.batch_sharding(mesh, 2)}
    if stop_flags:
        batch_shardings["stop"] = shd.batch_sharding(mesh, 1)
        inner = step

        def step(state, batch):
            batch = dict(batch)
            stop = jnp.max(batch.pop("stop"))  # [N] → scalar: did any process ask to stop?
            state, metrics = inner(state, batch)
            return state, {**metrics, "stop_requested": stop}

    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))


# ============================================================================================ data

def make_data(config: ml_collections.ConfigDict, cfg: CLIPConfig, seed: int):
    """The per-host training iterator named by `config.data.train` (or a mix)."""
    d = config.data
    kw = dict(global_batch_size=config.batch_size, image_size=cfg.vision.image_size,
              context_length=cfg.text.context_length, seed=seed,
              process_index=jax.process_index(), process_count=jax.process_count())
    spec = d.train if not d.get("mix") else dict(d.mix)
    if spec == "synthetic":
        from clipjax.data.synthetic import SyntheticIterator

        return SyntheticIterator(vocab_size=cfg.text.vocab_size, nan_steps=tuple(d.get("synthetic_nan_steps", ())),
                                 seconds_per_batch=float(d.get("synthetic_seconds_per_batch", 0.0)), **kw)
    from clipjax.data.pipeline import make_train_iterator
    from clipjax.data.tokenizer import get_tokenizer

    return make_train_iterator(spec, tokenizer=get_tokenizer(d.get("tokenizer")), scale=tuple(d.get("crop_scale",
                               (0.9, 1.0))), **kw)


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host slices → global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(shd.batch_sharding(mesh, v.ndim), v)
            for k, v in batch.items() if k in ("image", "text", "stop")}


# ============================================================================================ train loop

def _write_metrics(writer: MetricWriter, step: int, values: dict[str, float]) -> None:
    try:
        writer.write(step, values)
    except OSError as e:  # metrics are a log, not state: a full disk must not end the run (checkpoints decide that)
        log.warning("could not append step %d to %s: %s", step, writer.path, e.strerror or e)


def _close(ckpt: Checkpointer | None, writer: MetricWriter | None, failing: bool) -> None:
    """Wait for pending checkpoint writes and close; while another error propagates, only log close failures."""
    for obj in (ckpt, writer):
        if obj is None:
            continue
        try:
            obj.close()
        except Exception as e:  # noqa: BLE001
            if not failing:
                raise
            log.error("while stopping: %s", e)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (resuming from `workdir` if it holds checkpoints). Returns the last logged metrics.

    SIGTERM/SIGINT end the run after the current step with a checkpoint of it; see docs/reliability.md.
    """
    preempt = Preemption()
    preempt.install()  # first, so that a signal during set-up or compilation still ends in a checkpoint
    try:
        return _train(config, pathlib.Path(workdir), preempt)
    finally:
        preempt.uninstall()


def _train(config: ml_collections.ConfigDict, workdir_p: pathlib.Path, preempt: Preemption) -> dict[str, float]:
    is_main = jax.process_index() == 0
    cfg = _from_config("config.model", model_config, config)
    try:
        workdir_p.mkdir(parents=True, exist_ok=True)
        if is_main:
            with open(workdir_p / "config.json", "w") as f:
                json.dump({"config": json.loads(config.to_json_best_effort()), "model_config": cfg.to_dict()}, f,
                          indent=2)
    except OSError as e:
        raise CheckpointError(f"workdir {workdir_p} is not writable: {e.strerror or e}") from None
    check_writable(workdir_p / "checkpoints")  # fail now rather than at the first save

    mesh = _from_config("config.mesh", shd.make_mesh,
                        dict(config.mesh) if isinstance(config.mesh, ml_collections.ConfigDict) else config.mesh)
    n_batch_devices = shd.batch_device_count(mesh)
    accum = int(config.get("accum_steps", 1))
    if config.batch_size % (n_batch_devices * accum):
        raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by the batch devices × "
                          f"accum_steps ({n_batch_devices} × {accum})")
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    _from_config("config.loss", get_loss, config.get("loss", "clip"))  # bad names fail before anything compiles
    data = _from_config("config.data", make_data, config, cfg, config.seed)

    model = CLIP(cfg)
    init_variables = load_init_variables(config, cfg) if config.get("init_from") else None
    state, state_shardings, tx = make_train_state(model, lambda p: make_tx(config, p), config.seed, mesh,
                                                  init_variables, tuple(config.get("reinit", ())))
    report = shd.sharded_fraction(state.params)
    log.info("parameters: %.1fM (%.0f%% of bytes sharded)", report.total_bytes / 4e6, 100 * report.fraction)
    step_fn = jit_train_step(model, tx, config, mesh, state_shardings, stop_flags=True)
    schedule = make_schedule(config.lr, config.warmup_steps, config.total_steps)

    # Resume order: 1. this workdir's newest readable checkpoint; 2. `init_from` weights; 3. from scratch.
    ckpt = Checkpointer(workdir_p / "checkpoints", keep=config.get("keep_checkpoints", 3),
                        async_save=config.get("async_checkpoints", True))
    writer = None
    try:
        restored = ckpt.restore(abstract_with_shardings(state_shardings, state))
        if restored is not None:
            start, state, data_state = restored
            if data_state and hasattr(data, "set_state"):
                _from_config(f"config.data (the input position saved at step {start})", data.set_state, data_state)
            log.info("resumed from step %d in %s (fingerprints verified)", start, ckpt.directory)
        writer = MetricWriter(workdir_p, enabled=is_main)
        last = _loop(config, cfg, mesh, state, step_fn, schedule, data, ckpt, writer, preempt)
    except BaseException:
        _close(ckpt, writer, failing=True)
        raise
    _close(ckpt, writer, failing=False)
    return last


def _loop(config, cfg: CLIPConfig, mesh: Mesh, state: TrainState, step_fn, schedule, data, ckpt: Checkpointer,
          writer: MetricWriter, preempt: Preemption) -> dict[str, float]:
    """Steps from the state's step to `config.total_steps`; logs, evaluates and checkpoints on schedule."""
    start = int(jax.device_get(state.step))
    is_main = jax.process_index() == 0
    evaluators = _make_evaluators(config, cfg)
    flops = train_flops_per_step(cfg, config.batch_size)
    peak = float(config.get("peak_flops_per_device") or 0.0) * mesh.size
    progress = Progress(config.total_steps, start)
    counters = StepCounters(int(config.get("max_nonfinite_steps", 10)), ckpt)
    single = jax.process_count() == 1
    last: dict[str, float] = {}
    t_last, steps_since = time.perf_counter(), 0
    step, unchecked, stop = start, None, False  # unchecked: (step, metrics) whose counters were not read yet
    while step < config.total_steps:
        local = next(data)
        batch = to_global({**local, "stop": preempt.flags(len(local["image"]))}, mesh)
        with jax.transfer_guard("disallow"):
            state, metrics = step_fn(state, batch)
        step += 1
        steps_since += 1
        if unchecked is not None:  # the previous step's counters: reading them does not wait for this step
            stop = counters.check(*unchecked) or stop
            counters.raise_if_failed()
        unchecked = (step, metrics)
        stop = stop or (single and preempt.requested)  # several processes stop only when all know (flags)
        log_now = step % config.log_every == 0 or step == config.total_steps or step == start + 1
        save = step % config.ckpt_every == 0 or step == config.total_steps or stop
        if save or log_now:  # never log past, or checkpoint, a run that must stop (read this step's counters)
            stop = counters.check(*unchecked) or stop
            unchecked = None
            save = save or stop
        if log_now:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = (time.perf_counter() - t_last) / steps_since
            t_last, steps_since = time.perf_counter(), 0
            m.update(lr=float(schedule(step - 1)), step_time=dt, samples_per_sec=config.batch_size / dt,
                     tflops_per_device=flops / dt / mesh.size / 1e12)
            if peak:
                m["mfu"] = flops / dt / peak
            if hasattr(data, "skipped"):
                m["data_skipped"] = float(sum_over_processes(int(data.skipped)))
            _write_metrics(writer, step, m)
            last = m
            if is_main:
                log.info(progress.line(step, {k: m[k] for k in ("loss", "temperature", "samples_per_sec")}))
        counters.raise_if_failed()  # after logging the step that failed, before evaluating or checkpointing it
        if evaluators and (step % config.get("eval_every", 10 ** 9) == 0 or step == config.total_steps):
            results = _run_evals(evaluators, state, cfg)
            _write_metrics(writer, step, results)
            last.update(results)
        if save:
            ckpt.save(step, state, data.get_state() if hasattr(data, "get_state") else None,
                      force=stop or step == config.total_steps)
        if stop:
            log.warning("stopped at step %d after a signal, with a checkpoint; re-run the same command to resume",
                        step)
            break
    return last


# ============================================================================================ evals

def _make_evaluators(config: ml_collections.ConfigDict, cfg: CLIPConfig) -> dict[str, Any]:
    if not config.get("evals"):
        return {}
    from clipjax.evaluate.registry import make_evaluators

    return make_evaluators(config.evals, cfg)


def _run_evals(evaluators: dict[str, Any], state: TrainState, cfg: CLIPConfig) -> dict[str, float]:
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    results: dict[str, float] = {}
    for name, ev in evaluators.items():
        t0 = time.perf_counter()
        mine = {key: float(value) for key, value in ev.run(variables).items()}
        log.info("eval %s (%.1f s): %s", name, time.perf_counter() - t0, {k: round(v, 4) for k, v in mine.items()})
        results.update(mine)
    return results
