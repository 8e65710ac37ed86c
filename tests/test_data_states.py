"""Resume states saved by earlier clipjax (``tests/fixtures/data_states``, written by ``tests/data_states.py``) still
restore, for every source kind: an ArrayRecord dataset and mix, an ImageFolder with labels and in a mix, a ``wds:``
stream (one host of two as well) and a mix of a stream, an ArrayRecord dataset and an ImageFolder. From the start and
from a saved state, the iterator yields batches bit-identical to the saved ones and reaches the same positions."""

import json

import pytest

import data_states as ds

CASES = sorted(ds.CASES)


def _saved(case):
    return json.loads((ds.FIXTURES / f"{case}.json").read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return ds.build(tmp_path_factory.mktemp("data_states"))


def _read(it, n, root):
    batches, states = [], []
    try:
        for _ in range(n):
            batches.append(ds.digest(next(it)))
            states.append(it.get_state())
    finally:
        it.close()
    return batches, states


@pytest.mark.parametrize("case", CASES)
def test_batches_from_the_start_are_the_saved_ones(case, root):
    saved = _saved(case)
    batches, states = _read(ds.make(case, root), ds.BATCHES, root)
    assert batches == saved["batches"]
    for state, old in zip(states, saved["states"]):
        it = ds.make(case, root)
        it.set_state(ds.rooted(old, root))
        assert it.get_state() == state
        it.close()


@pytest.mark.parametrize("case", CASES)
def test_a_saved_state_resumes_with_the_saved_batches(case, root):
    saved = _saved(case)
    it = ds.make(case, root)
    it.set_state(ds.rooted(saved["states"][ds.RESUME_AT - 1], root))
    batches, states = _read(it, ds.BATCHES - ds.RESUME_AT, root)
    assert batches == saved["batches"][ds.RESUME_AT:]
    assert it.skipped == ds.rooted(saved["states"][-1], root)["skipped"]


def test_a_state_saved_before_per_source_skips_were_kept_restores(root):
    """States of ArrayRecord datasets saved before "skipped_by_source" existed: the skips count for the one source."""
    saved = _saved("imagefolder_labels")
    old = dict(saved["states"][ds.RESUME_AT - 1])
    del old["skipped_by_source"]
    it = ds.make("imagefolder_labels", root)
    it.set_state(ds.rooted(old, root))
    batches, _ = _read(it, ds.BATCHES - ds.RESUME_AT, root)
    assert batches == saved["batches"][ds.RESUME_AT:]
    assert it.skipped == saved["states"][-1]["skipped"]


@pytest.mark.parametrize("case", CASES)
def test_every_training_iterator_is_the_declared_interface(case, root):
    from clipjax.data import core
    from clipjax.phases import Phase, PhasedData

    it = ds.make(case, root)
    try:
        assert isinstance(it, core.TrainData)
        assert isinstance(it.skipped_by_source, dict) and isinstance(it.sources, list)
        phased = PhasedData(lambda p: it, [Phase(0, 10, 24, 12, 0.0)])
        phased.at(0)
        assert isinstance(phased, core.TrainData) and phased.get_state() == it.get_state()
        assert it.step_batch is None and phased.step_batch is None  # host batches: the loop feeds them to the step
    finally:
        it.close()
