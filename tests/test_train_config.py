"""What the trainer checks before it runs: numbers that cannot work are one error naming the key, a warm-up that does
not fit a short run is clipped with a warning, a batch larger than the data is warned about, a workdir of another
architecture is refused before anything is written, and re-logged steps never duplicate metrics rows."""

import json
import logging
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from clipjax.configs.common import base_config
from clipjax.metrics import MetricWriter
from clipjax.models.specs import get_model_config
from clipjax.train import ConfigError, _warn_small_dataset, check_config, model_config
from clipjax.workdir import check_same_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("key,value", [("total_steps", 0), ("total_steps", -5), ("batch_size", 0),
                                       ("accum_steps", 0), ("log_every", 0), ("ckpt_every", -1)])
def test_non_positive_counts_are_config_errors_naming_the_key(key, value):
    c = base_config()
    c[key] = value
    with pytest.raises(ConfigError, match=rf"config\.{key}={value}: must be a positive integer"):
        check_config(c)


@pytest.mark.parametrize("key,value,rule", [
    ("seed", -1, "must be a non-negative integer"),  # numpy's generators refuse it, deep in the data thread
    ("keep_checkpoints", 0, "must be a positive integer"),  # kept no checkpoint at all
    ("lr", -1e-3, "must be a finite number ≥ 0"),  # gradient ascent
    ("lr", float("nan"), "must be a finite number ≥ 0"),
    ("optimizer.weight_decay", -0.1, "must be a finite number ≥ 0"),
    ("optimizer.b2", 1.5, r"must be in \[0, 1\)"),
    ("optimizer.eps", 0.0, "must be a finite number > 0"),
    ("optimizer.grad_clip_norm", -1.0, r"must be a finite number ≥ 0 \(0: no clipping\)"),
    ("model.patch_dropout", 1.0, r"must be in \[0, 1\)"),
    ("model.init_logit_bias", float("nan"), "must be a finite number"),  # trained, then refused to checkpoint
    ("model.init_logit_scale", float("inf"), "must be a finite number"),
    ("data.num_threads", 0, "must be a positive integer"),
    ("data.workers", -1, "must be a non-negative integer"),
    ("data.crop_scale", (0.0, 1.0), r"must be \(MIN, MAX\) with 0 < MIN <= MAX <= 1"),  # every crop failed
    ("data.crop_scale", (0.9, 0.5), r"must be \(MIN, MAX\) with 0 < MIN <= MAX <= 1"),
])
def test_numbers_that_would_run_wrongly_are_config_errors_naming_the_key(key, value, rule):
    c = ml_collections.ConfigDict(base_config().to_dict(), type_safe=False)
    node, last = c, key.split(".")[-1]
    for part in key.split(".")[:-1]:
        node = node[part]
    node[last] = value
    with pytest.raises(ConfigError, match=rf"^config\.{re.escape(key)}={re.escape(repr(value))}: {rule}"):
        check_config(c)


def test_a_zero_grad_clip_norm_means_no_clipping():
    import jax.numpy as jnp

    from clipjax.train import make_tx

    c = base_config()
    c.lr, c.warmup_steps, c.optimizer.weight_decay = 1.0, 0, 0.0
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.array([30.0, 40.0, 0.0])}  # norm 50
    updates = {}
    for clip in (1.0, 0.0):
        c.optimizer.grad_clip_norm = clip
        tx = make_tx(check_config(c), params)
        updates[clip], _ = tx.update(grads, tx.init(params), params)
    # a clip at norm 0 would zero every gradient, hence every update
    assert float(jnp.abs(updates[0.0]["w"]).sum()) > 0 and float(jnp.abs(updates[1.0]["w"]).sum()) > 0


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_shuffle_buffer_must_be_a_positive_integer(value):
    from clipjax.data import wds

    c = base_config()
    assert c.data.shuffle_buffer == wds.DEFAULT_SHUFFLE_BUFFER
    assert check_config(c).data.shuffle_buffer == wds.DEFAULT_SHUFFLE_BUFFER
    c = ml_collections.ConfigDict(c.to_dict(), type_safe=False)
    c.data.shuffle_buffer = value
    with pytest.raises(ConfigError, match=rf"^config\.data\.shuffle_buffer={value!r}: must be a positive integer") as e:
        check_config(c)
    assert "\n" not in str(e.value) and "wds:" in str(e.value)


def test_shuffle_buffer_reaches_the_wds_stream(tmp_path):
    """`data.shuffle_buffer` is the buffer of a wds: stream, alone or in a mix."""
    import io
    import tarfile

    import jax
    from PIL import Image

    from clipjax.models.specs import get_model_config
    from clipjax.sharding import make_mesh
    from clipjax.train import make_data

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    with tarfile.open(tmp_path / "0.tar", "w") as tar:
        for name, data in [("a.png", buf.getvalue()), ("a.txt", b"a caption")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    c = base_config()
    c.batch_size, c.data.shuffle_buffer = 2, 7
    c.data.train = f"wds:{tmp_path}"
    cfg, mesh = get_model_config("ViT-T-demo"), make_mesh(c.mesh.to_dict(), jax.devices())
    assert make_data(c, cfg, 0, mesh).shuffle_buffer == 7
    c.data.mix = {f"wds:{tmp_path}": 1.0, f"wds:{tmp_path}/0.tar": 3.0}  # keys with dots: kept as pairs
    checked = check_config(c)
    assert checked.data.mix == ((f"wds:{tmp_path}", 1.0), (f"wds:{tmp_path}/0.tar", 3.0))
    it = make_data(checked, cfg, 0, mesh)
    assert [m.shuffle_buffer for m in it.streams.values()] == [7, 7] and it.get_state()["shuffle_buffer"] == 7
    assert list(it.weights) == [0.25, 0.75] and len(next(it)["image"]) == 2
    it.close()
    c.data.mix = ((f"wds:{tmp_path}", 1.0), (f"wds:{tmp_path}", 2.0))
    with pytest.raises(ConfigError, match=r"^config\.data\.mix=.*each spec once"):
        check_config(c)
    for weight in (0.0, -1.0, float("nan"), float("inf"), "1"):
        c.data.mix = ((f"wds:{tmp_path}", 1.0), ("scenes", weight))
        with pytest.raises(ConfigError, match=r"^config\.data\.mix: weights must be positive and finite numbers, "
                                              r"got \[\('scenes', "):
            check_config(c)


def test_unknown_task_is_an_error():
    c = base_config()
    c.task = "caption"
    with pytest.raises(ConfigError, match="config.task='caption'; valid: contrastive, classify"):
        check_config(c)


def test_a_model_name_beside_an_open_clip_config_is_a_label_unless_it_names_an_architecture():
    """configs/demo.py sets model.open_clip_config; `--config.model.name=ViT-B-32` on it used to train the demo model
    silently. A name that is an architecture is refused, a label is kept, and clearing the JSON config trains the
    named model."""
    from clipjax.configs.demo import get_config

    c = get_config()
    demo = model_config(c)
    c.model.name = "my-demo"
    assert model_config(c) == demo
    c.model.name = "ViT-B-32"
    with pytest.raises(ConfigError, match=r"^config\.model\.name='ViT-B-32' names an architecture, .*"
                                          r"--config\.model\.open_clip_config=\{\} to train ViT-B-32"):
        model_config(c)
    c.model.open_clip_config = ml_collections.ConfigDict()
    assert model_config(c).vision == get_model_config("ViT-B-32").vision


def test_warmup_longer_than_the_run_is_clipped_with_a_warning(caplog):
    c = base_config()
    c.total_steps, c.warmup_steps = 5, 50
    with caplog.at_level(logging.WARNING):
        checked = check_config(c)
    assert checked.warmup_steps == 0 and c.warmup_steps == 50  # a copy: the caller's config is unchanged
    assert "config.warmup_steps=50 does not fit config.total_steps=5: warm-up clipped to 0 steps" in caplog.text
    c.total_steps, c.warmup_steps = 100, 200
    assert check_config(c).warmup_steps == 10
    c.warmup_steps = 99
    assert check_config(c).warmup_steps == 99  # fits: untouched


def test_batch_larger_than_the_data_is_warned_about(caplog):
    class Data:
        sources = [range(30), range(20)]

    with caplog.at_level(logging.WARNING):
        _warn_small_dataset(Data(), 64)
    assert "config.batch_size=64 is larger than the training data (50 records)" in caplog.text
    caplog.clear()
    _warn_small_dataset(Data(), 50)
    assert not caplog.text


def test_workdir_of_another_architecture_is_refused(tmp_path):
    vit, rn = get_model_config("ViT-T-demo"), get_model_config("RN-T-demo")
    (tmp_path / "config.json").write_text(json.dumps({"config": {}, "model_config": vit.to_dict()}))
    check_same_model(tmp_path, vit.replace(dtype="bfloat16", remat="full"))  # numerics may change
    with pytest.raises(ConfigError, match="holds checkpoints of another model .*vision.layers"):
        check_same_model(tmp_path, rn)


def test_truncate_after_drops_the_rows_a_resumed_run_writes_again(tmp_path):
    w = MetricWriter(tmp_path)
    for step in (0, 1, 2, 3, 4):
        w.write(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a torn last line of a killed run
    assert w.truncate_after(2) == 3
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert w.truncate_after(0) == 3  # starting over: step 0 (e.g. the zero-shot head's evaluation) goes too
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    w.close()


def test_cli_short_run_of_the_demo_recipe_and_bad_counts(tmp_path):
    """`--config.total_steps=5` on configs/demo.py runs (warm-up clipped); batch size 0 is one error line."""
    base = [sys.executable, "-m", "clipjax.main", f"--config={ROOT / 'configs' / 'demo.py'}:evals=0",
            "--config.data.train=synthetic"]
    bad = subprocess.run([*base, f"--workdir={tmp_path / 'bad'}", "--config.batch_size=0"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == \
        ["error: config.batch_size=0: must be a positive integer"]  # one line: not even JAX's TPU probe on a CPU
    assert not (tmp_path / "bad").exists()  # nothing written
    ok = subprocess.run([*base, f"--workdir={tmp_path / 'ok'}", "--config.total_steps=2", "--config.batch_size=8"],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "warm-up clipped to 0 steps" in ok.stderr and "compiling the train step" in ok.stderr
    assert "libtpu" not in ok.stderr
    assert f"done: step 2 of 2 in {tmp_path / 'ok'} (checkpoints/, metrics.jsonl, tensorboard/" in ok.stderr


def test_main_help_exits_zero():
    out = subprocess.run([sys.executable, "-m", "clipjax.main", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "--workdir" in out.stdout + out.stderr


@pytest.mark.parametrize("flags,message", [
    (["--num_processes=2"], "--num_processes and --process_id need --coordinator=host:port"),  # was ignored
    (["--coordinator=localhost:1", "--num_processes=2", "--process_id=5"], "--process_id=5: must be in [0, 2)"),
    (["--coordinator=localhost:1", "--num_processes=0", "--process_id=0"], "--num_processes=0: must be a positive"),
    (["--local_device_count=0"], "--local_device_count=0: must be a positive integer"),  # was ignored
])
def test_launch_flags_that_do_not_fit_together_are_one_line(flags, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "clipjax.main", f"--config={ROOT / 'configs' / 'demo.py'}",
                          f"--workdir={tmp_path / 'run'}", *flags], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1 and err[0].startswith(f"error: {message}"), out.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", ["vit_b32", "vit_b16", "vit_l14", "rn50"])
def test_pod_recipes_name_their_data_explicitly(recipe):
    from clipjax.configs import rn50, vit_b16, vit_b32, vit_l14  # noqa: F401

    module = sys.modules[f"clipjax.configs.{recipe}"]
    assert module.get_config().data.train == ""
    assert module.get_config("data=dir:/data/laion").data.train == "dir:/data/laion"
    assert module.get_config("runlocal").data.train == "synthetic"


def test_a_pod_recipe_without_data_stops_with_one_line_and_writes_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "clipjax.main", f"--config={ROOT / 'configs' / 'vit_b32.py'}",
                          f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: config.data.train is empty: name the training data")
    assert not (tmp_path / "run").exists()
