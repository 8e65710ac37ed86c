"""Training phases (`config.schedule`): the spans they cover, their errors, and the input position carried from one
phase's iterator to the next."""

import pytest

from clipjax.phases import Phase, PhasedData, make_phases, phase_at


def test_phases_cover_the_run_and_default_to_the_model():
    ph = make_phases([{"steps": 3, "image_size": 32, "patch_dropout": 0.5}, {"steps": 2, "context_length": 8}],
                     10, 64, 16, 0.0, 8)
    assert ph == [Phase(0, 3, 32, 16, 0.5), Phase(3, 5, 64, 8, 0.0), Phase(5, 10, 64, 16, 0.0)]
    assert [phase_at(ph, s).start for s in (0, 2, 3, 4, 5, 9)] == [0, 0, 3, 3, 5, 5]
    assert make_phases((), 10, 64, 16, 0.25, 8) == [Phase(0, 10, 64, 16, 0.25)]
    assert make_phases([{"steps": 10}], 10, 64, 16, 0.0, 8) == [Phase(0, 10, 64, 16, 0.0)]  # no full-size tail


@pytest.mark.parametrize("schedule,match", [
    ([{"steps": 0}], r"schedule\[0\]\.steps=0: must be a positive integer"),
    ([{"steps": 2, "size": 32}], r"unknown key\(s\) \['size'\]"),
    ([{"steps": 2, "image_size": 36}], r"image_size=36: must be ≤ the model's 64 and a multiple of its patch size 8"),
    ([{"steps": 2, "image_size": 128}], r"image_size=128"),
    ([{"steps": 2, "context_length": 32}], r"context_length=32: must be in \[3, 16\]"),
    ([{"steps": 2, "patch_dropout": 1.0}], r"patch_dropout=1.0: must be in \[0, 1\)"),
    ([{"steps": 6}, {"steps": 6}], r"take 12 steps, more than config.total_steps=10"),
])
def test_bad_phases_name_the_phase_and_key(schedule, match):
    with pytest.raises(ValueError, match=match):
        make_phases(schedule, 10, 64, 16, 0.0, 8)


def test_patch_dropout_needs_a_vit():
    with pytest.raises(ValueError, match="patch dropout needs a ViT image tower"):
        make_phases([{"steps": 2, "patch_dropout": 0.5}], 10, 64, 16, 0.0, None)


def _synthetic(phase):
    import jax

    from clipjax import sharding as shd
    from clipjax.data.synthetic import SyntheticIterator

    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    return SyntheticIterator(global_batch_size=4, image_size=phase.image_size, context_length=phase.context_length,
                             seed=0, mesh=mesh, vocab_size=64)


def test_phased_data_carries_the_position_across_a_boundary_and_on_resume():
    import numpy as np

    ph = make_phases([{"steps": 2, "image_size": 8, "context_length": 4}], 5, 16, 8, 0.0, 8)
    data = PhasedData(_synthetic, ph)
    shapes, batches = [], []
    for step in range(5):
        data.at(step)
        b = next(data)
        shapes.append((b["image"].shape[1], b["text"].shape[1]))
        batches.append(np.asarray(b["image"]))
    assert shapes == [(8, 4), (8, 4), (16, 8), (16, 8), (16, 8)]
    full = _synthetic(ph[-1])
    np.testing.assert_array_equal(batches[3], np.asarray(full.batch(3)["image"]))  # batch 3 of the sequence
    resumed = PhasedData(_synthetic, ph)  # a run restored at step 3: the saved position, at the phase's size
    resumed.at(0)
    resumed.at(3)
    resumed.set_state({"position": 3})
    np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), batches[3])
    data.close()
    resumed.close()
