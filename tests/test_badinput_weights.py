"""Unreadable weights (random bytes, empty or truncated files, directories of no known layout, broken configs) are
one-line errors naming the file — `clipjax.load` raises WeightsError (a ValueError), and `python -m clipjax.export`
/ `python -m clipjax.evaluate` print one `error:` line and exit with status 2 instead of a traceback."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

import clipjax
from clipjax import export
from clipjax.evaluate.__main__ import main as evaluate_main
from clipjax.interop.load import WeightsError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
OPENCLIP_VIT = FIXTURES / "openclip_vit"


def _random_bytes(path: pathlib.Path, n: int = 300) -> pathlib.Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


def _truncated(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _bad_weight_files(tmp_path: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """(path, fragment of the expected message) for weight files that cannot be read."""
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "empty.pt").write_bytes(b"")
    return [
        (_random_bytes(tmp_path / "random.safetensors"), "not a readable safetensors file"),
        (_random_bytes(tmp_path / "random.pt"), "not a PyTorch checkpoint"),
        (tmp_path / "empty.safetensors", "empty file"),
        (tmp_path / "empty.pt", "empty file"),
        (_truncated(OPENCLIP_VIT / "model.safetensors", tmp_path / "cut.safetensors"),
         "not a readable safetensors file"),
        (_truncated(FIXTURES / "torch_pickle" / "state_dict.pt", tmp_path / "cut.pt"), ""),
        (_random_bytes(tmp_path / "weights.npz"), "unsupported weight file"),
    ]


def _bad_directories(tmp_path: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """(directory, fragment of the expected message) of directories `clipjax.load` cannot read."""
    plain = tmp_path / "plain_dir"
    plain.mkdir()
    (plain / "notes.txt").write_text("no weights here")
    broken_json = tmp_path / "broken_hf"
    shutil.copytree(FIXTURES / "hf_clip", broken_json)
    (broken_json / "config.json").write_text("{not json")
    wrong_type = tmp_path / "wrong_hf"
    shutil.copytree(FIXTURES / "hf_clip", wrong_type)
    (wrong_type / "config.json").write_text(json.dumps({"text_config": "small", "vision_config": []}))
    no_config = tmp_path / "workdir_without_config"
    (no_config / "checkpoints").mkdir(parents=True)
    no_model = tmp_path / "workdir_without_model_config"
    (no_model / "checkpoints").mkdir(parents=True)
    (no_model / "config.json").write_text(json.dumps({"config": {}}))
    return [
        (plain, "a directory must be a Hugging Face CLIPModel"),
        (broken_json / "config.json", "not a JSON file"),
        (wrong_type / "config.json", "not a Hugging Face CLIPConfig"),
        (no_config / "config.json", "no such file"),
        (no_model / "config.json", "no 'model_config'"),
    ]


def _assert_one_line(err, path: pathlib.Path, fragment: str) -> None:
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message, message
    assert str(path) in message and fragment in message, message


def test_unreadable_weight_files_are_a_one_line_weights_error(tmp_path):
    for path, fragment in _bad_weight_files(tmp_path):
        config = None if path.suffix == ".pt" else OPENCLIP_VIT / "open_clip_config.json"
        with pytest.raises(ValueError) as err:
            clipjax.load(path, config)
        _assert_one_line(err, path, fragment)
        if fragment and path.suffix != ".pt":
            assert isinstance(err.value, WeightsError), err.value


def test_directories_of_no_known_layout_are_a_one_line_weights_error(tmp_path):
    for path, fragment in _bad_directories(tmp_path):
        directory = path if path.is_dir() else path.parent
        with pytest.raises(WeightsError) as err:
            clipjax.load(directory)
        _assert_one_line(err, path, fragment)


def test_tensors_of_impossible_rank_name_the_file(tmp_path):
    """An OpenAI-layout state dict whose patch kernel is 0-d: the architecture inferred for a config-less .pt
    cannot be read from it (an IndexError inside the inference before)."""
    from safetensors.numpy import load_file

    from clipjax.interop.load import _infer_config

    state = load_file(OPENCLIP_VIT / "model.safetensors")
    state["visual.conv1.weight"] = np.zeros((), np.float32)
    with pytest.raises(WeightsError) as err:
        _infer_config(state, str(tmp_path / "odd.pt"))
    _assert_one_line(err, tmp_path / "odd.pt", "not those of an OpenAI/open_clip CLIP")


@pytest.mark.parametrize("cli", ["export", "evaluate"])
def test_cli_reports_unreadable_weights_in_one_line(tmp_path, capsys, cli):
    for path, fragment in _bad_weight_files(tmp_path) + _bad_directories(tmp_path):
        model = path if path.suffix in (".safetensors", ".pt", ".npz") else (path if path.is_dir() else path.parent)
        config = ["--config", str(OPENCLIP_VIT / "open_clip_config.json")] if model.suffix == ".safetensors" else []
        if cli == "export":
            code = export.main(["--model", str(model), *config, "--format", "open_clip",
                                "--out", str(tmp_path / f"out_{model.name}")])
            assert not (tmp_path / f"out_{model.name}").exists()
        else:
            code = evaluate_main(["--model", str(model), *config, "--task", "retrieval", "--data", "scenes"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (model, err)
        assert str(path) in err[0] and fragment in err[0], err[0]
    assert os.listdir(tmp_path)  # the inputs are still there
