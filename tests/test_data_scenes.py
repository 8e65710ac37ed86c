"""The embedded scenes dataset: TFDS-readable without TensorFlow, held-out pairs, determinism, caching."""

import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clipjax.data import records, scenes, sources
from clipjax.data import scenes_render as sr

SMALL = dict(num_train=240, num_test=48, num_heldout=40, image_size=64, seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return scenes.build_scenes(tmp_path_factory.mktemp("scenes") / "ds", shard_size=100, workers=2,
                               progress=False, **SMALL)


def _all(path, split):
    ds = tfds.builder_from_directory(os.fspath(path)).as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()})
    return [ds[i] for i in range(len(ds))]


def _s(b):
    return b.decode() if isinstance(b, bytes) else b


def test_reads_through_tfds_and_grain_without_tensorflow(small):
    b = tfds.builder_from_directory(os.fspath(small))
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 240, "test": 48, "heldout": 40}
    assert b.info.splits["train"].num_shards == 3
    decoded = b.as_data_source("test")[0]  # TFDS' own numpy image decoding
    assert decoded["image"].shape == (64, 64, 3) and decoded["image"].dtype == np.uint8
    import grain

    shards = sorted(str(p) for p in small.glob(f"{scenes.NAME}-heldout.array_record-*"))
    raw = grain.sources.ArrayRecordDataSource(shards)
    assert len(raw) == 40
    parsed = b.info.features.deserialize_example_np(raw[0], decoders={"image": tfds.decode.SkipDecoding()})
    assert _s(parsed["key"]).startswith("heldout-")
    assert "tensorflow" not in sys.modules


def test_heldout_pairs_never_in_train(small):
    held = {f"{c} {s}" for c, s in scenes.HELDOUT}
    held_plural = {f"{c} {sr.PLURALS[s]}" for c, s in scenes.HELDOUT}
    seen_colors, seen_shapes = set(), set()
    for ex in _all(small, "train"):
        pair = f"{_s(ex['meta']['color'])} {_s(ex['meta']['shape'])}"
        assert pair not in held and scenes.CLASSNAMES[ex["label"]] == pair
        assert _s(ex["meta"]["distractor"]) not in held
        for cap in map(_s, ex["captions"]):
            assert not any(h in cap for h in held | held_plural), cap
            assert pair in cap or f"{_s(ex['meta']['color'])} {sr.PLURALS[_s(ex['meta']['shape'])]}" in cap
        seen_colors.add(_s(ex["meta"]["color"]))
        seen_shapes.add(_s(ex["meta"]["shape"]))
    assert seen_colors == set(scenes.COLORS) and seen_shapes == set(scenes.SHAPES)


def test_heldout_split_classes(small):
    names = sources.get_classnames(f"dir:{small}", "heldout")
    assert len(names) >= 6 and set(names) == {f"{c} {s}" for c, s in scenes.HELDOUT}
    assert sources.get_classnames(f"dir:{small}") == list(scenes.CLASSNAMES)
    assert not set(sources.get_classnames(f"dir:{small}", "test")) & set(names)
    for ex in _all(small, "heldout"):
        name = scenes.CLASSNAMES[ex["label"]]
        assert name in names and _s(ex["meta"]["distractor"]) == ""
        assert name == f"{_s(ex['meta']['color'])} {_s(ex['meta']['shape'])}"


def test_object_colour_is_the_labelled_one(small):
    """Pixels close to a palette colour vote; the winner is the label's colour (no distractors in eval)."""
    palette = np.array(list(sr.COLORS.values()), np.float32)  # [K, 3]
    for ex in _all(small, "heldout") + _all(small, "test"):
        img = np.asarray(Image.open(__import__("io").BytesIO(ex["image"])).convert("RGB"), np.float32)
        dist = np.linalg.norm(img.reshape(-1, 1, 3) - palette[None], axis=-1)  # [HW, K]
        near = dist.min(-1) < 40
        votes = np.bincount(dist.argmin(-1)[near], minlength=len(palette))
        assert scenes.COLORS[int(votes.argmax())] == _s(ex["meta"]["color"])


def test_deterministic_and_stored_bytes_are_the_encoded_ones(small, tmp_path):
    again = scenes.build_scenes(tmp_path / "again", shard_size=1000, workers=0, progress=False, **SMALL)
    a = {_s(e["key"]): e for e in _all(small, "train")}
    b = {_s(e["key"]): e for e in _all(again, "train")}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["image"] == b[k]["image"] and a[k]["captions"] == b[k]["captions"]
    fresh = scenes.make_example("train", 7, seed=0, image_size=64, image_format="png")
    assert a[fresh["key"]]["image"] == fresh["image"]
    other_seed = scenes.make_example("train", 7, seed=1, image_size=64, image_format="png")
    assert other_seed["image"] != fresh["image"]


def test_interrupted_build_resumes_keeping_finished_shards(small, tmp_path):
    out = scenes.build_scenes(tmp_path / "d", shard_size=100, workers=0, progress=False, **SMALL)
    shards = sorted(out.glob("*.array_record-*"))
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    (out / "dataset_info.json").unlink()
    scenes.build_scenes(out, shard_size=100, workers=0, progress=False, **SMALL)
    assert all(p.exists() for p in shards)
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in shards if p != shards[1])
    assert [e["image"] for e in _all(out, "train")] == [e["image"] for e in _all(small, "train")]


def test_ensure_scenes_caches_under_env_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPJAX_DATA_DIR", str(tmp_path / "cache"))
    params = dict(num_train=30, num_test=10, num_heldout=10, image_format="jpeg")
    path = scenes.ensure_scenes(progress=False, **params)
    assert path.is_relative_to(tmp_path / "cache") and records.is_dataset_dir(path)
    assert not list(path.parent.glob("*.incomplete"))
    stamp = (path / "dataset_info.json").stat().st_mtime_ns
    assert scenes.ensure_scenes(progress=False, **params) == path
    assert (path / "dataset_info.json").stat().st_mtime_ns == stamp
    image = _all(path, "train")[0]["image"]
    assert image[:3] == b"\xff\xd8\xff"  # JPEG as encoded
    other = scenes.ensure_scenes(tmp_path / "explicit", progress=False, **params)
    assert other.is_relative_to(tmp_path / "explicit")
    with pytest.raises(TypeError, match="num_trian"):
        scenes.ensure_scenes(tmp_path, num_trian=3)
