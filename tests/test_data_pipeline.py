"""Training iterator and eval dataset on small real datasets: values, determinism, resume, sharding, mixes,
bad records."""

import io
import itertools
import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from clipjax.data import pipeline, records, scenes, sources
from clipjax.data import preprocess as pp
from clipjax.data.tokenizer import get_tokenizer

TOK = get_tokenizer()
C = 16  # context length


@pytest.fixture(scope="module")
def ds_a(tmp_path_factory):
    return scenes.build_scenes(tmp_path_factory.mktemp("a") / "ds", num_train=120, num_test=20, num_heldout=25,
                               seed=0, workers=0, progress=False)


@pytest.fixture(scope="module")
def ds_b(tmp_path_factory):
    return scenes.build_scenes(tmp_path_factory.mktemp("b") / "ds", num_train=60, num_test=5, num_heldout=5,
                               seed=1, workers=0, progress=False)


def _train(spec, **kw):
    args = dict(global_batch_size=16, image_size=64, context_length=C, tokenizer=TOK, seed=0, process_index=0,
                process_count=1, num_threads=2)
    return pipeline.make_train_iterator(spec, **{**args, **kw})


def _take(it, n):
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _fingerprints(path, split="train"):
    """Each record's full-image uint8 RGB pixels (what a training batch holds at scale 1) → (key, tokenised
    captions)."""
    src = sources.open_source(f"dir:{path}", split)
    out = {}
    for i in range(len(src)):
        rec = src.record(i)
        out[np.asarray(pp.load_image(rec.image), np.uint8).tobytes()] = (rec.key, TOK(rec.captions, C))
    assert len(out) == len(src)
    return out


def _keys(batches, prints):
    return [prints[row.tobytes()][0] for b in batches for row in b["image"]]


def test_batches_are_records_with_one_of_their_captions(ds_a):
    prints = _fingerprints(ds_a)
    (batch,) = _take(_train(f"dir:{ds_a}", scale=(1.0, 1.0)), 1)  # scale 1: the crop is the whole image
    assert batch["image"].shape == (16, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["text"].shape == (16, C) and batch["text"].dtype == np.int32
    for image, text in zip(batch["image"], batch["text"]):
        _, caption_tokens = prints[image.tobytes()]
        assert any((text == row).all() for row in caption_tokens)


def test_train_transform_is_normalize_of_train_crop_bit_exactly(tmp_path):
    """The float32 API keeps its numbers: train_transform == normalize(train_crop), for RGB, RGBA, palette and grey
    images and for a large JPEG that is draft-decoded."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    images = [Image.fromarray(rgb), Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"),
              Image.fromarray(rgb).convert("P"), Image.fromarray(rgb[..., 0], "L"),
              Image.fromarray(rgb).resize((700, 600))]
    for k, image in enumerate(images):
        buf = io.BytesIO()
        image.save(buf, format="JPEG" if k == 4 else "PNG")
        crop = pp.train_crop(buf.getvalue(), 32, np.random.default_rng(k))
        assert crop.dtype == np.uint8 and crop.shape == (32, 32, 3)
        want = pp.train_transform(buf.getvalue(), 32, np.random.default_rng(k))
        assert want.dtype == np.float32
        np.testing.assert_array_equal(pp.normalize(crop), want)


def test_uint8_batches_normalised_as_on_the_device_equal_the_float32_host_batches(ds_a):
    """What the device computes from a uint8 batch (clipjax.step.prepare_images) is the float32 batch the host used
    to ship (train_transform of each slot's record with the slot's generator), to 1e-6, at a quarter of the bytes."""
    import jax.numpy as jnp

    from clipjax.step import prepare_images

    it = _train(f"dir:{ds_a}")  # random crops at scale (0.9, 1.0), resized
    slots = list(itertools.islice(it._slots(it.get_state()), 32))
    batches = _take(it, 2)
    src = sources.open_source(f"dir:{ds_a}", "train")
    old = []
    for slot in slots:
        rec = src.record(slot.index)
        rng = np.random.default_rng([0, 0, slot.t])  # seed, process index, slot
        rng.integers(len(rec.captions))  # the caption is chosen first
        old.append(pp.train_transform(rec.image, 64, rng, scale=(0.9, 1.0)))  # f32 [S, S, 3]
    old = np.stack(old).reshape(2, 16, 64, 64, 3)
    for batch, want in zip(batches, old):
        assert batch["image"].dtype == np.uint8 and 4 * batch["image"].nbytes == want.nbytes
        got = np.asarray(prepare_images({"image": jnp.asarray(batch["image"])}))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(pp.normalize(batch["image"]), want)  # on the host: the same bits


def test_deterministic_and_seed_dependent(ds_a):
    a = _take(_train(f"dir:{ds_a}"), 3)
    b = _take(_train(f"dir:{ds_a}", num_threads=1), 3)
    c = _take(_train(f"dir:{ds_a}", seed=1), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["text"], y["text"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("mix,labels", [(False, False), (True, False), (False, True)])
def test_resume_mid_epoch_equals_uninterrupted(ds_a, ds_b, mix, labels):
    spec = {f"dir:{ds_a}": 0.7, f"dir:{ds_b}": 0.3} if mix else f"dir:{ds_a}"
    full = _take(_train(spec, labels=labels), 12)  # 120 records / 16: crosses epoch boundaries
    first = _train(spec, labels=labels)
    _take(first, 5)
    state = json.loads(json.dumps(first.get_state()))
    resumed = _train(spec, labels=labels)
    resumed.set_state(state)
    rest = _take(resumed, 7)
    for x, y in zip(full[5:], rest):
        assert set(x) == set(y) == ({"image", "text", "label"} if labels else {"image", "text"})
        for field in x:
            np.testing.assert_array_equal(x[field], y[field])
    with pytest.raises(ValueError, match="seed"):
        _train(spec, seed=3).set_state(state)


def test_labels_are_the_records_global_class_ids(ds_a):
    """labels=True adds each record's global label (an index into get_classnames(spec)); the rest of the batch is
    what labels=False gives."""
    prints = _fingerprints(ds_a)
    src = sources.open_source(f"dir:{ds_a}", "train")
    label_of = {src.record(i).key: src.record(i).label for i in range(len(src))}
    plain = _take(_train(f"dir:{ds_a}", scale=(1.0, 1.0)), 3)
    it = _train(f"dir:{ds_a}", scale=(1.0, 1.0), labels=True)
    labelled = _take(it, 3)
    assert it.classnames == pipeline.get_classnames(f"dir:{ds_a}") == list(scenes.CLASSNAMES)
    for p, b in zip(plain, labelled):
        np.testing.assert_array_equal(p["image"], b["image"])
        np.testing.assert_array_equal(p["text"], b["text"])
        assert b["label"].dtype == np.int32
        assert [int(x) for x in b["label"]] == [label_of[k] for k in _keys([b], prints)]
    assert len({int(x) for b in labelled for x in b["label"]}) > 3


def test_labels_need_one_labelled_dataset_and_skip_unlabelled_records(ds_a, ds_b, tmp_path):
    with pytest.raises(sources.DatasetError, match="one labelled dataset"):
        _train({f"dir:{ds_a}": 1.0, f"dir:{ds_b}": 1.0}, labels=True)
    unnamed = records.image_text_features()
    path = tmp_path / "unnamed"
    path.mkdir()
    with records.ShardWriter(path / records.shard_filename("unnamed", "train", 0, 1), unnamed) as w:
        w.write({"image": _png(5), "captions": ["x"], "key": "k", "label": -1})
    records.write_metadata(path, "unnamed", unnamed, {"train": [1]})
    with pytest.raises(sources.DatasetError, match="no class labels"):
        _train(f"dir:{path}", labels=True)
    good = [{"image": _png(10 * i), "captions": [f"image {i}"], "key": f"g{i}", "label": i % 2} for i in range(6)]
    none = [{"image": _png(99), "captions": ["no label"], "key": "n0", "label": -1}]
    path = _write_dataset(tmp_path / "partly", good + none)
    it = _train(f"dir:{path}", global_batch_size=6, labels=True, scale=(1.0, 1.0))
    (batch,) = _take(it, 1)  # one epoch: the 6 labelled records; the unlabelled one is skipped
    assert it.skipped == 1 and it.get_state()["sample"] == 7
    assert {_solid_value(im): int(lab) for im, lab in zip(batch["image"], batch["label"])} == {
        10 * i: i % 2 for i in range(6)}
    (plain,) = _take(_train(f"dir:{path}", global_batch_size=6, scale=(1.0, 1.0)), 1)
    assert "label" not in plain and 99 in {_solid_value(im) for im in plain["image"]}  # read without labels=True


def _solid_value(image):
    """The 8-bit value of a solid grey image (red channel)."""
    return int(image[0, 0, 0])


def test_loader_pickles_for_workers_and_close_leaves_no_threads(ds_a):
    """The per-record work crosses a pickle boundary (as it will to worker processes) with the same batches, and
    close() stops every thread the iterator started."""
    import pickle
    import threading

    from test_data_core import PickledThreads

    it = _train(f"dir:{ds_a}", labels=True)
    slot = next(it._slots(it.get_state()))
    clone = pickle.loads(pickle.dumps(it.loader))
    assert clone.sources._opened is None  # reopened in the worker, not pickled
    for a, b in zip(it.loader(slot), clone(slot)):
        np.testing.assert_array_equal(a, b)
    threaded = _take(it, 3)
    pickled = _take(_train(f"dir:{ds_a}", labels=True, executor=PickledThreads), 3)
    for x, y in zip(threaded, pickled):
        for field in ("image", "text", "label"):
            np.testing.assert_array_equal(x[field], y[field])
    it = _train(f"dir:{ds_a}", num_threads=3)
    next(it)
    assert any(t.name.startswith("clipjax-data") for t in threading.enumerate())
    it.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("clipjax-data", "test-pickled"))]


def test_two_hosts_disjoint_shards_covering_each_epoch(ds_a):
    prints = _fingerprints(ds_a)
    per_host = []
    for p in range(2):
        it = _train(f"dir:{ds_a}", global_batch_size=40, process_index=p, process_count=2, scale=(1.0, 1.0))
        per_host.append(_keys(_take(it, 6), prints))  # 2 epochs of 60 records per host
    h0, h1 = per_host
    for epoch in range(2):
        e0, e1 = set(h0[60 * epoch:60 * (epoch + 1)]), set(h1[60 * epoch:60 * (epoch + 1)])
        assert len(e0) == len(e1) == 60 and not e0 & e1 and len(e0 | e1) == 120
    assert h0[:60] != h0[60:]  # reshuffled each epoch


def test_mix_proportions(ds_a, ds_b):
    prints_a, prints_b = _fingerprints(ds_a), _fingerprints(ds_b)
    it = _train({f"dir:{ds_a}": 3.0, f"dir:{ds_b}": 1.0}, global_batch_size=32, scale=(1.0, 1.0))
    batches = _take(it, 25)
    rows = [row.tobytes() for b in batches for row in b["image"]]
    from_a = sum(r in prints_a for r in rows)
    assert from_a + sum(r in prints_b for r in rows) == len(rows) == 800
    assert abs(from_a / 800 - 0.75) < 0.06  # 3.5 sigma
    assert it.get_state()["counts"] == [from_a, 800 - from_a]


def _write_dataset(path, examples, garbage_at=()):
    feats = records.image_text_features(["zero", "one"])
    path.mkdir(parents=True)
    name = records.shard_filename("bad", "train", 0, 1)
    writer = ArrayRecordWriter(str(path / name), "group_size:1")
    for i, ex in enumerate(examples):
        writer.write(b"\x00not a tf.Example\xff" * 3 if i in garbage_at else feats.serialize_example(ex))
    writer.close()
    records.write_metadata(path, "bad", feats, {"train": [len(examples)]})
    return path


def _png(value, size=20):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_records_are_skipped_and_counted(tmp_path):
    good = [{"image": _png(10 * i), "captions": [f"image {i}"], "key": f"g{i}", "label": i % 2} for i in range(10)]
    bad = [
        {"image": _png(200)[:40], "captions": ["truncated png"], "key": "b0", "label": 0},
        {"image": b"", "captions": ["zero bytes"], "key": "b1", "label": 0},
        {"image": _png(220), "captions": ["", "  "], "key": "b2", "label": 1},
        {"image": b"plain text", "captions": ["not an image"], "key": "b3", "label": 1},
        {"image": _png(1), "captions": ["garbage record"], "key": "b4", "label": 1},
    ]
    path = _write_dataset(tmp_path / "bad", good + bad, garbage_at={14})
    it = _train(f"dir:{path}", global_batch_size=5)
    batches = _take(it, 4)  # 20 good samples: two epochs of 15 slots, 10 good each
    state = it.get_state()
    assert all(b["image"].shape == (5, 64, 64, 3) for b in batches)
    assert state["sample"] == 20 + state["skipped"] and it.skipped == state["skipped"]
    assert 5 <= state["skipped"] <= 10
    ev = pipeline.make_eval_dataset(f"dir:{path}", "train", image_size=32, batch_size=4)
    out = list(ev)
    assert ev.skipped == 4  # empty captions are fine for eval; undecodable images and records are not
    assert sum(int(b["mask"].sum()) for b in out) == 11


def test_eval_batches_padded_with_split_labels(ds_a):
    spec = f"dir:{ds_a}"
    ev = pipeline.make_eval_dataset(spec, "heldout", image_size=48, batch_size=10)
    batches = list(ev)
    assert len(batches) == len(ev) == 3 and [int(b["mask"].sum()) for b in batches] == [10, 10, 5]
    last = batches[-1]
    assert (last["label"][5:] == -1).all() and not last["image"][5:].any() and last["captions"][5:] == [[]] * 5
    names = pipeline.get_classnames(spec, "heldout")
    assert ev.classnames == names
    src = sources.open_source(spec, "heldout")
    for i in range(25):
        b, r = batches[i // 10], i % 10
        rec = src.record(i)
        assert names[b["label"][r]] == scenes.CLASSNAMES[rec.label] and b["captions"][r] == rec.captions
        np.testing.assert_array_equal(b["image"][r], pp.preprocess(rec.image, 48))
    glob = pipeline.make_eval_dataset(spec, "heldout", image_size=48, batch_size=10, label_space="all")
    assert [scenes.CLASSNAMES[x] for x in next(iter(glob))["label"]] == [names[x] for x in batches[0]["label"]]


def test_eval_decodes_to_rgb_before_the_transform_as_open_clip_does(tmp_path):
    """open_clip's ImageFolder and webdataset evaluations load with Image.open(f).convert("RGB") and then resize:
    an RGBA PNG is resized without its alpha (not as premultiplied RGBA, which preprocess of the file does)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    pixels = rng.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(root / "cat" / "rgba.png")
    Image.fromarray(pixels[..., :3]).save(root / "dog" / "rgb.png")
    ev = pipeline.make_eval_dataset(str(root), "test", image_size=16, batch_size=2)
    (batch,) = list(ev)
    assert batch["key"] == ["cat/rgba.png", "dog/rgb.png"] and batch["mask"].all()
    with Image.open(root / "cat" / "rgba.png") as f:
        want = pp.preprocess(f.convert("RGB"), 16)  # open_clip: the loader's convert, then the eval transform
    np.testing.assert_array_equal(batch["image"][0], want)
    assert np.abs(batch["image"][0] - pp.preprocess(root / "cat" / "rgba.png", 16)).max() > 0.1  # not as decoded
    np.testing.assert_array_equal(batch["image"][1], pp.preprocess(root / "dog" / "rgb.png", 16))  # RGB: the same


def test_spec_errors_name_the_spec(tmp_path):
    with pytest.raises(sources.DatasetError, match="no_such_dataset_xyz"):
        pipeline.make_eval_dataset("no_such_dataset_xyz", "test", image_size=32, batch_size=2)
    with pytest.raises(sources.DatasetError, match="does not exist"):
        _train(f"dir:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.DatasetError, match="no dataset_info.json"):
        _train(f"dir:{tmp_path / 'empty'}")
    path = _write_dataset(tmp_path / "zero", [])
    with pytest.raises(sources.DatasetError, match="empty"):
        _train(f"dir:{path}")
    with pytest.raises(sources.DatasetError, match="weights"):
        _train({f"dir:{path}": 0.0})
