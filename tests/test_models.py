"""Model code: initialisation scheme, numerics options (bf16, remat, scan), pooling, config handling."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
from clipjax.models import CLIP, CLIPConfig, TextConfig, VisionConfig, get_model_config
from clipjax.models.layers import stack_layers, unstack_layers

CFG = CLIPConfig(embed_dim=32, vision=VisionConfig(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
                 text=TextConfig(context_length=16, vocab_size=200, width=64, heads=2, layers=2), quick_gelu=True)


def inputs(cfg=CFG, n=4, seed=0):
    rng = np.random.default_rng(seed)
    s, c, v = cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size
    tokens = rng.integers(1, v - 1, (n, c)).astype(np.int32)
    ends = rng.integers(3, c, n)
    for i, e in enumerate(ends):
        tokens[i, e] = v - 1
        tokens[i, e + 1:] = 0
    return jnp.asarray(rng.standard_normal((n, s, s, 3)), jnp.float32), jnp.asarray(tokens)


def init(cfg=CFG, seed=0):
    images, tokens = inputs(cfg)
    return nn.meta.unbox(CLIP(cfg).init(jax.random.PRNGKey(seed), images, tokens))


def test_openai_initialisation_scheme():
    cfg = CFG.replace(text=TextConfig(context_length=77, vocab_size=49408, width=512, heads=8, layers=12))
    shapes = jax.eval_shape(lambda: init(cfg))
    assert shapes["params"]["text"]["token_embedding"]["embedding"].shape == (49408, 512)
    p = init(cfg)["params"]
    t = p["text"]
    assert np.std(t["token_embedding"]["embedding"]) == pytest.approx(0.02, rel=0.02)
    assert np.std(t["positional_embedding"]) == pytest.approx(0.01, rel=0.05)
    block = t["transformer"]["resblocks_0"]
    assert np.std(block["attn"]["qkv_kernel"]) == pytest.approx(512 ** -0.5, rel=0.05)
    assert np.std(block["attn"]["out_kernel"]) == pytest.approx(512 ** -0.5 * 24 ** -0.5, rel=0.05)
    assert np.std(block["mlp"]["c_fc"]["kernel"]) == pytest.approx(1024 ** -0.5, rel=0.05)
    assert np.std(t["text_projection"]["kernel"]) == pytest.approx(512 ** -0.5, rel=0.05)
    assert float(p["logit_scale"]) == pytest.approx(math.log(1 / 0.07))
    assert np.all(block["ln_1"]["scale"] == 1) and np.all(block["attn"]["qkv_bias"] == 0)


def test_resnet_zero_inits_last_batchnorm_of_each_bottleneck():
    cfg = CFG.replace(vision=VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=8, patch_size=None))
    p = init(cfg)
    assert np.all(p["params"]["visual"]["layer1_0"]["bn3"]["scale"] == 0)
    assert np.all(p["params"]["visual"]["layer1_0"]["bn1"]["scale"] == 1)
    assert np.all(p["batch_stats"]["visual"]["bn1"]["var"] == 1)


def _loss_and_grads(cfg, params):
    images, tokens = inputs(cfg)

    def loss(p):
        out = CLIP(cfg).apply({"params": p}, images, tokens)
        logits = jnp.exp(out["logit_scale"]) * out["image_embeds"] @ out["text_embeds"].T
        return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits)))

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_changes_nothing_but_memory(remat):
    params = init()["params"]
    l0, g0 = _loss_and_grads(CFG, params)
    l1, g1 = _loss_and_grads(CFG.replace(remat=remat), params)
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_scanned_layers_match_unrolled_in_value_and_gradient():
    params = init()["params"]
    l0, g0 = _loss_and_grads(CFG, params)
    l1, g1 = _loss_and_grads(CFG.replace(scan_layers=True), stack_layers(params))
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(unstack_layers(g1))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # float32 reassociation inside the scan
    assert jax.tree.structure(unstack_layers(stack_layers(params))) == jax.tree.structure(params)


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_layer_loop_scan_equals_unrolled_program(remat):
    """Per-layer parameters run under lax.scan (the CPU default) or one block after another: same numbers."""
    from clipjax.models.layers import Transformer

    x = jax.random.normal(jax.random.key(1), (3, 7, 32))
    kw = dict(layers=3, heads=4, causal=True, remat=remat)
    params = Transformer(**kw, loop="unroll").init(jax.random.key(0), x)["params"]
    assert sorted(params) == ["resblocks_0", "resblocks_1", "resblocks_2"]

    def run(loop):
        f = lambda p, h: jnp.mean(jnp.square(Transformer(**kw, loop=loop).apply({"params": p}, h)))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)

    (l0, (gp0, gx0)), (l1, (gp1, gx1)) = run("unroll"), run("scan")
    assert float(l1) == pytest.approx(float(l0), rel=1e-5)  # float32 reassociation inside the scan
    np.testing.assert_allclose(gx1, gx0, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(gp0), jax.tree.leaves(gp1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="loop='sideways'"):
        Transformer(**kw, loop="sideways").apply({"params": params}, x)


def test_layer_loop_environment_override(monkeypatch):
    from clipjax.cpu import scan_unrolled_layers

    monkeypatch.delenv("CLIPJAX_LAYER_LOOP", raising=False)
    assert scan_unrolled_layers(12) is True and scan_unrolled_layers(6) is False  # the CPU default by depth
    monkeypatch.setenv("CLIPJAX_LAYER_LOOP", "unroll")
    assert scan_unrolled_layers(12) is False
    monkeypatch.setenv("CLIPJAX_LAYER_LOOP", "scan")
    assert scan_unrolled_layers(2) is True
    monkeypatch.setenv("CLIPJAX_LAYER_LOOP", "bogus")
    with pytest.raises(ValueError, match="CLIPJAX_LAYER_LOOP='bogus'"):
        scan_unrolled_layers(12)


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
    cfg16 = CFG.replace(dtype="bfloat16")
    v = init(cfg16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))
    images, tokens = inputs()
    f32 = CLIP(CFG).apply(v, images, method=CLIP.encode_image)
    f16 = CLIP(cfg16).apply(v, images, method=CLIP.encode_image)
    assert f16.dtype == jnp.float32
    rel = float(jnp.abs(f16 - f32).max() / jnp.abs(f32).max())
    assert 1e-6 < rel < 5e-2  # really computed in bf16, and still close


def test_text_pooling_reads_the_eot_position_only():
    v = init()
    images, tokens = inputs()
    model = CLIP(CFG)
    base = model.apply(v, tokens, method=CLIP.encode_text)
    # causal: tokens after EOT cannot change the pooled feature
    changed = np.asarray(tokens).copy()
    eot = np.argmax(changed, axis=1)
    for i, e in enumerate(eot):
        changed[i, e + 1:] = 7
    np.testing.assert_allclose(model.apply(v, jnp.asarray(changed), method=CLIP.encode_text), base, rtol=1e-6,
                               atol=1e-6)
    # a token before EOT does change it
    changed = np.asarray(tokens).copy()
    changed[:, 1] = (changed[:, 1] + 1) % (CFG.text.vocab_size - 1)
    assert float(jnp.abs(model.apply(v, jnp.asarray(changed), method=CLIP.encode_text) - base).max()) > 1e-4
    # first-match pooling (Hugging Face non-legacy configs) agrees when EOT is the max id
    first = CLIP(CFG.replace(text=CFG.text.__class__(**{**CFG.text.__dict__, "eot_token_id": 199})))
    np.testing.assert_allclose(first.apply(v, tokens, method=CLIP.encode_text), base, rtol=1e-6, atol=1e-6)


def test_named_models_cover_the_openai_nine():
    names = set(clipjax.list_models())
    for n in ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]:
        assert n in names and f"{n}-quickgelu" in names
    assert get_model_config("ViT-B/32") == get_model_config("ViT-B-32")
    assert get_model_config("ViT-L-14-336-quickgelu").quick_gelu
    assert get_model_config("RN50x4").vision.heads == 80 * 32 // 64


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'ViT-B-33'.*did you mean"):
        get_model_config("ViT-B-33")
    cfg = {"embed_dim": 8, "vision_cfg": {"layers": 1, "width": 64, "patch_size": 8, "image_size": 16,
                                          "attentional_pool": True}, "text_cfg": {}}
    with pytest.raises(ValueError, match="attentional_pool=True is not supported"):
        get_model_config(cfg)
    cfg["vision_cfg"]["attentional_pool"] = False
    cfg["vision_cfg"]["frobnicate"] = 1
    with pytest.raises(ValueError, match="unknown option 'frobnicate'"):
        get_model_config(cfg)


def test_config_dict_round_trip():
    for name in ["RN50", "ViT-L-14-336-quickgelu"]:
        cfg = get_model_config(name)
        assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
        assert get_model_config(cfg.to_open_clip()) == cfg


def test_image_size_mismatch_is_reported():
    v = init()
    with pytest.raises(ValueError, match=r"expects \[B, 32, 32, 3\]"):
        CLIP(CFG).apply(v, jnp.zeros((1, 64, 64, 3)), method=CLIP.encode_image)
