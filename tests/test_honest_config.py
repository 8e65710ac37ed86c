"""Honest configs and command lines: a resume that would change the training numbers is refused (or recorded when
asked for), a flag given twice (an unquoted shell pattern) is refused, wise_ft writes every alpha it is given, a
fine-tuning evaluation on its training images says so, and input that would fail late or run otherwise than written
is one `error:` line before anything is written."""

import io
import json
import logging
import pathlib
import subprocess
import sys

import pytest

from clipjax.configs.common import base_config
from clipjax.phases import make_phases
from clipjax.config_checks import ConfigError, check_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = f"--config={ROOT / 'configs' / 'demo.py'}:evals=0"


def _main(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "clipjax.main", *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def _one_error(out) -> str:
    """The single `error:` line of a refused command (status 2, nothing else on stderr but log lines)."""
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and out.stderr.strip().splitlines()[-1] == errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "FATAL" not in out.stderr
    return errors[0]


# ============================================================================================ late failures

def test_patch_dropout_on_a_resnet_is_refused_before_anything_is_written(tmp_path):
    out = _main(DEMO, f"--workdir={tmp_path / 'run'}", "--config.model.patch_dropout=0.5", "--config.total_steps=2",
                "--config.batch_size=8")
    assert "config.model.patch_dropout=0.5: patch dropout needs a ViT image tower" in _one_error(out)
    assert not (tmp_path / "run").exists()


def test_a_value_absl_cannot_parse_is_one_error_line(tmp_path):
    out = _main(DEMO, f"--workdir={tmp_path / 'run'}", "--config.batch_size=abc")
    assert "config.batch_size" in _one_error(out) and "abc" in _one_error(out)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("schedule,match", [
    ([{"steps": 2, "image_size": 32.7}], r"schedule\[0\]\.image_size=32.7: must be a positive integer"),
    ([{"steps": 2, "context_length": 8.5}], r"schedule\[0\]\.context_length=8.5: must be a positive integer"),
    ([{"steps": 2, "patch_dropout": True}], r"schedule\[0\]\.patch_dropout=True: must be a number"),
    ("steps=2", r"config.schedule='steps=2': must be a list of phases"),
    ([(2, 32)], r"config.schedule\[0\]=\(2, 32\): must be a dict"),
])
def test_a_schedule_that_would_run_otherwise_than_written_is_refused(schedule, match):
    with pytest.raises(ValueError, match=match):
        make_phases(schedule, 10, 64, 16, 0.0, 8)


def test_model_patch_dropout_needs_a_vit_in_the_phases_too():
    with pytest.raises(ValueError, match="config.model.patch_dropout=0.5: patch dropout needs a ViT"):
        make_phases((), 10, 64, 16, 0.5, None)


def test_a_boolean_mix_weight_is_refused():
    c = base_config()
    c.data.mix = {"scenes": True, "synthetic": 1.0}
    with pytest.raises(ConfigError, match="weights must be positive and finite numbers"):
        check_config(c)


def test_mix_weights_whose_sum_overflows_keep_their_ratio():
    from clipjax.data.sources import DatasetError, resolve_specs

    assert resolve_specs({"a": 1e308, "b": 1e308}) == (["a", "b"], [0.5, 0.5])
    assert resolve_specs({"a": 1e308, "b": 3e307})[1] == pytest.approx([1 / 1.3, 0.3 / 1.3])
    assert resolve_specs({"a": 1, "b": 3}) == (["a", "b"], [0.25, 0.75])  # ordinary weights: as before
    with pytest.raises(DatasetError, match="positive and finite, got .*not booleans"):
        resolve_specs({"a": True, "b": 1.0})


def test_a_mix_of_huge_weights_trains(tmp_path):
    """1e308 + 1e308 overflowed: numpy refused the mix's probabilities (a traceback) at the first batch."""
    from clipjax.data import pipeline
    from clipjax.data.tokenizer import get_tokenizer
    from conftest import colour_folder

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    mix = {str(colour_folder(tmp_path / "a")): 1e308, str(colour_folder(tmp_path / "b")): 1e308}
    it = pipeline.make_train_iterator(mix, tokenizer=get_tokenizer(None, 8, 49408), global_batch_size=4,
                                      image_size=16, context_length=8, seed=0, process_index=0, process_count=1,
                                      num_threads=1)
    try:
        assert next(it)["image"].shape[0] == 4
    finally:
        it.close()


def _tar(path, samples):
    from test_data_wds import _write_tar

    _write_tar(path, samples)


def _png() -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_caption_that_is_not_text_is_a_skipped_sample(tmp_path):
    """A .json caption that is a dict or a number was trained on as its str()."""
    from clipjax.data import ingest, wds

    assert ingest.sample_captions(None, json.dumps({"caption": {"en": "a cat"}}).encode()) == []
    assert ingest.sample_captions(None, json.dumps({"caption": ["a cat", 3]}).encode()) == ["a cat"]
    _tar(tmp_path / "0.tar", [("a", {"png": _png(), "json": json.dumps({"caption": {"en": "a cat"}}).encode()}),
                              ("b", {"png": _png(), "json": json.dumps({"caption": 42}).encode()}),
                              ("c", {"png": _png(), "json": json.dumps({"caption": "a red ball"}).encode()})])
    reader = wds.ShardReader(f"wds:{tmp_path}", [str(tmp_path / "0.tar")], seed=0, process_index=0)
    sample = next(reader)
    assert sample.captions == ["a red ball"] and reader.skipped == 2
    reader.close()


# ============================================================================================ command lines

def test_an_unquoted_brace_pattern_pasted_into_bash_is_refused(tmp_path):
    """`{1..3}` unquoted makes three --config arguments; absl kept the last and trained on it."""
    cmd = (f"{sys.executable} -m clipjax.main --config={ROOT / 'configs' / 'demo.py'}:evals=0,steps={{1..3}} "
           f"--workdir={tmp_path / 'run'}")
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, timeout=300)
    line = _one_error(out)
    assert line.startswith("error: --config is given 3 times") and "must be quoted" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,message", [
    (["--config.batch_size=8", "--config.batch_size=16"], "--config.batch_size is given 2 times"),
    (["--workdir=elsewhere"], "--workdir is given 2 times"),
    (["--config.data.train", "wds:/d/0.tar", "wds:/d/1.tar"], "unexpected argument(s) wds:/d/1.tar"),
])
def test_a_flag_given_twice_or_a_stray_argument_is_refused(argv, message, tmp_path):
    out = _main(DEMO, f"--workdir={tmp_path / 'run'}", *argv)
    assert _one_error(out).startswith(f"error: {message}")
    assert not (tmp_path / "run").exists()


def _ingest(cmd: str, tmp_path):
    return subprocess.run(["bash", "-c", f"{sys.executable} -m clipjax.data.ingest {cmd}"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)


def test_ingest_refuses_an_unquoted_source_pattern_and_repeated_flags(tmp_path):
    for i in range(3):
        _tar(tmp_path / f"{i:02d}.tar", [(f"k{i}", {"png": _png(), "txt": b"a red ball"})])
    out = _ingest(f"{tmp_path}/{{00..02}}.tar --output {tmp_path / 'out'}", tmp_path)
    assert "more than one source given" in _one_error(out) and "quote" in _one_error(out)
    out = _ingest(f"'{tmp_path}/{{00..02}}.tar' --output={tmp_path / 'a'} --output {tmp_path / 'b'}", tmp_path)
    assert _one_error(out).startswith("error: --output is given 2 times")
    out = _ingest(f"'{tmp_path}/{{00..02}}.tar' --out={tmp_path / 'a'} --shard-size=4 --shard-size 5", tmp_path)
    assert _one_error(out).startswith("error: --shard-size is given 2 times")  # abbreviations count as the option
    for name in ("out", "a", "b"):
        assert not (tmp_path / name).exists()
    out = _ingest(f"'{tmp_path}/{{00..02}}.tar' --output {tmp_path / 'out'} --quiet", tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]  # quoted: one source, three shards
    assert json.loads((tmp_path / "out" / "ingest_report.json").read_text())["train"]["records"] == 3


def test_readme_commands_reach_the_program_as_written(tmp_path):
    """Each command of the README, pasted into bash, gives the program the arguments it shows: a {a..b} or * pattern
    is quoted (the pod command gave --config 41 456 times)."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    checked = 0
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for cmd in re.split(r"&&|\|\|?|;", line):
                if not cmd.strip() or cmd.strip().startswith("#") or "$" in cmd or "`" in cmd:
                    continue
                words = shlex.split(cmd, comments=True)
                out = subprocess.run(["bash", "-c", 'f() { echo $#; }; f ' + cmd], capture_output=True, text=True,
                                     cwd=tmp_path, timeout=60)
                assert int(out.stdout) == len(words), f"README: {cmd.strip()!r} becomes {out.stdout.strip()} words"
                checked += 1
    assert checked > 10


# ============================================================================================ wise_ft

def test_wise_ft_alphas_with_out_writes_every_alpha(tmp_path, capsys):
    """The README's `--alphas 0,0.25,0.5,0.75,1 --out C` wrote the model at alpha 0.5 only, silently."""
    import jax
    import numpy as np

    import clipjax
    from clipjax import finetune, wise_ft
    from clipjax.export import numpy_variables
    from clipjax.interop.load import Pretrained

    zeroshot = ROOT / "tests" / "fixtures" / "hf_clip"
    a = clipjax.load(zeroshot)
    moved = jax.tree.map(lambda x: np.asarray(x, np.float32) + 1.0, numpy_variables(a))
    finetune.save_finetuned(tmp_path / "b", Pretrained(a.config, moved, "moved"))
    ends = ["--zeroshot", str(zeroshot), "--finetuned", str(tmp_path / "b")]
    out = tmp_path / "c"
    assert wise_ft.main([*ends, "--alphas", "0,0.25,1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["alpha_0", "alpha_0.25", "alpha_1"]
    for alpha in (0, 0.25, 1):
        model, _, meta = finetune.load_finetuned(out / f"alpha_{alpha:g}")
        assert meta["wise_ft"]["alpha"] == alpha
        got, want = jax.tree.leaves(numpy_variables(model)), jax.tree.leaves(numpy_variables(a))
        np.testing.assert_allclose(got[0], want[0] + alpha, rtol=1e-6, atol=1e-6)
    assert "alpha_0.25 (alpha 0.25)" in capsys.readouterr().out
    # refused before anything is written: both --alpha and --alphas, an alpha twice, an alpha directory that exists
    assert wise_ft.main([*ends, "--alpha", "0.3", "--alphas", "0,1", "--out", str(tmp_path / "d")]) == 2
    assert "give --alpha (the one model written to --out) or --alphas" in capsys.readouterr().err
    assert wise_ft.main([*ends, "--alphas", "0,0.0,1", "--out", str(tmp_path / "d")]) == 2
    assert "names an alpha twice" in capsys.readouterr().err
    assert wise_ft.main([*ends, "--alphas", "0.5,1", "--out", str(out)]) == 2
    assert "alpha_1 already holds a model" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (out / "alpha_0.5").exists()


# ============================================================================================ fine-tuning

def test_finetuning_says_when_its_evaluation_reads_the_training_images(tmp_path, caplog):
    """configs/finetune.py's data=FOLDER sets data.eval to the same ImageFolder: eval/top1 was training accuracy,
    reported as if held out."""
    import clipjax
    from clipjax.finetune import ClassifyTask, reads_training_records
    from conftest import colour_folder

    (tmp_path / "train").mkdir(), (tmp_path / "heldout").mkdir()
    train, heldout = colour_folder(tmp_path / "train"), colour_folder(tmp_path / "heldout")
    fixture = ROOT / "tests" / "fixtures" / "hf_clip"
    cfg = clipjax.load(fixture).config
    c = base_config()
    c.task, c.init_from, c.data.train, c.data.eval, c.data.tokenizer = "classify", str(fixture), str(train), "", "folded"
    c.data.eval = str(tmp_path / "train" / ".." / "train")  # the same folder, written otherwise
    with caplog.at_level(logging.WARNING, logger="clipjax.tasks"):
        ClassifyTask.from_config(c, cfg)
    assert "reads the training images (an ImageFolder has a single split): eval/top1" in caplog.text
    caplog.clear()
    c.data.eval = str(heldout)
    with caplog.at_level(logging.WARNING, logger="clipjax.tasks"):
        ClassifyTask.from_config(c, cfg)
    assert "training images" not in caplog.text
    (tmp_path / "ds").mkdir()
    assert reads_training_records(f"dir:{tmp_path / 'ds'}", "train", f"{tmp_path}/ds/", "train")
    assert not reads_training_records(f"dir:{tmp_path / 'ds'}", "train", f"{tmp_path}/ds/", "test")
    assert not reads_training_records("scenes", "train", "scenes", "test")
    assert reads_training_records("scenes", "train", "scenes", "train")


# ============================================================================================ resuming

@pytest.mark.slow  # two short training runs
def test_a_resume_that_changes_the_numbers_is_refused_or_recorded(tmp_path):
    """--config.batch_size=16, --config.model.dtype=bfloat16 or a new schedule on a workdir at step 2 resumed and
    rewrote config.json: no record of the first steps' settings remained."""
    run = tmp_path / "run"
    base = [DEMO, f"--workdir={run}", "--config.data.train=synthetic", "--config.batch_size=8"]
    first = _main(*base, "--config.total_steps=2", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = (run / "config.json").read_bytes()

    line = _one_error(_main(*base[:-1], "--config.batch_size=16", "--config.model.dtype=bfloat16",
                            "--config.total_steps=2"))
    assert "change the training numbers: batch_size 8 → 16; model.dtype \"float32\" → \"bfloat16\"" in line
    assert f"--config.init_from={run}" in line and "--config.allow_resume_changes=batch_size,model.dtype" in line
    line = _one_error(_main(*base, "--config.total_steps=4", "--config.schedule=[{'steps': 1, 'context_length': 8}]"))
    assert 'schedule [] → [{"steps": 1, "context_length": 8}]' in line and "total_steps" not in line
    assert (run / "config.json").read_bytes() == saved and not (run / "config_history.jsonl").exists()

    # a config.json of an older version, without keys added since, still resumes; keys that keep the numbers may
    # change, others only when named, and every change is recorded
    old = json.loads(saved)
    del old["config"]["allow_resume_changes"], old["config"]["data"]["shuffle_buffer"]
    (run / "config.json").write_text(json.dumps(old))
    out = _main(*base, "--config.total_steps=3", "--config.log_every=1", "--config.model.dtype=bfloat16",
                "--config.allow_resume_changes=model.dtype", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "config.total_steps 2 → 3 on resume: the learning rate follows the cosine decay to step 3" in out.stderr
    [row] = [json.loads(r) for r in (run / "config_history.jsonl").read_text().splitlines()]
    assert row["step"] == 2 and row["allowed"] == ["model.dtype"]
    assert row["changes"]["model.dtype"] == {"from": "float32", "to": "bfloat16"}
    assert row["changes"]["total_steps"] == {"from": 2, "to": 3} and "data.shuffle_buffer" not in row["changes"]
    assert json.loads((run / "config.json").read_text())["config"]["model"]["dtype"] == "bfloat16"
    steps = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3


def test_allow_resume_changes_names_known_keys():
    c = base_config()
    c.allow_resume_changes = "optimizer,model.dtype"
    check_config(c)
    c.allow_resume_changes = "batchsize"
    with pytest.raises(ConfigError, match="allow_resume_changes: unknown config key.* batchsize"):
        check_config(c)
