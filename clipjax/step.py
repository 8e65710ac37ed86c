"""The train state and the update step, for both tasks of the trainer (`clipjax.train`): the state is born sharded,
the step computes the loss over the global batch and skips non-finite updates.

    contrastive  {"image": [N, S, S, 3], "text": [N, L]} → the towers' embeddings under a global-batch loss
                 (`clipjax.losses`), exact gradient accumulation over A micro-batches (GradCache)
    classify     {"image": [N, S, S, 3], "label": [N]} → softmax cross-entropy of a linear head on the image tower's
                 unit-norm features (`clipjax.finetune` builds the head)

Letters: N global batch, A accumulation steps, E embed dim, K classes, S image side, L context length.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax import sharding as shd
from clipjax.models.clip import CLIP, l2_normalize
from clipjax.models.config import CLIPConfig
from clipjax.optim import FROZEN, clamp_logit_scale, is_frozen, param_labels

HEAD = "head"  # the classification head's entry in the parameters (task "classify")


# ============================================================================================ images

def prepare_images(batch: dict[str, jax.Array], mean: tuple[float, ...] | None = None,
                   std: tuple[float, ...] | None = None) -> jax.Array:
    """The batch's images as the model takes them, made on the device: uint8 pixels [N, S, S, 3] become float32
    (x / 255 − mean) / std (OpenAI's statistics, as `clipjax.preprocess` computes them on the host); float images are
    taken as already normalised. Rows whose "nan" flag is set become NaN (the synthetic source's fault injection)."""
    images = batch["image"]
    if images.dtype == jnp.uint8:
        from clipjax.data.preprocess import OPENAI_MEAN, OPENAI_STD

        m = jnp.asarray(mean or OPENAI_MEAN, jnp.float32)
        s = jnp.asarray(std or OPENAI_STD, jnp.float32)
        images = (images.astype(jnp.float32) / jnp.float32(255.0) - m) / s
    if "nan" in batch:
        images = jnp.where(batch["nan"][:, None, None, None] > 0, jnp.float32(jnp.nan), images)
    return images


# ============================================================================================ train state

@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # the CLIP's parameters (+ "head" {"kernel" [E, K], "bias" [K]} when classifying)
    opt_state: Any
    batch_stats: Any  # BatchNorm running statistics (ModifiedResNet); {} for ViT
    rng: jax.Array
    nonfinite_streak: jax.Array  # consecutive skipped updates (non-finite loss or gradients)
    nonfinite_total: jax.Array


def _dummy_inputs(cfg: CLIPConfig) -> tuple[jax.Array, jax.Array]:
    s = cfg.vision.image_size
    return jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, cfg.text.context_length), jnp.int32)


def _head_init(embed_dim: int, num_classes: int) -> dict[str, Any]:
    """A zero classification head, boxed with logical axes like the model's parameters (kernel [E, K], bias [K])."""
    return {"kernel": nn.LogicallyPartitioned(jnp.zeros((embed_dim, num_classes), jnp.float32), ("joint", None)),
            "bias": nn.LogicallyPartitioned(jnp.zeros((num_classes,), jnp.float32), (None,))}


def make_train_state(model: CLIP, tx_fn: Callable[[Any], optax.GradientTransformation], seed: int, mesh: Mesh,
                     init_variables: dict | None = None, reinit: tuple[str, ...] = (), num_classes: int = 0):
    """Create the train state directly with its final shardings (nothing is materialised unsharded).

    Returns (state, state_shardings, tx). Shapes come from `jax.eval_shape`; parameters carry logical axis names
    (Flax partitioning boxes) and are sharded through `clipjax.sharding`; the optimizer state is initialised on the
    boxed parameters, so its moments carry the same names and shard like their parameters. Variables under a
    `reinit` prefix ("text", "visual/ln_post") keep their fresh initialisation instead of `init_variables`.
    `num_classes` > 0 adds a classification head `params["head"]` (zeros unless `init_variables` holds one).
    """
    init, shardings, tx = _state_init(model, tx_fn, mesh, init_variables, reinit, num_classes)
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
    return state, shardings, tx


def abstract_train_state(model: CLIP, tx_fn: Callable[[Any], optax.GradientTransformation], mesh: Mesh,
                         num_classes: int = 0):
    """The train state's shapes, dtypes and shardings, with nothing allocated: (abstract state, state_shardings, tx)
    as `make_train_state` would make them (for compiling ahead of time for devices that are not here)."""
    init, shardings, tx = _state_init(model, tx_fn, mesh, None, (), num_classes)
    return abstract_with_shardings(shardings, jax.eval_shape(init, jax.random.PRNGKey(0))), shardings, tx


def _state_init(model: CLIP, tx_fn: Callable[[Any], optax.GradientTransformation], mesh: Mesh,
                init_variables: dict | None, reinit: tuple[str, ...], num_classes: int):
    """(init: rng → TrainState, the state's shardings, tx) — the one recipe of the train state."""
    images, tokens = _dummy_inputs(model.config)

    def boxed_init(rng):
        variables = model.init(rng, images, tokens)
        if num_classes:
            variables = {**variables, "params": {**variables["params"],
                                                 HEAD: _head_init(model.config.embed_dim, num_classes)}}
        return variables

    boxed = jax.eval_shape(boxed_init, jax.random.PRNGKey(0))
    abstract_params = nn.meta.unbox(boxed["params"])
    tx = tx_fn(abstract_params)

    def init(rng):
        rng, init_rng = jax.random.split(rng)
        variables = nn.meta.unbox(boxed_init(init_rng))
        if init_variables is not None:  # start from given weights (fine-tuning); shapes were checked on load
            fresh = variables
            variables = {**variables, **init_variables,
                         "params": {**variables["params"], **init_variables["params"]}}
            unmatched = [p for p in reinit if FROZEN not in jax.tree.leaves(param_labels(fresh["params"], (p,)))]
            if unmatched:
                raise ValueError(f"reinit prefixes {unmatched} match no parameter (top: {sorted(fresh['params'])})")
            for col in variables if reinit else ():  # e.g. LiT: a pretrained image tower, a text tower from scratch
                labels = param_labels(variables[col], reinit)
                variables[col] = jax.tree.map(lambda g, f, lab: f if lab == FROZEN else g, variables[col], fresh[col],
                                              labels)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          batch_stats=variables.get("batch_stats", {}), rng=rng,
                          nonfinite_streak=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32))

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    rep = shd.replicated(mesh)
    shardings = TrainState(
        step=rep, params=shd.logical_shardings(boxed["params"], mesh),
        opt_state=_opt_state_shardings(tx, boxed["params"], mesh),
        batch_stats=jax.tree.map(lambda _: rep, abstract.batch_stats), rng=rep, nonfinite_streak=rep,
        nonfinite_total=rep)
    return init, shardings, tx


def _opt_state_shardings(tx: optax.GradientTransformation, boxed_params: Any, mesh: Mesh) -> Any:
    """The optimizer state initialised on the boxed parameters keeps their logical axis names (moments shard like
    their parameters); a box around an array-free node (optax's MaskedNode of a frozen parameter) is unwrapped, so
    the shardings have the state's structure."""
    def unbox_empty(x):
        return x.value if isinstance(x, nn.LogicallyPartitioned) and not hasattr(x.value, "shape") else x

    boxed = jax.tree.map(unbox_empty, jax.eval_shape(tx.init, boxed_params),
                         is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return shd.logical_shardings(boxed, mesh)


def abstract_with_shardings(state_shardings: Any, state: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)


def clip_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    """The CLIP model's variables from a train state's parameters (without a classification head)."""
    variables = {"params": {k: v for k, v in params.items() if k != HEAD}}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


# ============================================================================================ update step

def _global_loss(loss_fn, mesh: Mesh):
    """The contrastive loss over the *global* batch: each device scores its rows inside `jax.shard_map`."""
    axes = shd.BATCH_AXES

    def local(img, txt, scale, bias):
        return loss_fn(img, txt, scale, bias, axes)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()), out_specs=P())


def _apply(model: CLIP, params, batch_stats, images, tokens, frozen: tuple[str, ...] = (), drop=None):
    """Forward pass in training mode; a locked image tower (`frozen` names all of "visual", as in LiT) runs in
    inference mode, so its BatchNorm uses and keeps its running statistics. `tokens` None: the image tower only.
    `drop`: (patch dropout rate, PRNG key) of FLIP, or None."""
    train = not is_frozen("visual", frozen)
    variables = clip_variables(params, batch_stats)
    kw: dict[str, Any] = {}
    if drop is not None and drop[0] > 0 and train:
        kw = {"patch_dropout": drop[0], "rngs": {"dropout": drop[1]}}
    if tokens is None:
        method, args = CLIP.encode_image, (images, train)
    else:
        method, args = CLIP.__call__, (images, tokens, train)
    if batch_stats:
        out, updated = model.apply(variables, *args, method=method, mutable=["batch_stats"], **kw)
        return out, updated["batch_stats"]
    return model.apply(variables, *args, method=method, **kw), batch_stats


def _micro_drop(drop, a):
    """The patch-dropout key of micro-batch `a` (the same in the forward and the backward pass)."""
    return None if drop is None else (drop[0], jax.random.fold_in(drop[1], a))


def _bias(params) -> jax.Array:
    return params.get("logit_bias", jnp.zeros((), jnp.float32))


def _freeze(params, frozen: tuple[str, ...]):
    """Stop gradients into frozen towers, so their backward pass is never computed."""
    if not frozen:
        return params
    labels = param_labels(params, frozen)
    return jax.tree.map(lambda p, lab: jax.lax.stop_gradient(p) if lab == FROZEN else p, params, labels)


def _full_batch_grads(state, batch, model, global_loss, frozen, drop=None):
    def loss_of(params):
        params = _freeze(params, frozen)
        out, new_bs = _apply(model, params, state.batch_stats, batch["image"], batch["text"], frozen, drop)
        loss = global_loss(out["image_embeds"], out["text_embeds"], params["logit_scale"], _bias(params))
        return loss, (new_bs, {})

    (loss, (new_bs, aux)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    return loss, grads, new_bs, aux


def _split_micro(batch, accum: int, mesh: Mesh):
    """[N, ...] → [A, N/A, ...]; micro-batch a = rows i·A + a, so each one spans every device."""
    n = batch["image"].shape[0]
    micro = jax.tree.map(lambda x: x.reshape(n // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)
    return jax.lax.with_sharding_constraint(
        micro, jax.tree.map(lambda x: NamedSharding(mesh, P(None, shd.BATCH_AXES)), micro))


def _accumulated_grads(state, batch, model, global_loss, frozen, accum: int, mesh: Mesh, drop=None):
    """Exact global-batch gradient from A micro-batches (GradCache): embed all micro-batches without keeping
    activations, take the loss gradient w.r.t. the embeddings of the whole batch, then back-propagate each
    micro-batch's embedding gradient through the towers. Equal to the full-batch gradient (BatchNorm aside, whose
    statistics are per micro-batch)."""
    n = batch["image"].shape[0]

    def split(x):  # [N, ...] → [A, N/A, ...]
        return x.reshape(n // accum, accum, *x.shape[1:]).swapaxes(0, 1)

    def merge(x):  # inverse of split
        return x.swapaxes(0, 1).reshape(n, *x.shape[2:])

    micro = _split_micro(batch, accum, mesh)
    params = _freeze(state.params, frozen)

    def embed(p, bs, m, a):
        out, bs = _apply(model, p, bs, m["image"], m["text"], frozen, _micro_drop(drop, a))
        return (out["image_embeds"], out["text_embeds"]), bs

    def forward(bs, xs):
        m, a = xs
        emb, bs = embed(params, bs, m, a)
        return bs, emb

    index = jnp.arange(accum)
    new_bs, (img, txt) = jax.lax.scan(forward, state.batch_stats, (micro, index))  # [A, N/A, E] each
    loss, (g_img, g_txt, g_scale, g_bias) = jax.value_and_grad(global_loss, argnums=(0, 1, 2, 3))(
        merge(img), merge(txt), params["logit_scale"], _bias(params))

    def backward(grads, xs):
        m, gi, gt, a = xs
        _, vjp = jax.vjp(lambda p: embed(_freeze(p, frozen), state.batch_stats, m, a)[0], state.params)
        (g,) = vjp((gi, gt))
        return jax.tree.map(jnp.add, grads, g), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, _ = jax.lax.scan(backward, zeros, (micro, split(g_img), split(g_txt), index))
    grads = {**grads, "logit_scale": grads["logit_scale"] + g_scale}
    if "logit_bias" in grads:
        grads["logit_bias"] = grads["logit_bias"] + g_bias
    return loss, grads, new_bs, {}


def _classify_loss(params, batch_stats, batch, drop=None, *, model, frozen, label_smoothing):
    """Softmax cross-entropy of the head on the image tower's unit-norm features → (loss, (batch_stats, metrics))."""
    params = _freeze(params, frozen)
    feats, new_bs = _apply(model, params, batch_stats, batch["image"], None, frozen, drop)  # [B, E]
    logits = head_logits(feats, params[HEAD])  # [B, K]
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)  # [B, K]
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    accuracy = (logits.argmax(-1) == batch["label"]).mean()
    return loss, (new_bs, {"accuracy": accuracy})


def _classify_grads(state, batch, model, frozen, label_smoothing: float, accum: int, mesh: Mesh, drop=None):
    """Loss and gradient of the mean cross-entropy; with A > 1 the mean of A equal micro-batches' (exact: the loss is
    a mean over examples)."""
    loss_of = functools.partial(_classify_loss, model=model, frozen=frozen, label_smoothing=label_smoothing)
    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if accum == 1:
        (loss, (new_bs, aux)), grads = grad_fn(state.params, state.batch_stats, batch, drop)
        return loss, grads, new_bs, aux

    def body(carry, xs):
        (grads, bs), (m, a) = carry, xs
        (loss, (bs, aux)), g = grad_fn(state.params, bs, m, _micro_drop(drop, a))
        return (jax.tree.map(jnp.add, grads, g), bs), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    xs = (_split_micro(batch, accum, mesh), jnp.arange(accum))
    (grads, new_bs), (losses, aux) = jax.lax.scan(body, (zeros, state.batch_stats), xs)
    grads = jax.tree.map(lambda g: g / accum, grads)
    return losses.mean(), grads, new_bs, jax.tree.map(jnp.mean, aux)


def contrastive_grads(loss_fn: Callable) -> Callable:
    """The gradient of the contrastive task: `loss_fn` (a `clipjax.losses` loss) over the global batch {"image":
    [N, H, W, 3], "text": [N, L]}, accumulated over `accum_steps` micro-batches when it is more than 1."""

    def grads(state, batch, *, model, frozen, accum_steps, mesh, drop):
        global_loss = _global_loss(loss_fn, mesh)
        if accum_steps > 1:
            return _accumulated_grads(state, batch, model, global_loss, frozen, accum_steps, mesh, drop)
        return _full_batch_grads(state, batch, model, global_loss, frozen, drop)

    return grads


def classify_grads(label_smoothing: float = 0.0) -> Callable:
    """The gradient of the classify task: the head's cross-entropy over {"image": [N, H, W, 3], "label": [N]}."""

    def grads(state, batch, *, model, frozen, accum_steps, mesh, drop):
        return _classify_grads(state, batch, model, frozen, label_smoothing, accum_steps, mesh, drop)

    return grads


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: CLIP, tx: optax.GradientTransformation,
               mesh: Mesh, loss_fn: Callable | None = None, grads: Callable | None = None, accum_steps: int = 1,
               frozen: tuple[str, ...] = (), patch_dropout: float = 0.0):
    """One optimizer step on a global batch → (new state, metrics). `grads`: the task's loss and gradient
    (`classify_grads(...)`; a task's `step_options` gives it); by default `contrastive_grads(loss_fn)`.
    Images and texts may be shorter than the model's (a training phase of fewer tokens); `patch_dropout` drops that
    fraction of ViT patch tokens per image, with a key of (state.rng, step).

    A non-finite loss or gradient skips the update (params, optimizer and BatchNorm state unchanged) and is counted.
    """
    batch = {**{k: v for k, v in batch.items() if k != "nan"}, "image": prepare_images(batch)}
    drop = (patch_dropout, jax.random.fold_in(state.rng, state.step)) if patch_dropout else None
    grads_of = grads or contrastive_grads(loss_fn)
    loss, grads, new_bs, aux = grads_of(state, batch, model=model, frozen=frozen, accum_steps=accum_steps, mesh=mesh,
                                        drop=drop)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        return clamp_logit_scale(optax.apply_updates(state.params, updates)), new_opt, new_bs

    def skip(_):
        return state.params, state.opt_state, state.batch_stats

    # A branch, not a `where` over every leaf: the skip costs nothing and the program stays small (compile time:
    # experiments/RESULTS.md).
    params, opt_state, batch_stats = jax.lax.cond(finite, update, skip, None)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "logit_scale": params["logit_scale"],
               "temperature": jnp.exp(params["logit_scale"]), "nonfinite_total": new_state.nonfinite_total,
               "nonfinite_streak": new_state.nonfinite_streak, **aux}
    if "logit_bias" in params:
        metrics["logit_bias"] = params["logit_bias"]
    return new_state, metrics


CONTRASTIVE_FIELDS = {"image": 4, "text": 2}  # the fields of a task's batch and their ranks
CLASSIFY_FIELDS = {"image": 4, "label": 1}


def batch_shardings(mesh: Mesh, fields: dict[str, int]) -> dict[str, NamedSharding]:
    """Shardings of a global batch: every field split over the batch axes."""
    return {name: shd.batch_sharding(mesh, ndim) for name, ndim in fields.items()}


def head_logits(features: jax.Array, head: dict[str, jax.Array]) -> jax.Array:
    """The classification head: normalize(features) @ kernel + bias, [B, E] → [B, K]."""
    return l2_normalize(features) @ head["kernel"] + head["bias"]
