"""The synthetic source makes its batches on the devices: the same global batch on any mesh, born sharded, uint8
images normalised in the step exactly as `clipjax.preprocess` normalises on the host, NaN faults where images become
float, and a slow-pipeline delay paid off the loop thread."""

import time

import jax
import numpy as np
import pytest

from clipjax import sharding as shd
from clipjax.data.preprocess import normalize
from clipjax.data.synthetic import SyntheticIterator
from clipjax.step import prepare_images

KW = dict(global_batch_size=8, image_size=16, context_length=8, seed=3, vocab_size=64)


def first_batches(mesh, n=2, **extra):
    it = SyntheticIterator(**KW, mesh=mesh, **extra)
    return [jax.device_get(next(it)) for _ in range(n)], it


def test_same_global_batch_on_any_mesh_and_born_sharded():
    one, _ = first_batches(shd.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    mesh8 = shd.make_mesh({"data": 2, "fsdp": 4})
    eight, it = first_batches(mesh8)
    for a, b in zip(one, eight):
        for k in ("image", "text"):
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(one[0]["image"], one[1]["image"])  # a new batch each step
    batch = it.batch(0)
    assert batch["image"].dtype == np.uint8 and batch["image"].sharding == shd.batch_sharding(mesh8, 4)
    text = one[0]["text"]
    assert (text[:, 0] == 62).all() and (text.max(axis=1) == 63).all()  # start token, end token = the largest id
    ends = text.argmax(axis=1)
    assert all((row[e + 1:] == 0).all() and (row[1:e] < 62).all() for row, e in zip(text, ends))


def test_resume_continues_the_same_sequence():
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    (b0, b1, b2), it = first_batches(mesh, 3)
    again = SyntheticIterator(**KW, mesh=mesh)
    again.set_state({"position": 2})
    np.testing.assert_array_equal(jax.device_get(next(again))["image"], b2["image"])
    from clipjax.data.core import TrainData

    assert isinstance(again, TrainData) and again.skipped_by_source == {} and again.sources == []
    assert again.step_batch is None  # the loop feeds the step the batches next() yields


def test_images_are_normalised_on_device_like_the_host_and_nan_flags_poison_rows():
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    it = SyntheticIterator(**KW, mesh=mesh, nan_steps=(2,))
    b0, b1 = next(it), next(it)
    assert int(jax.device_get(b0["nan"]).max()) == 0 and int(jax.device_get(b1["nan"]).min()) == 1
    images = np.asarray(jax.jit(prepare_images)(b0))
    np.testing.assert_allclose(images, normalize(np.asarray(b0["image"])), atol=1e-6)
    assert np.isnan(np.asarray(jax.jit(prepare_images)(b1))).all()


def test_slow_pipeline_delay_is_paid_off_the_loop_thread():
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    it = SyntheticIterator(**KW, mesh=mesh, seconds_per_batch=0.2)
    try:
        next(it)
        time.sleep(0.5)  # the loop is busy: the next batches are made meanwhile
        t0 = time.perf_counter()
        b = next(it)
        assert time.perf_counter() - t0 < 0.1
        np.testing.assert_array_equal(jax.device_get(b["image"]), jax.device_get(it.batch(1)["image"]))
    finally:
        it.close()


def test_batch_not_divisible_by_the_batch_devices_is_an_error():
    with pytest.raises(ValueError, match="not divisible"):
        SyntheticIterator(**{**KW, "global_batch_size": 6}, mesh=shd.make_mesh({"data": 4}, devices=jax.devices()[:4]))


def test_the_train_step_makes_the_same_batches_from_its_step_number():
    """The trainer's synthetic batches are made inside the train step from the state's step (batch k feeds step
    k + 1): the same updates as feeding the iterator's own batches, on a sharded mesh, NaN faults included."""
    import optax

    from clipjax.models import CLIP, CLIPConfig, TextConfig, VisionConfig
    from clipjax.train import jit_train_step, make_train_state
    from configs.common import base_config

    cfg = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=16, layers=1, width=32, patch_size=8, head_width=16),
                     text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    config = base_config()
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    it = SyntheticIterator(**KW, mesh=mesh, nan_steps=(2,), on_step=True)
    assert next(it) == {} and it.position == 1  # the trainer's iterator only counts; the step makes the batch
    assert it.step_batch == it.make  # what the trainer's loop hands the step (clipjax.data.core.TrainData)
    model = CLIP(cfg)
    runs = []
    for own in (True, False):
        state, shardings, tx = make_train_state(model, lambda p: optax.sgd(0.1), 0, mesh)
        fields = {} if own else {"image": 4, "text": 2, "nan": 1}
        step = jit_train_step(model, tx, config, mesh, shardings, fields=fields,
                              make_batch=it.step_batch if own else None)
        losses = []
        for k in range(3):
            state, m = step(state, {} if own else it.batch(k))
            losses.append(float(m["loss"]))
        runs.append((losses, jax.device_get(state.params), int(m["counters"][1])))
    (own_losses, own_params, own_total), (fed_losses, fed_params, fed_total) = runs
    assert np.isnan(own_losses[1]) and own_total == fed_total == 1  # step 2's images were poisoned
    np.testing.assert_allclose(own_losses, fed_losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(own_params), jax.tree.leaves(fed_params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
