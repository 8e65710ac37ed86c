"""Activation sharding is real: with `shd.with_activation_sharding` the compiled program splits the MLP hidden
activation and the attention heads over `tensor` and the batch over (data, fsdp), per-device activation memory shrinks
with `tensor`, the numbers do not change, and evaluation works on FSDP-sharded parameters.

Letters: B batch, L tokens, D width, F MLP width, E embed dim, S image side.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from clipjax import sharding as shd
from clipjax.losses import clip_loss, get_loss
from clipjax.models import CLIP, CLIPConfig, TextConfig, VisionConfig
from clipjax.models.layers import constrain
from clipjax.step import make_train_state, train_step

# Vision: D 64, F 256, L (32/8)² + 1 = 17 tokens, 4 heads. Text: D 32, F 128, L 8, 2 heads. Every shape is distinct,
# so the per-device hidden activations can be recognised in the compiled program by their shapes.
CFG = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=1, width=64, patch_size=8, head_width=16),
                 text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1), quick_gelu=True)
N = 16  # global batch; 4 rows per fsdp shard
VISION_HIDDEN, TEXT_HIDDEN = (17, 256), (8, 128)  # (L, F) of each tower's MLP hidden activation


def make_batch(n=N, cfg=CFG, seed=0):
    rng = np.random.default_rng(seed)
    s, length = cfg.vision.image_size, cfg.text.context_length
    text = rng.integers(1, cfg.text.vocab_size - 1, (n, length)).astype(np.int32)
    text[np.arange(n), rng.integers(2, length, n)] = cfg.text.vocab_size - 1
    return rng.standard_normal((n, s, s, 3)).astype(np.float32), text


def loss_and_grads(params, images, tokens, *, model):
    """The CLIP loss over the whole batch and its gradient w.r.t. the parameters (the train forward + backward)."""

    def loss_of(p):
        out = model.apply({"params": p}, images, tokens, train=True)
        return clip_loss(out["image_embeds"], out["text_embeds"], p["logit_scale"])

    return jax.value_and_grad(loss_of)(params)


def mesh_of_shape(shape):
    return shd.make_mesh(shape, devices=jax.devices()[:int(np.prod(list(shape.values())))])


def boxed_params(cfg=CFG):
    images, tokens = make_batch(1, cfg)
    return jax.eval_shape(CLIP(cfg).init, jax.random.PRNGKey(0), images, tokens)["params"]


def init_params(cfg=CFG):
    images, tokens = make_batch(1, cfg)
    return nn.meta.unbox(jax.jit(CLIP(cfg).init)(jax.random.PRNGKey(0), images, tokens)["params"])


def compile_grads(mesh_shape):
    """loss_and_grads jitted with the activation rules on the mesh, FSDP/TP parameters, split batch → compiled."""
    mesh = mesh_of_shape(mesh_shape)
    boxed = boxed_params()
    param_sh = shd.logical_shardings(boxed, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                          param_sh)
    images, tokens = make_batch()
    args = (params, jax.ShapeDtypeStruct(images.shape, images.dtype, sharding=shd.batch_sharding(mesh, 4)),
            jax.ShapeDtypeStruct(tokens.shape, tokens.dtype, sharding=shd.batch_sharding(mesh, 2)))
    fn = shd.with_activation_sharding(functools.partial(loss_and_grads, model=CLIP(CFG)), mesh)
    return jax.jit(fn).lower(*args).compile()


@pytest.fixture(scope="module")
def compiled_tp():
    return {t: compile_grads({"fsdp": 4, "tensor": t}) for t in (1, 2)}


def hlo_shape_count(hlo: str, shape) -> int:
    """How often an f32 array of exactly `shape` occurs in the compiled (per-device) program."""
    return len(re.findall(r"f32\[" + ",".join(map(str, shape)) + r"\]", hlo))


# ============================================================================================ the entry point

def test_constrain_is_identity_outside_the_entry_point():
    x = jnp.ones((4, 3))
    assert constrain(x, "batch", "act_mlp") is x
    assert shd.active_mesh() is None


def test_activation_spec_follows_rules_and_drops_axes_that_do_not_divide():
    mesh = mesh_of_shape({"fsdp": 4, "tensor": 2})

    def f(x):  # [B, L, F]
        return constrain(x * 2, "batch", "length", "act_mlp")

    even = jax.jit(shd.with_activation_sharding(f, mesh))(jnp.ones((8, 5, 6)))
    assert even.sharding.spec == P(("fsdp",), None, "tensor") or even.sharding.spec == P("fsdp", None, "tensor")
    odd = jax.jit(shd.with_activation_sharding(f, mesh))(jnp.ones((6, 5, 3)))  # 4 ∤ 6 and 2 ∤ 3: nothing split
    np.testing.assert_array_equal(odd, 2 * np.ones((6, 5, 3)))
    assert odd.sharding.is_fully_replicated
    with pytest.raises(ValueError, match="logical axis names"):
        jax.jit(shd.with_activation_sharding(f, mesh))(jnp.ones((8, 6)))


def test_mesh_of_and_no_mesh_leaves_function_unchanged():
    mesh = mesh_of_shape({"fsdp": 8})
    assert shd.mesh_of({"a": jax.device_put(jnp.ones(8), shd.replicated(mesh))}) == mesh
    assert shd.mesh_of({"a": np.ones(3)}) is None

    def f(x):
        return x

    assert shd.with_activation_sharding(f, None) is f


# ============================================================================================ the compiled program

def test_mlp_hidden_is_split_over_tensor_in_the_compiled_program(compiled_tp):
    b = N // 4  # rows per fsdp shard
    for (length, f) in (VISION_HIDDEN, TEXT_HIDDEN):
        full, half = (b, length, f), (b, length, f // 2)
        hlo1, hlo2 = compiled_tp[1].as_text(), compiled_tp[2].as_text()
        assert hlo_shape_count(hlo1, full) > 0 and hlo_shape_count(hlo1, half) == 0, (full, "tensor=1")
        assert hlo_shape_count(hlo2, half) > 0, (half, "tensor=2: the hidden activation is split over tensor")
        assert hlo_shape_count(hlo2, full) == 0, (full, "tensor=2: no device holds the whole hidden activation")


def test_attention_heads_are_split_over_tensor(compiled_tp):
    b = N // 4
    hlo = compiled_tp[2].as_text()
    # vision q/k/v [B, L, H, K] per device: 4 heads → 2; text: 2 heads → 1
    assert re.search(rf"f32\[(3,)?{b},17,2,16\]", hlo) and not re.search(rf"f32\[(3,)?{b},17,4,16\]", hlo)
    assert re.search(rf"f32\[(3,)?{b},8,1,16\]", hlo) and not re.search(rf"f32\[(3,)?{b},8,2,16\]", hlo)


def test_mlp_kernel_and_its_gradient_are_split_over_tensor(compiled_tp):
    compiled = compiled_tp[2]
    (param_sh, *_), _ = compiled.input_shardings
    _, grad_sh = compiled.output_shardings  # left to the compiler (the trainer's jit fixes them)
    for tower in ("visual", "text"):
        kernel = param_sh[tower]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"]
        grad = grad_sh[tower]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"]
        d, f = (64, 256) if tower == "visual" else (32, 128)
        assert kernel.spec == P("fsdp", "tensor") and kernel.shard_shape((d, f)) == (d // 4, f // 2)
        assert grad.shard_shape((d, f))[1] == f // 2, (tower, grad)  # the gradient is computed split over tensor
    assert hlo_shape_count(compiled.as_text(), (16, 128)) > 0  # the vision c_fc kernel per device [D/4, F/2]


def test_per_device_activation_bytes_shrink_with_tensor(compiled_tp):
    temp = {t: c.memory_analysis().temp_size_in_bytes for t, c in compiled_tp.items()}
    args = {t: c.memory_analysis().argument_size_in_bytes for t, c in compiled_tp.items()}
    print(f"per-device temp bytes tensor=1: {temp[1]}, tensor=2: {temp[2]}; arguments {args[1]} → {args[2]}")
    assert temp[2] < 0.8 * temp[1], temp
    assert args[2] < args[1], args


# ============================================================================================ same numbers

def assert_trees_close(a, b, atol=1e-5):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5, err_msg=str(path))


def test_loss_and_grads_with_rules_on_fsdp_tensor_equal_single_device():
    params = init_params()
    images, tokens = make_batch()
    fn = functools.partial(loss_and_grads, model=CLIP(CFG))
    one = jax.devices()[0]
    ref_loss, ref_grads = jax.jit(fn)(*jax.device_put((params, images, tokens), one))

    mesh = mesh_of_shape({"fsdp": 4, "tensor": 2})
    sharded = jax.device_put(params, shd.logical_shardings(boxed_params(), mesh))
    args = (sharded, jax.device_put(images, shd.batch_sharding(mesh, 4)),
            jax.device_put(tokens, shd.batch_sharding(mesh, 2)))
    loss, grads = jax.jit(shd.with_activation_sharding(fn, mesh))(*args)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert_trees_close(grads, ref_grads)
    assert not grads["visual"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"].sharding.is_fully_replicated


def _train(mesh_shape, steps=2):
    """The trainer's step jitted as `jit_train_step` does, with the activation rules → (state, losses)."""
    mesh = mesh_of_shape(mesh_shape)
    model = CLIP(CFG)
    state, shardings, tx = make_train_state(model, lambda p: optax.sgd(0.5), 0, mesh)
    step = functools.partial(train_step, model=model, tx=tx, loss_fn=get_loss("clip"), mesh=mesh)
    in_batch = {"image": shd.batch_sharding(mesh, 4), "text": shd.batch_sharding(mesh, 2)}
    jitted = jax.jit(shd.with_activation_sharding(step, mesh), in_shardings=(shardings, in_batch),
                     out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))
    images, tokens = make_batch()
    losses = []
    for _ in range(steps):
        state, metrics = jitted(state, {"image": images, "text": tokens})
        losses.append(float(metrics["loss"]))
    return state, losses


def test_train_step_with_rules_on_fsdp_tensor_equals_single_device():
    ref_state, ref_losses = _train({"data": 1})
    state, losses = _train({"fsdp": 4, "tensor": 2})
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(state.params, ref_state.params, atol=1e-5)


# ============================================================================================ evaluation

def test_eval_features_with_fsdp_sharded_params_equal_unsharded():
    from clipjax.evaluate.features import Encoder

    params = init_params()
    variables = {"params": params}
    mesh = mesh_of_shape({"fsdp": 8})
    sharded = {"params": jax.device_put(params, shd.logical_shardings(boxed_params(), mesh))}
    assert shd.sharded_fraction(sharded["params"]).fraction > 0.5
    images, tokens = make_batch(8)
    encoder = Encoder(CFG)
    ref_img, ref_txt = encoder.images(variables, images), encoder.texts(variables, tokens)
    np.testing.assert_allclose(encoder.images(sharded, images), ref_img, atol=1e-5)
    np.testing.assert_allclose(encoder.texts(sharded, tokens), ref_txt, atol=1e-5)

    # the encoders as evaluation would jit them with the rules on the variables' mesh
    model = CLIP(CFG)

    def image(v, x):  # [B, S, S, 3] → [B, E]
        return model.apply(v, x, method=CLIP.encode_image)

    def text(v, t):  # [B, L] → [B, E]
        return model.apply(v, t, method=CLIP.encode_text)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    mesh = shd.mesh_of(sharded)
    rows = shd.batch_sharding(mesh, 4), shd.batch_sharding(mesh, 2)
    got_img = jax.jit(shd.with_activation_sharding(image, mesh))(sharded, jax.device_put(images, rows[0]))
    got_txt = jax.jit(shd.with_activation_sharding(text, mesh))(sharded, jax.device_put(tokens, rows[1]))
    np.testing.assert_allclose(unit(np.asarray(got_img)), ref_img, atol=1e-5)
    np.testing.assert_allclose(unit(np.asarray(got_txt)), ref_txt, atol=1e-5)


def test_resnet_features_with_rules_on_fsdp_tensor_equal_single_device():
    cfg = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=(1, 1, 1, 1), width=8, patch_size=None),
                     text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    model = CLIP(cfg)
    images, tokens = make_batch(8, cfg)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1], tokens[:1])
    boxed, variables = variables, nn.meta.unbox(variables)

    def image(v, x):  # [B, S, S, 3] → [B, E]
        return model.apply(v, x, method=CLIP.encode_image)

    ref = jax.jit(image)(*jax.device_put((variables, images), jax.devices()[0]))
    mesh = mesh_of_shape({"fsdp": 4, "tensor": 2})
    sharded = jax.device_put(variables, shd.logical_shardings(boxed, mesh))
    jitted = jax.jit(shd.with_activation_sharding(image, mesh))
    got = jitted(sharded, jax.device_put(images, shd.batch_sharding(mesh, 4)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)
    assert got.sharding.spec[0] is not None  # features stay split over the batch
