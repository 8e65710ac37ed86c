"""One training iterator and one resume state for every source kind (``clipjax.data.slots``), on the datasets of
``tests/data_states.py``: ArrayRecord datasets and mixes, an ImageFolder with labels and in a mix, a ``wds:`` stream
(one host of two as well) and a mix of a stream with both. States of the iterators before it restore
(``tests/test_data_states.py``), are saved again in the one format, and restore from it; other states are refused
with a ValueError (what the trainer reports as one line), never a KeyError."""

import pytest

import data_states as ds

CASES = sorted(ds.CASES)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return ds.build(tmp_path_factory.mktemp("slots"))


def _saved(case):
    import json

    return json.loads((ds.FIXTURES / f"{case}.json").read_text())


def _digests(it, n):
    try:
        return [ds.digest(next(it)) for _ in range(n)]
    finally:
        it.close()


def test_every_spec_is_the_one_iterator_with_the_one_state_format(root):
    from clipjax.data import slots

    keys = set()
    for case in CASES:
        it = ds.make(case, root)
        try:
            assert type(it) is slots.TrainIterator
            state = it.get_state()
        finally:
            it.close()
        assert (state["kind"], state["version"]) == ("slots", 2), case
        keys.add(tuple(sorted(state)))
        streams = [s for s in state["specs"] if s.startswith("wds:")]
        assert sorted(state["streams"]) == sorted(streams) and (state["shuffle_buffer"] is None) == (not streams)
        assert all(sorted(v) == ["buffer", "position", "read_skipped", "sample", "shards"]
                   for v in state["streams"].values())
    assert len(keys) == 1  # the same fields for every source kind


def test_a_state_restored_from_an_old_one_is_saved_and_restored_again(root):
    """A mix's state saved before per-source skips were kept: the total carries on, the per-source counts restart at
    0; the state saved after it (per-source skips below the total) restores and goes on with the same batches."""
    saved = _saved("imagefolder_mix")
    old = dict(ds.rooted(saved["states"][ds.RESUME_AT - 1], root))
    del old["skipped_by_source"]
    assert old["skipped"] > 0
    it = ds.make("imagefolder_mix", root)
    it.set_state(old)
    assert _digests(it, 2) == saved["batches"][ds.RESUME_AT : ds.RESUME_AT + 2]
    again = it.get_state()
    assert again["kind"] == "slots" and sum(again["skipped_by_source"]) < again["skipped"]
    resumed = ds.make("imagefolder_mix", root)
    resumed.set_state(again)
    assert _digests(resumed, 2) == saved["batches"][ds.RESUME_AT + 2 : ds.RESUME_AT + 4]
    assert resumed.skipped == saved["states"][ds.RESUME_AT + 3]["skipped"]


@pytest.mark.parametrize("change, match", [
    (lambda s: {**s, "kind": "other"}, "not one of a training iterator"),
    (lambda s: {**s, "version": 3}, "not one of a training iterator"),
    (lambda s: {k: v for k, v in s.items() if k != "counts"}, "inconsistent data iterator state"),
    (lambda s: {**s, "streams": None}, "inconsistent data iterator state"),
    (lambda s: {**s, "counts": [s["counts"][0] + 1, s["counts"][1] - 1, s["counts"][2]]},
     "inconsistent data iterator state"),
    (lambda s: {**s, "skipped_by_source": [s["skipped"] + 1, 0, 0]}, "inconsistent data iterator state"),
])
def test_states_of_other_data_or_damaged_are_one_value_error(root, change, match):
    state = ds.rooted(_saved("wds_mix")["states"][ds.RESUME_AT - 1], root)  # a mix with a stream, as first saved
    new = ds.make("wds_mix", root)
    new.set_state(state)
    for form in (state, new.get_state()):
        with pytest.raises(ValueError, match=match):
            ds.make("wds_mix", root).set_state(change(form))
    with pytest.raises(ValueError, match="specs"):
        ds.make("wds", root).set_state(new.get_state())
