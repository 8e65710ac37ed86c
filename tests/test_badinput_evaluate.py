"""Evaluation never scores a model whose features are NaN or Inf (a NaN model used to get a perfect Recall@1): the
evaluators raise NonFiniteFeaturesError (a ValueError) naming the eval, the data and how many rows were non-finite,
and `python -m clipjax.evaluate` prints it as one `error:` line with exit status 2. Also: the linear probe refuses
to test on its training data, and `--help` states the default split rule that the code applies."""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from clipjax.data import ingest, scenes
from clipjax.evaluate.__main__ import main, parse_args
from clipjax.evaluate.features import NonFiniteFeaturesError
from clipjax.evaluate.linear_probe import LinearProbeEvaluator, linear_probe
from clipjax.evaluate.retrieval import RetrievalEvaluator, recall_at_k
from clipjax.evaluate.zeroshot import ClassifierCache, ZeroShotEvaluator, build_classifier
from clipjax.models import CLIP, CLIPConfig, TextConfig, VisionConfig

HF = pathlib.Path(__file__).parent / "fixtures" / "hf_clip"
TINY = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
                  text=TextConfig(context_length=16, width=32, heads=2, layers=1))
from conftest import COLOURS, colour_folder  # noqa: E402


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    path = scenes.build_scenes(tmp_path_factory.mktemp("scenes") / "ds", num_train=40, num_test=16, num_heldout=20,
                               workers=0, progress=False)
    return f"dir:{path}"


@pytest.fixture(scope="module")
def tiny_model():
    return jax.jit(CLIP(TINY).init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return colour_folder(tmp_path_factory.mktemp("imagefolder"), COLOURS)


def _poison(variables, tower: str, value=np.nan):
    """`variables` with every leaf of `tower` ("visual", "text" or "" for all) set to `value`."""
    def fill(path, x):
        return jnp.full_like(x, value) if tower in jax.tree_util.keystr(path) else x

    return jax.tree_util.tree_map_with_path(fill, variables)


def _message(err) -> str:
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message, message
    return message


# ============================================================================================ metric functions

def test_recall_of_nan_features_is_an_error_not_a_perfect_score():
    nan = np.full((4, 8), np.nan, np.float32)
    with pytest.raises(NonFiniteFeaturesError) as err:
        recall_at_k(nan, nan, [0, 1, 2, 3])
    assert "image features: 4 of 4 images hold NaN or Inf" in _message(err)
    img = np.eye(4, 8, dtype=np.float32)
    img[2, 0] = np.inf
    with pytest.raises(NonFiniteFeaturesError, match="image features: 1 of 4 images"):
        recall_at_k(img, np.eye(4, 8, dtype=np.float32), [0, 1, 2, 3])
    txt = np.eye(4, 8, dtype=np.float32)
    txt[[0, 3], 1] = np.nan
    with pytest.raises(NonFiniteFeaturesError, match="text features: 2 of 4 texts"):
        recall_at_k(np.eye(4, 8, dtype=np.float32), txt, [0, 1, 2, 3])


def test_classifier_and_linear_probe_functions_refuse_nan():
    def encode(tokens):  # class "b" (the second half of the prompt rows) embeds to NaN
        out = np.ones((len(tokens), 4), np.float32)
        out[tokens[:, 0] == 2] = np.nan
        return out

    def tokenize(texts):
        return np.asarray([[1 if t.startswith("a") else 2] for t in texts], np.int32)

    with pytest.raises(NonFiniteFeaturesError) as err:
        build_classifier(encode, tokenize, ["a", "b", "c"], ["{}", "{}!"])
    assert "zero-shot classifier (prompt features): 2 of 3 classes" in _message(err)
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    y = np.arange(10) % 2
    bad = x.copy()
    bad[3] = np.nan
    with pytest.raises(NonFiniteFeaturesError, match="training features: 1 of 10 examples"):
        linear_probe(bad, y, x, y)


# ============================================================================================ evaluators

def test_zeroshot_of_a_nan_image_tower_names_the_eval_and_the_data(tiny_scenes, tiny_model):
    ev = ZeroShotEvaluator("heldout", TINY, data=tiny_scenes, split="heldout", templates=["a {}"], batch_size=8,
                           max_examples=12)
    with pytest.raises(NonFiniteFeaturesError) as err:
        ev.run(_poison(tiny_model, "visual"))
    message = _message(err)
    assert message.startswith(f"eval 'heldout' on {tiny_scenes!r} split 'heldout': ")
    assert "image features: 12 of 12 images hold NaN or Inf" in message
    with pytest.raises(NonFiniteFeaturesError, match="12 of 12 images"):
        ev.run(_poison(tiny_model, "visual", np.inf))
    top1 = ev.run(tiny_model)["zeroshot/heldout/top1"]  # the same evaluator still scores a finite model
    assert 0.0 <= top1 <= 1.0


def test_a_nan_classifier_is_refused_and_never_cached(tiny_scenes, tiny_model, tmp_path):
    ev = ZeroShotEvaluator("zs", TINY, data=tiny_scenes, split="test", templates=["a {}"], batch_size=8,
                           max_examples=8, cache=ClassifierCache(tmp_path), model_key="poisoned@1")
    with pytest.raises(NonFiniteFeaturesError) as err:
        ev.run(_poison(tiny_model, "text"))
    classes = len(ev.classnames)
    assert f"zero-shot classifier (prompt features): {classes} of {classes} classes" in _message(err)
    assert "eval 'zs'" in str(err.value) and not list(tmp_path.glob("classifier-*"))


def test_retrieval_and_linear_probe_of_a_nan_model(tiny_scenes, tiny_model):
    retrieval = RetrievalEvaluator("r", TINY, data=tiny_scenes, split="test", batch_size=8, max_examples=8)
    with pytest.raises(NonFiniteFeaturesError, match=r"eval 'r' on .* split 'test': image features: 8 of 8"):
        retrieval.run(_poison(tiny_model, ""))
    with pytest.raises(NonFiniteFeaturesError, match=r"caption features: \d+ of \d+ captions"):
        retrieval.run(_poison(tiny_model, "text"))
    probe = LinearProbeEvaluator("lp", TINY, data=tiny_scenes, split="test", train_split="train", batch_size=8,
                                 max_examples=8, max_train_examples=16)
    with pytest.raises(NonFiniteFeaturesError, match=r"eval 'lp' on .* split 'train': image features: 16 of 16"):
        probe.run(_poison(tiny_model, "visual"))


def test_linear_probe_refuses_to_test_on_its_training_data(tiny_scenes, folder):
    with pytest.raises(ValueError, match="test split must differ from the training split 'train'"):
        LinearProbeEvaluator("lp", TINY, data=tiny_scenes, split="train", batch_size=8)
    with pytest.raises(ValueError, match="an ImageFolder has no splits to fit on one and test on another"):
        LinearProbeEvaluator("lp", TINY, data=str(folder), split="test", batch_size=8)


# ============================================================================================ command line

def _nan_copy(directory: pathlib.Path, tensor: str) -> pathlib.Path:
    """A copy of the Hugging Face fixture whose `tensor` is NaN."""
    shutil.copytree(HF, directory)
    state = load_file(directory / "model.safetensors")
    state[tensor] = np.full_like(state[tensor], np.nan)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("task, tensor, needle", [
    ("zeroshot", "visual_projection.weight", "image features: 6 of 6 images"),
    ("zeroshot", "text_projection.weight", "zero-shot classifier (prompt features): 3 of 3 classes"),
    ("retrieval", "visual_projection.weight", "image features: 6 of 6 images"),
])
def test_cli_prints_one_line_and_exits_2_for_a_nan_model(folder, tmp_path, capsys, task, tensor, needle):
    model = _nan_copy(tmp_path / "nan_model", tensor)
    code = main(["--model", str(model), "--task", task, "--data", str(folder), "--tokenizer", "folded",
                 "--templates", "single", "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "res.json")])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()  # the progress bar, then the error
    errors = [line for line in err if "error:" in line]
    assert code == 2 and errors == err[-1:] and err[-1].startswith(f"error: model {model}: eval '{task}' on "), err
    assert needle in err[-1] and "NaN or Inf" in err[-1]
    assert not (tmp_path / "res.json").exists() and captured.out == ""


def test_help_states_the_default_split_rule_the_code_applies(folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the first of test, validation, val, train" in text and "evaluated on train" in text
    ingest.ingest(folder, tmp_path / "only_train", workers=0, progress=False)  # a dataset with a train split only
    code = main(["--model", str(HF), "--task", "retrieval", "--data", str(tmp_path / "only_train"),
                 "--tokenizer", "folded", "--batch-size", "4"])
    assert code == 0
    assert '"split": "train"' in capsys.readouterr().out
