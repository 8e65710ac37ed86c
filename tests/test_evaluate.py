"""Evaluation: zero-shot classifier and metrics against NumPy on reference embeddings (the transformers fixture),
Recall@K on a hand-built case, the linear probe against SciPy's L-BFGS and on a separable set, evaluators on a
small scenes dataset (also with sharded variables), and registry errors."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from clipjax.data import pipeline, scenes
from clipjax.data.tokenizer import tokenize
from clipjax.evaluate import templates as tpl
from clipjax.evaluate.features import Encoder
from clipjax.evaluate.linear_probe import fit_logistic_regression, linear_probe
from clipjax.evaluate.registry import EVALUATORS, config_keys, make_evaluators
from clipjax.evaluate.retrieval import recall_at_k
from clipjax.evaluate.zeroshot import ClassifierCache, build_classifier, classification_metrics, zeroshot_logits
from clipjax.interop.load import load
from clipjax.models import CLIP, CLIPConfig, TextConfig, VisionConfig

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ============================================================================================ zero-shot

# Prompts of a 2-class, 2-template classifier, each mapped to a row of the fixture's token ids, so the text
# features of every prompt are the reference features transformers computed for that row.
PROMPT_ROWS = {"A x": 0, "A y": 1, "B x": 2, "B y": 2}
CLASSES, TEMPLATES = ["A", "B"], ["{} x", "{} y"]


@pytest.fixture(scope="module")
def hf():
    return load(FIXTURES / "hf_clip"), np.load(FIXTURES / "hf_clip" / "io.npz")


def test_zeroshot_matches_numpy_on_reference_embeddings(hf):
    model, io = hf
    calls = []

    def tokenize_rows(texts):
        calls.append(list(texts))
        return io["tokens"][[PROMPT_ROWS[t] for t in texts]]

    enc = Encoder(model.config)
    w = build_classifier(lambda t: enc.texts(model.variables, t), tokenize_rows, CLASSES, TEMPLATES, batch_size=3)
    logits = zeroshot_logits(enc.images(model.variables, io["images"]), w)  # [4, 2]

    # NumPy from the transformers features: normalise, average per class, re-normalise, 100 · img @ W.
    txt = _unit(io["text_features_f64"])
    w_ref = np.stack([_unit(txt[[0, 1]].mean(0)), _unit(txt[[2, 2]].mean(0))]).T  # [E, 2]
    logits_ref = 100 * _unit(io["image_features_f64"]) @ w_ref
    assert calls == [["A x", "A y", "B x", "B y"]]
    np.testing.assert_allclose(w, w_ref, atol=2e-5)
    np.testing.assert_allclose(logits, logits_ref, atol=2e-3)
    pred = logits.argmax(1)
    np.testing.assert_array_equal(pred, logits_ref.argmax(1))
    assert len(set(pred.tolist())) == 2  # the case discriminates

    labels = np.array([1, 0, 0, 1])
    m = classification_metrics(logits, labels)
    assert m["top1"] == pytest.approx(np.mean(logits_ref.argmax(1) == labels))
    assert "top5" not in m  # fewer than 5 classes


def test_classifier_cache_reuses_tokens_and_keyed_classifiers(tmp_path):
    calls = {"tok": 0, "enc": 0}
    rng = np.random.default_rng(0)
    table = rng.standard_normal((64, 8))

    def tok(texts):
        calls["tok"] += 1
        return np.array([[sum(map(ord, t)) % 64] for t in texts], np.int32)

    def enc(tokens):
        calls["enc"] += 1
        return table[tokens[:, 0]]

    cache = ClassifierCache(tmp_path)
    a = build_classifier(enc, tok, ["cat", "dog"], ["a {}.", "the {}"], cache=cache, tokenizer_key="t")
    b = build_classifier(enc, tok, ["cat", "dog"], ["a {}.", "the {}"], cache=cache, tokenizer_key="t")
    assert calls == {"tok": 1, "enc": 2}  # tokens re-used, embeddings recomputed (no model key: weights may change)
    np.testing.assert_array_equal(a, b)
    c = build_classifier(enc, tok, ["cat", "dog"], ["a {}.", "the {}"], cache=ClassifierCache(tmp_path),
                         tokenizer_key="t", model_key="ckpt@10")
    d = build_classifier(enc, tok, ["cat", "dog"], ["a {}.", "the {}"], cache=ClassifierCache(tmp_path),
                         tokenizer_key="t", model_key="ckpt@10")
    assert calls == {"tok": 1, "enc": 3}  # tokens from disk; the keyed classifier computed once, then read back
    np.testing.assert_array_equal(c, d)
    ref = np.stack([_unit(_unit(table[[sum(map(ord, t.format(n))) % 64 for t in ("a {}.", "the {}")]]).mean(0))
                    for n in ("cat", "dog")]).T
    np.testing.assert_allclose(a, ref, atol=1e-6)


def test_classification_metrics_against_loops():
    rng = np.random.default_rng(1)
    logits, labels = rng.standard_normal((50, 7)), rng.integers(0, 6, 50)  # class 6 never occurs
    labels[:3] = -1  # padding rows are ignored
    m = classification_metrics(logits, labels)
    rows = [(lg, y) for lg, y in zip(logits, labels) if y >= 0]
    top1 = np.mean([np.argmax(lg) == y for lg, y in rows])
    top5 = np.mean([y in np.argsort(-lg)[:5] for lg, y in rows])
    per_class = [np.mean([np.argmax(lg) == y for lg, y in rows if y == c]) for c in range(6)]
    assert m["top1"] == pytest.approx(top1) and m["top5"] == pytest.approx(top5)
    assert m["mean_per_class_recall"] == pytest.approx(np.mean(per_class))
    np.testing.assert_allclose(m["per_class_recall"][:6], per_class)
    assert np.isnan(m["per_class_recall"][6])


def test_templates_data():
    assert len(tpl.get_templates("imagenet")) == 80 and len(tpl.get_classnames("imagenet")) == 1000
    assert tpl.get_classnames("imagenet")[:2] == ["tench", "goldfish"]
    assert len(tpl.get_classnames("cifar10")) == 10 and len(tpl.get_classnames("cifar100")) == 100
    assert tpl.get_templates("single") == ["a photo of a {}."]
    assert tpl.fill(["a {}.", "the {}"], ["x", "y"]) == ["a x.", "the x", "a y.", "the y"]
    with pytest.raises(ValueError, match="unknown templates 'nope'"):
        tpl.get_templates("nope")
    with pytest.raises(ValueError, match=r"exactly one '\{\}'"):
        tpl.get_templates(["no placeholder"])


# ============================================================================================ retrieval

def test_recall_at_k_constructed_case():
    e = np.eye(3)
    images = e  # I0, I1, I2
    texts = np.stack([e[0], 0.9 * e[1] + 0.1 * e[0], 0.8 * e[2] + 0.6 * e[1], e[2], e[0]])
    owner = [0, 0, 1, 2, 2]
    m = recall_at_k(images, texts, owner, ks=(1, 2, 3))
    # text → image: t0 and t3 first; t1, t2 second; t4 ties I1 and I2 at 0 and the tie goes to I1 → third.
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 5)
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 5)
    assert m["image_retrieval_recall@3"] == 1.0
    # image → text: I0 finds t0 first, I1's caption t2 comes after t1, I2 finds t3 first.
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == 1.0


def test_recall_at_k_against_sorting():
    rng = np.random.default_rng(2)
    img, owner = rng.standard_normal((30, 6)), np.repeat(np.arange(30), rng.integers(1, 4, 30))
    txt = img[owner] + 1.5 * rng.standard_normal((owner.size, 6))
    m = recall_at_k(img, txt, owner, ks=(1, 5))
    s = _unit(txt) @ _unit(img).T  # [T, I]
    for k in (1, 5):
        t2i = np.mean([owner[t] in np.argsort(-s[t])[:k] for t in range(owner.size)])
        i2t = np.mean([np.isin(np.argsort(-s[:, i])[:k], np.flatnonzero(owner == i)).any() for i in range(30)])
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
    assert 0 < m["image_retrieval_recall@1"] < 1


# ============================================================================================ linear probe

def _objective(theta, x, y, lam, c):
    w, b = theta[:-c].reshape(x.shape[1], c), theta[-c:]
    z = x @ w + b
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    onehot = np.eye(c)[y]
    loss = -np.mean(np.log(p[np.arange(len(y)), y])) + 0.5 * lam * np.sum(w ** 2)
    g = (p - onehot) / len(y)
    return loss, np.concatenate([(x.T @ g + lam * w).ravel(), g.sum(0)])


def test_logistic_regression_matches_scipy_lbfgs():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((120, 10)), rng.integers(0, 4, 120)
    for lam in (1e-2, 1.0):
        ours = fit_logistic_regression(x, y, [lam], num_classes=4)
        theta = np.concatenate([ours["w"][0].ravel(), ours["b"][0]])
        ref = scipy.optimize.minimize(_objective, np.zeros(44), args=(x, y, lam, 4), jac=True, method="L-BFGS-B",
                                      options=dict(maxiter=2000, gtol=1e-10, ftol=1e-14))
        assert _objective(theta, x, y, lam, 4)[0] == pytest.approx(ref.fun, rel=1e-5)
        np.testing.assert_allclose(ours["w"][0].ravel(), ref.x[:40], atol=2e-3)


def test_linear_probe_separable_reaches_100_percent():
    rng = np.random.default_rng(4)
    centers = 3 * rng.standard_normal((5, 16))
    y = np.repeat(np.arange(5), 40)
    x = centers[y] + 0.5 * rng.standard_normal((200, 16))
    perm = rng.permutation(200)
    x, y = x[perm], y[perm]
    m = linear_probe(x[:150], y[:150], x[150:], y[150:])
    assert m["lp_acc1"] == 1.0 and m["lp_acc5"] == 1.0
    assert m["val_accuracy"][m["l2"]] == 1.0


# ============================================================================================ evaluators

TINY = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
                  text=TextConfig(context_length=16, width=32, heads=2, layers=1))


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    return scenes.build_scenes(tmp_path_factory.mktemp("scenes") / "ds", num_train=60, num_test=24, num_heldout=30,
                               workers=0, progress=False)


@pytest.fixture(scope="module")
def tiny_model():
    return jax.jit(CLIP(TINY).init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32))


def test_zeroshot_evaluator_on_scenes_matches_direct_computation(tiny_scenes, tiny_model):
    spec = f"dir:{tiny_scenes}"
    evs = make_evaluators({"h": {"type": "zeroshot", "data": spec, "split": "heldout", "templates": ["a {}",
                                 "a photo of a {}"], "batch_size": 8, "max_examples": 20}}, TINY)
    got = evs["h"].run(tiny_model)
    assert set(got) == {"zeroshot/h/top1", "zeroshot/h/top5", "zeroshot/h/mean_per_class_recall"}
    assert evs["h"].run(tiny_model) == got  # second run from cached images: identical

    # Direct: the model's own encoders, the data layer's batches and class names, NumPy for the rest.
    model = CLIP(TINY)
    encode_text = jax.jit(lambda v, t: model.apply(v, t, method=CLIP.encode_text))
    encode_image = jax.jit(lambda v, x: model.apply(v, x, method=CLIP.encode_image))
    names = pipeline.get_classnames(spec, "heldout")
    assert names == [scenes.CLASSNAMES[i] for i in scenes.HELDOUT_IDS]
    t = np.asarray(encode_text(tiny_model, tokenize([f"{p} {n}" for n in names for p in ("a", "a photo of a")], 16)))
    w = np.stack([_unit(_unit(t[2 * c:2 * c + 2]).mean(0)) for c in range(len(names))]).T
    feats, labels = [], []
    for b in pipeline.make_eval_dataset(spec, "heldout", image_size=32, batch_size=30):
        feats.append(np.asarray(encode_image(tiny_model, b["image"]))[b["mask"]][:20])
        labels.append(b["label"][b["mask"]][:20])
    logits = 100 * _unit(np.concatenate(feats)) @ w
    labels = np.concatenate(labels)
    assert got["zeroshot/h/top1"] == pytest.approx(np.mean(logits.argmax(1) == labels), abs=1e-9)


def test_evaluators_with_sharded_variables(tiny_scenes, tiny_model):
    from clipjax import sharding as shd

    spec = f"dir:{tiny_scenes}"
    cfg = {"z": {"type": "zeroshot", "data": spec, "split": "test", "batch_size": 8},
           "r": {"type": "retrieval", "data": spec, "split": "test", "batch_size": 8}}
    evs = make_evaluators(cfg, TINY)
    mesh = shd.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    sharded = jax.device_put(tiny_model, shd.replicated(mesh))
    for name, ev in evs.items():
        plain, dist = ev.run(tiny_model), ev.run(sharded)
        assert plain.keys() == dist.keys()
        for k in plain:
            assert dist[k] == pytest.approx(plain[k], abs=1e-6), k
    r = evs["r"].run(tiny_model)
    assert {"retrieval/r/image_r1", "retrieval/r/text_r1", "retrieval/r/image_r10"} <= set(r)


def test_registry_errors():
    assert set(EVALUATORS) == {"zeroshot", "retrieval", "linear_probe"}
    with pytest.raises(ValueError, match=r"eval 'x': unknown type 'zero_shot'; valid types: \['linear_probe', "
                                         r"'retrieval', 'zeroshot'\]"):
        make_evaluators({"x": {"type": "zero_shot", "data": "scenes"}}, TINY)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['temlates'\]; valid keys: .*'templates'"):
        make_evaluators({"x": {"type": "zeroshot", "data": "scenes", "temlates": "simple"}}, TINY)
    with pytest.raises(ValueError, match="missing key 'data'"):
        make_evaluators({"x": {"type": "retrieval"}}, TINY)
    assert "train_split" in config_keys("linear_probe") and "templates" in config_keys("zeroshot")
    assert make_evaluators(None, TINY) == {}
