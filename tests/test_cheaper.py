"""Cheaper pretraining: FLIP patch dropout and lower-resolution / shorter-text phases. The model is unchanged without
them, resized position embeddings equal PIL's antialiased bicubic resize (what open_clip's resize_pos_embed does),
patch dropout keeps the class token and a random subset per image, and a run with phases resumes exactly at any
step, also across a phase boundary."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from clipjax.configs.common import base_config
from clipjax.models import CLIP, get_model_config
from clipjax.models.vit import drop_patches, resize_positions
from clipjax.train import train

CFG = get_model_config("ViT-T-demo")  # 64 px, patch 8, width 128


def _init(cfg=CFG):
    s = cfg.vision.image_size
    return CLIP(cfg).init(jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1, cfg.text.context_length), jnp.int32))


@pytest.mark.parametrize("full,grid", [(8, 4), (7, 5), (16, 12), (4, 8)])
def test_resized_positions_equal_pil_antialiased_bicubic(full, grid):
    pos = np.random.default_rng(full * grid).normal(size=(1 + full * full, 5)).astype(np.float32)
    out = np.asarray(resize_positions(jnp.asarray(pos), full, grid))
    ref = np.stack([np.asarray(Image.fromarray(pos[1:, c].reshape(full, full), mode="F")
                               .resize((grid, grid), Image.BICUBIC)) for c in range(5)], -1)
    np.testing.assert_allclose(out[1:], ref.reshape(grid * grid, 5), atol=1e-6)
    np.testing.assert_array_equal(out[0], pos[0])  # the class position is kept


def test_drop_patches_keeps_class_token_and_a_random_subset_per_image():
    x = jnp.arange(2 * 9 * 1, dtype=jnp.float32).reshape(2, 9, 1)  # class token + 8 patches, values = ids
    out = np.asarray(drop_patches(x, 0.5, jax.random.key(0)))
    assert out.shape == (2, 5, 1)
    np.testing.assert_array_equal(out[:, 0, 0], [0, 9])
    kept = [set(out[b, 1:, 0].tolist()) for b in range(2)]
    assert all(len(k) == 4 for k in kept) and kept[0] <= set(range(1, 9)) and kept[1] <= set(range(10, 18))
    assert kept[0] != {v - 9 for v in kept[1]}  # a different choice for each image
    np.testing.assert_array_equal(out, np.asarray(drop_patches(x, 0.5, jax.random.key(0))))  # deterministic
    assert drop_patches(x, 0.99, jax.random.key(1)).shape == (2, 2, 1)  # at least one patch


def test_patch_dropout_only_in_training_and_lower_resolution_runs():
    variables = _init()
    model = CLIP(CFG)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    plain = model.apply(variables, images, method=CLIP.encode_image)
    same = model.apply(variables, images, False, 0.5, method=CLIP.encode_image, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(plain, same)  # eval: no dropout whatever the rate
    dropped = model.apply(variables, images, True, 0.5, method=CLIP.encode_image, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(plain, dropped)
    small = model.apply(variables, images[:, :32, :32], method=CLIP.encode_image)
    assert small.shape == plain.shape and np.isfinite(np.asarray(small)).all()
    with pytest.raises(ValueError, match="smaller squares, a multiple of the patch size 8"):
        model.apply(variables, images[:, :36, :36], method=CLIP.encode_image)


def _config(total, schedule, ckpt_every=2):
    c = base_config()
    c.model.name = "ViT-T-demo"
    c.batch_size, c.total_steps, c.warmup_steps, c.lr = 8, total, 1, 1e-3
    c.log_every, c.ckpt_every, c.keep_checkpoints, c.async_checkpoints = 1, ckpt_every, 10, False
    c.data.train = "synthetic"
    c.schedule = schedule
    return c


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_a_run_with_phases_resumes_exactly_across_the_boundary(tmp_path):
    schedule = [{"steps": 3, "image_size": 32, "context_length": 16, "patch_dropout": 0.5}]
    ref = tmp_path / "ref"
    train(_config(6, schedule), str(ref))
    expected = _losses(ref)
    assert len(expected) == 6 and len(set(expected.values())) == 6
    for keep in (2, 4):  # inside the first phase; after the boundary at step 3
        run = tmp_path / f"from{keep}"
        shutil.copytree(ref, run, ignore=shutil.ignore_patterns("tensorboard"))
        for step_dir in (run / "checkpoints").iterdir():
            if step_dir.name.isdigit() and int(step_dir.name) > keep:
                shutil.rmtree(step_dir)
        train(_config(6, schedule), str(run))
        assert _losses(run) == expected, keep
    # the phase changes the numbers: the same run without it differs from step 1
    plain = tmp_path / "plain"
    train(_config(2, []), str(plain))
    assert _losses(plain)[1] != expected[1]
