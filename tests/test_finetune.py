"""Fine-tuning from pretrained weights: LiT (locked image tower, text tower re-initialised), classifier fine-tuning
from the zero-shot head, and WiSE-FT weight interpolation.

The classifier runs use the committed Hugging Face fixture model (vocabulary 1000, so prompts go through the
"folded" CLIP tokenizer) on a small build of the embedded scenes dataset.
"""

import dataclasses
import functools
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
from clipjax import finetune, wise_ft
from clipjax import sharding as shd
from clipjax.data import scenes
from folded_tokenizer import FoldedTokenizer
from clipjax.losses import get_loss
from clipjax.models import CLIP, CLIPConfig, TextConfig, VisionConfig
from clipjax.train import make_train_state, make_tx, train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=16, layers=1, width=32, patch_size=8, head_width=16),
                  text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1), quick_gelu=True)
TEMPLATES = ["a photo of a {}.", "a {} on a plain background."]


def get_config(name, arg=None):
    sys.path.insert(0, str(ROOT / "configs"))
    try:
        module = __import__(name)
        return module.get_config(arg)
    finally:
        sys.path.remove(str(ROOT / "configs"))


def leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b):
    a, b = leaves(a), leaves(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def random_variables(cfg, seed):
    """Weights of `cfg` drawn at random, shapes from `jax.eval_shape` (nothing compiled)."""
    s = cfg.vision.image_size
    shapes = nn.meta.unbox(jax.eval_shape(CLIP(cfg).init, jax.random.key(0), jnp.zeros((1, s, s, 3)),
                                          jnp.zeros((1, cfg.text.context_length), jnp.int32)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.05, x.shape), jnp.float32), shapes)


# ============================================================================================ LiT

def test_lit_locks_image_tower_and_reinitialises_text_tower():
    config = get_config("lit", "runlocal")
    assert tuple(config.frozen) == ("visual",) and tuple(config.reinit) == ("text",)
    mesh = shd.make_mesh("dp", devices=jax.devices()[:1])
    model = CLIP(TINY)
    pretrained = random_variables(TINY, seed=1)
    state, _, tx = make_train_state(model, lambda p: make_tx(config, p), 0, mesh, pretrained,
                                    tuple(config.reinit))
    assert_trees_equal(state.params["visual"], pretrained["params"]["visual"])  # the pretrained image tower
    # the text tower is initialised from scratch: no tensor is the given one, LayerNorms are back at (1, 0)
    text, given = leaves(state.params["text"]), leaves(pretrained["params"]["text"])
    assert all(not np.array_equal(text[k], given[k]) for k in text)
    for k in (k for k in text if "ln" in k):
        np.testing.assert_array_equal(text[k], np.ones_like(text[k]) if k.endswith("['scale']") else 0 * text[k])
    assert float(state.params["logit_scale"]) == float(pretrained["params"]["logit_scale"])

    step = jax.jit(functools.partial(train_step, model=model, tx=tx, loss_fn=get_loss(config.loss), mesh=mesh,
                                     frozen=tuple(config.frozen)))
    rng = np.random.default_rng(0)
    before = jax.device_get(state.params)
    for _ in range(2):  # lr is 0 at step 0 (warm-up), so the second step is the one that moves weights
        text = rng.integers(1, 63, (8, 8)).astype(np.int32)
        text[:, -1] = 63
        state, metrics = step(state, {"image": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
                                      "text": text})
        assert np.isfinite(float(metrics["loss"]))
    assert_trees_equal(state.params["visual"], pretrained["params"]["visual"])  # bit-identical after training
    moved = {k: not np.array_equal(v, leaves(before["text"])[k]) for k, v in leaves(state.params["text"]).items()}
    assert all(moved.values()), [k for k, m in moved.items() if not m]


def test_reinit_prefix_that_matches_nothing_is_an_error():
    mesh = shd.make_mesh("dp", devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"reinit prefixes \['txt'\] match no parameter"):
        make_train_state(CLIP(TINY), lambda p: make_tx(get_config("lit", "runlocal"), p), 0, mesh,
                         random_variables(TINY, 1), ("txt",))


# ============================================================================================ classifier fine-tuning

def _keys(cfg, prefix=""):
    out = set()
    for k, v in cfg.items():
        out |= _keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}"}
    return out


def test_finetune_config_file_has_the_library_keys():
    assert _keys(get_config("finetune", "init_from=x")) == _keys(finetune.default_config())
    assert get_config("finetune", "init_from=x,runlocal").total_steps < 10


@pytest.fixture(scope="module")
def scenes_spec(tmp_path_factory):
    path = scenes.build_scenes(tmp_path_factory.mktemp("scenes") / "ds", num_train=96, num_test=48, num_heldout=48,
                               image_size=32, workers=0, progress=False)
    return f"dir:{path}"


@pytest.fixture(scope="module")
def hf_fixture():
    path = ROOT / "tests" / "fixtures" / "hf_clip"
    assert (path / "model.safetensors").is_file(), f"missing fixture {path}: run tests/fixtures/make_fixtures.py"
    return path


def finetune_config(init_from, spec, steps=3):
    c = get_config("finetune", f"init_from={init_from},data={spec},tokenizer=folded,runlocal")
    c.total_steps, c.batch_size, c.lr = steps, 16, 1e-3
    c.data.templates = TEMPLATES
    c.data.max_eval_examples = 48
    return c


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, hf_fixture, scenes_spec):
    out = tmp_path_factory.mktemp("ft") / "run"
    metrics = finetune.finetune(finetune_config(hf_fixture, scenes_spec), out)
    return out, metrics


def test_zeroshot_head_is_scaled_prompt_ensemble(hf_fixture):
    model = clipjax.load(hf_fixture)
    names = ["red circle", "blue square", "green star"]
    head = finetune.zeroshot_head(model, names, TEMPLATES, tokenizer="folded")
    # independent computation: embed every prompt, normalise, average per class, renormalise, scale
    tokens = FoldedTokenizer(1000, 16)([t.format(n) for n in names for t in TEMPLATES])  # [C·T, 16]
    emb = np.asarray(model.encode_text(tokens), np.float64).reshape(3, 2, -1)  # [C, T, E]
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    w = emb.mean(axis=1)
    w /= np.linalg.norm(w, axis=-1, keepdims=True)  # [C, E]
    np.testing.assert_allclose(head.kernel, np.exp(model.logit_scale) * w.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(head.bias, np.zeros(3, np.float32))


def test_finetune_trains_the_image_tower_and_head_only(finetuned, hf_fixture, scenes_spec):
    out, metrics = finetuned
    model, head, meta = finetune.load_finetuned(out)
    start = clipjax.load(hf_fixture)
    # open_clip configs pool at argmax: the same position here, as EOT (999) is the largest id
    assert model.config == start.config.replace(text=dataclasses.replace(start.config.text, eot_token_id=None),
                                                init_logit_scale=model.config.init_logit_scale)
    assert_trees_equal(model.params["text"], start.params["text"])  # untouched
    assert float(model.params["logit_scale"]) == float(start.params["logit_scale"])
    tower, tower0 = leaves(model.params["visual"]), leaves(start.params["visual"])
    assert all(not np.array_equal(tower[k], tower0[k]) for k in tower)
    assert meta["classnames"] == list(scenes.CLASSNAMES) and meta["templates"] == TEMPLATES
    assert meta["tokenizer"] == "folded"
    zs = finetune.zeroshot_head(start, meta["classnames"], TEMPLATES, "folded")
    assert head.kernel.shape == (32, 48) and not np.array_equal(head.kernel, zs.kernel)
    # the directory is plain open_clip weights + config, as clipjax.load reads them
    again = clipjax.load(out / "model.safetensors", out / "open_clip_config.json")
    assert_trees_equal(again.variables, model.variables)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    evals = [r for r in rows if "eval/top1" in r]
    assert [r["step"] for r in evals] == [0, 3] and metrics["eval/top1"] == evals[-1]["eval/top1"]

    # step 0 is the zero-shot classifier: its accuracy, computed independently from the same images
    batches = finetune.eval_batches(scenes_spec, "test", 32, 64, max_examples=48)
    feats, labels = [], []
    for b in batches:
        feats.append(np.asarray(start.encode_image(b["image"]))[b["mask"]])
        labels.append(b["label"][b["mask"]])
    feats, labels = np.concatenate(feats), np.concatenate(labels)
    assert labels.size == 48
    predictions = (feats / np.linalg.norm(feats, axis=-1, keepdims=True) @ zs.kernel).argmax(-1)
    assert evals[0]["eval/top1"] == pytest.approx(float(np.mean(predictions == labels)), abs=1e-9)


def test_finetune_again_in_a_finished_workdir_resumes_and_keeps_the_outputs(finetuned, hf_fixture, scenes_spec):
    """The workdir is the trainer's: running the same command again resumes (here: nothing left to do) and writes
    the same outputs, instead of refusing or starting over."""
    out = finetuned[0]
    before = {f: (out / f).read_bytes() for f in ("model.safetensors", "head.safetensors", "classifier.json")}
    finetune.finetune(finetune_config(hf_fixture, scenes_spec), out)
    assert {f: (out / f).read_bytes() for f in before} == before
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # no row written twice


def test_a_finetuning_workdir_loads_as_its_clip(finetuned):
    """`clipjax.load(workdir)` reads the newest checkpoint: the CLIP without its head, equal to the exported files."""
    from_checkpoint = clipjax.load(finetuned[0])
    exported, _, _ = finetune.load_finetuned(finetuned[0])
    assert "head" not in from_checkpoint.params
    assert_trees_equal(from_checkpoint.variables, exported.variables)


def test_save_finetuned_refuses_a_directory_that_holds_a_model(finetuned):
    model, head, meta = finetune.load_finetuned(finetuned[0])
    with pytest.raises(FileExistsError, match="already holds a model"):
        finetune.save_finetuned(finetuned[0], model, head, meta)


@pytest.mark.slow
def test_finetune_resnet_trains_batchnorm_statistics(fixtures_dir, scenes_spec, tmp_path):
    d = fixtures_dir / "openclip_rn"
    config = finetune_config(d / "model.safetensors", scenes_spec, steps=2)
    config.init_config = str(d / "open_clip_config.json")
    config.data.eval = ""
    finetune.finetune(config, tmp_path / "rn")
    model, head, _ = finetune.load_finetuned(tmp_path / "rn")
    start = clipjax.load(d / "model.safetensors", d / "open_clip_config.json")
    assert model.config == start.config and head.kernel.shape == (32, 48)
    assert_trees_equal(model.params["text"], start.params["text"])
    stats, stats0 = leaves(model.variables["batch_stats"]), leaves(start.variables["batch_stats"])
    assert all(not np.array_equal(stats[k], stats0[k]) for k in stats)  # running statistics followed the data


# ============================================================================================ WiSE-FT

def test_wise_ft_endpoints_and_midpoint(finetuned, hf_fixture):
    a, b, head_a, head_b, meta = wise_ft.load_ends(str(hf_fixture), str(finetuned[0]))
    start = finetune.zeroshot_head(clipjax.load(hf_fixture), meta["classnames"], meta["templates"], "folded")
    np.testing.assert_array_equal(head_a.kernel, start.kernel)  # the zero-shot end of the head
    for alpha, (model_ref, head_ref) in ((0.0, (a, head_a)), (1.0, (b, head_b))):
        model, head = wise_ft.wise_ft(a, b, alpha, head_a, head_b)
        assert_trees_equal(model.variables, model_ref.variables)
        np.testing.assert_array_equal(head.kernel, head_ref.kernel)
        np.testing.assert_array_equal(head.bias, head_ref.bias)
    model, head = wise_ft.wise_ft(a, b, 0.5, head_a, head_b)
    mid = jax.tree.map(lambda x, y: (np.asarray(x) + np.asarray(y)) / np.float32(2), a.variables, b.variables)
    assert_trees_equal(model.variables, mid)
    np.testing.assert_array_equal(head.kernel, (head_a.kernel + head_b.kernel) / np.float32(2))


def test_wise_ft_cli_writes_and_evaluates(finetuned, hf_fixture, scenes_spec, tmp_path):
    out = tmp_path / "wise"
    code = wise_ft.main(["--zeroshot", str(hf_fixture), "--finetuned", str(finetuned[0]), "--alpha", "0.5",
                         "--alphas", "0,1", "--eval-data", scenes_spec, "--eval-split", "test",
                         "--max-examples", "48", "--batch-size", "64", "--out", str(out)])
    assert code == 0
    model, head, meta = finetune.load_finetuned(out)
    a, b, head_a, head_b, _ = wise_ft.load_ends(str(hf_fixture), str(finetuned[0]))
    ref_model, ref_head = wise_ft.wise_ft(a, b, 0.5, head_a, head_b)
    assert_trees_equal(model.variables, ref_model.variables)
    np.testing.assert_array_equal(head.kernel, ref_head.kernel)
    assert meta["wise_ft"]["alpha"] == 0.5 and meta["classnames"] == list(scenes.CLASSNAMES)
    rows = json.loads((out / "wise_ft.json").read_text())["results"]
    assert [r["alpha"] for r in rows] == [0.0, 1.0]
    # the endpoints' head accuracy is what fine-tuning measured on the same images at step 0 and at the end
    evals = [json.loads(line) for line in (finetuned[0] / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/top1"] for r in evals if "eval/top1" in r]
    assert rows[0]["test/head_top1"] == pytest.approx(evals[0], abs=1e-9)
    assert rows[1]["test/head_top1"] == pytest.approx(evals[-1], abs=1e-9)
    assert all(0.0 <= r["test/zeroshot_top1"] <= 1.0 for r in rows)


def test_wise_ft_rejects_different_architectures(finetuned, fixtures_dir, capsys):
    d = fixtures_dir / "openclip_vit"
    code = wise_ft.main(["--zeroshot", str(d / "model.safetensors"), "--zeroshot-config",
                         str(d / "open_clip_config.json"), "--finetuned", str(finetuned[0]), "--eval-data", "scenes"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "different architectures" in err


def test_lit_with_a_resnet_keeps_the_locked_towers_batchnorm_statistics():
    """A locked ResNet runs in inference mode: its BatchNorm statistics are used, not updated (LiT)."""
    cfg = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=(1, 1, 1, 1), width=8, patch_size=None),
                     text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    config = get_config("lit", "runlocal")
    mesh = shd.make_mesh("dp", devices=jax.devices()[:1])
    model = CLIP(cfg)
    variables = random_variables(cfg, seed=1)
    variables["batch_stats"] = jax.tree.map(lambda x: x + 0.5, variables["batch_stats"])  # not the init values
    rng = np.random.default_rng(0)
    text = rng.integers(1, 63, (8, 8)).astype(np.int32)
    text[:, -1] = 63
    batch = {"image": rng.standard_normal((8, 32, 32, 3)).astype(np.float32), "text": text}
    for frozen, stats_kept in ((tuple(config.frozen), True), ((), False)):
        tx_config = config.copy_and_resolve_references()
        tx_config.frozen = frozen
        state, _, tx = make_train_state(model, lambda p, c=tx_config: make_tx(c, p), 0, mesh, variables, ())
        step = jax.jit(functools.partial(train_step, model=model, tx=tx, loss_fn=get_loss(config.loss), mesh=mesh,
                                         frozen=frozen))
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
        same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.batch_stats),
                                                     jax.tree.leaves(variables["batch_stats"]))]
        assert all(same) if stats_kept else not any(same)
