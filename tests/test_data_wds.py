"""Webdataset shards streamed in place (``wds:`` specs): real tar shards of real JPEG/PNG/WebP images with .txt and
.json captions, a truncated shard, samples without a caption and an image that does not decode. Batches are the
train crops of the members' bytes, skips are counted, the stream is deterministic, hosts read disjoint shards that
cover the data, resume is exact mid-epoch and across an epoch boundary, and the trainer runs on it. In a mix with an
ArrayRecord dataset (``data.mix``) the sources of the slots are drawn as in an ArrayRecord mix, batches do not depend
on threads or workers, resume is exact and skips are counted per source.

This module is imported by decode workers too (a record function below is pickled by name): no JAX at the top.
"""

import collections
import io
import json
import logging
import os
import shutil
import sys
import tarfile

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from clipjax.data import core, ingest, pipeline, sources, wds
from clipjax.data import preprocess as pp
from clipjax.data.tokenizer import get_tokenizer

TOK = get_tokenizer()
C = 16  # context length
S = 32  # image size
NUM_SHARDS, PER_SHARD = 6, 6
NO_CAPTION = {(1, 2), (2, 4)}  # .json without a caption; an image alone
UNDECODABLE = (3, 1)
CUT = (5, 4)  # shard 5 is cut inside this sample's image: samples 0-3 are kept, 4 and 5 lost
USABLE = NUM_SHARDS * PER_SHARD - len(NO_CAPTION) - 2  # read from the shards (the undecodable one too)
READ_SKIPS = len(NO_CAPTION) + 1  # per epoch: no caption ×2, the damaged shard


def _encode(seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _sample(s: int, i: int) -> dict[str, bytes]:
    """The members of sample i of shard s, by extension."""
    fmt, ext = {(4, 0): ("PNG", "png"), (4, 3): ("WEBP", "webp")}.get((s, i), ("JPEG", "jpg"))
    files = {ext: _encode(100 * s + i, fmt)}
    if (s, i) == UNDECODABLE:
        files = {"jpg": b"these bytes are not an image"}
    if (s, i) == (1, 2):
        files["json"] = json.dumps({"url": "http://example.com/x.jpg", "width": 64}).encode()
    elif (s, i) == (0, 5):
        files["txt"] = b'["a first caption", "a second caption"]'
    elif (s, i) not in NO_CAPTION:
        if (s + i) % 2:
            files["txt"] = f"a photo number {s} {i}".encode()
        else:
            files["json"] = json.dumps({"caption": f"json caption {s} {i}", "similarity": 0.3}).encode()
    return files


def _write_tar(path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _key(s: int, i: int) -> str:
    return f"{s:02d}{i:03d}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(directory of the shards, {key: (image bytes, captions)} of the samples that can be read)."""
    root = tmp_path_factory.mktemp("wds")
    readable = {}
    for s in range(NUM_SHARDS):
        samples = [(_key(s, i), _sample(s, i)) for i in range(PER_SHARD)]
        path = root / f"{s:06d}.tar"
        _write_tar(path, samples)
        if s == CUT[0]:
            with tarfile.open(path) as tar:
                member = tar.getmember(f"{_key(*CUT)}.jpg")
            data = path.read_bytes()
            path.write_bytes(data[: member.offset_data + member.size // 2])
        for i, (key, files) in enumerate(samples):
            if (s, i) in NO_CAPTION or (s == CUT[0] and i >= CUT[1]):
                continue
            image = next(files[e] for e in ("jpg", "png", "webp") if e in files)
            captions = ingest.sample_captions(files.get("txt"), files.get("json"))
            readable[key] = (image, captions)
    assert len(readable) == USABLE
    return root, readable


def _brace(root) -> str:
    return f"wds:{root}/{{000000..{NUM_SHARDS - 1:06d}}}.tar"


def _train(spec, **kw):
    args = dict(global_batch_size=8, image_size=S, context_length=C, tokenizer=TOK, seed=0, process_index=0,
                process_count=1, num_threads=2, shuffle_buffer=16)
    return pipeline.make_train_iterator(spec, **{**args, **kw})


def _take(it, n):
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _key_of(sample: wds.Sample) -> str:
    return sample.where.rsplit(":", 1)[1]


def _shard_number(url: str) -> int:
    return int(os.path.basename(url)[:6])


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for x, y in zip(batches_a, batches_b):
        assert set(x) == set(y) == {"image", "text"}
        for field in x:
            np.testing.assert_array_equal(x[field], y[field])


# ============================================================================================ specs and reading

def test_brace_patterns_expand_as_a_shell_does():
    assert wds.expand_braces("a/{00..02}.tar") == ["a/00.tar", "a/01.tar", "a/02.tar"]
    assert wds.expand_braces("s{0..10}")[-2:] == ["s9", "s10"]
    assert wds.expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert wds.expand_braces("{3..1}") == ["3", "2", "1"]
    assert len(wds.expand_braces("gs://b/laion/{00000..41455}.tar")) == 41456
    with pytest.raises(ValueError, match="neither a range"):
        wds.expand_braces("a{b}c")
    # the rest of webdataset's patterns (braceexpand's): letter ranges, steps, nesting; each counted as it expands
    assert wds.expand_braces("{a..c}{0..4..2}") == ["a0", "a2", "a4", "b0", "b2", "b4", "c0", "c2", "c4"]
    assert wds.expand_braces("x{a,{1..2}}") == ["xa", "x1", "x2"]
    assert wds.count_braces("{a..c}{0..4..2}") == 9 and wds.count_braces("x{a,{1..2}}") == 3


def test_spec_forms_list_the_same_shards(shards, tmp_path):
    root, _ = shards
    want = [str(root / f"{s:06d}.tar") for s in range(NUM_SHARDS)]
    assert wds.shard_urls(_brace(root)) == want
    assert wds.shard_urls(f"wds:{root}") == want  # a directory: its *.tar, sorted
    assert wds.shard_urls(f"wds:{root}/*.tar") == want
    assert wds.shard_urls(f"wds:file://{root}/000003.tar") == want[3:4]
    assert sources.source_kind(f"wds:{root}") == "stream" and sources.resolve_spec(f"wds:{root}") == f"wds:{root}"
    for bad, message in [(f"wds:{tmp_path}/none", "neither a directory"), (f"wds:{tmp_path}", "no .tar shards"),
                         (f"wds:{tmp_path}/{{0..3}}.tar", "none of its 4 shards exists"), ("wds:", "name the shards")]:
        with pytest.raises(sources.DatasetError, match=message) as raised:
            wds.shard_urls(bad)
        assert str(raised.value).count(repr(bad)) == 1, raised.value  # the spec named once
    with pytest.raises(sources.DatasetError, match="training only"):
        sources.open_source(f"wds:{root}", "train")
    with pytest.raises(sources.DatasetError, match="fewer than 7 hosts"):
        _train(f"wds:{root}", global_batch_size=7, process_index=0, process_count=7)
    with pytest.raises(sources.DatasetError, match="no splits"):
        _train({f"wds:{root}": 0.5, "scenes": 0.5}, split="test")
    with pytest.raises(sources.DatasetError, match="not class labels"):
        _train(f"wds:{root}", labels=True)
    with pytest.raises(sources.DatasetError, match="no splits"):
        _train(f"wds:{root}", split="test")


def test_remote_shards_through_fsspec_and_a_missing_implementation_named(shards):
    fsspec = pytest.importorskip("fsspec")
    root, _ = shards
    fs = fsspec.filesystem("memory")
    for s in range(NUM_SHARDS):
        fs.pipe(f"/wds-test/{s:06d}.tar", (root / f"{s:06d}.tar").read_bytes())
    try:
        local = _take(_train(f"wds:{root}"), 3)
        for spec in ("wds:memory://wds-test", f"wds:memory://wds-test/{{000000..{NUM_SHARDS - 1:06d}}}.tar"):
            assert len(wds.shard_urls(spec)) == NUM_SHARDS
            _assert_same(_take(_train(spec), 3), local)
    finally:
        fs.rm("/wds-test", recursive=True)
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(sources.DatasetError, match="s3fs") as e:
            _train("wds:s3://bucket/laion/{00000..00009}.tar")
        assert "\n" not in str(e.value)


def test_one_epoch_reads_every_member_as_written_and_counts_what_it_skips(shards, caplog):
    """The reader yields each readable sample once per epoch with its bytes and captions (.txt, a JSON list in a
    .txt, .json's caption); samples without a caption and the truncated shard's damage are skipped and counted;
    the truncated shard keeps its samples before the damage."""
    root, readable = shards
    reader = _train(_brace(root)).streams[0].reader()
    caplog.set_level(logging.WARNING, logger="clipjax.data.wds")
    seen = []  # (id, key) in stream order
    while (sample := next(reader)).id[0] == 0:
        image, captions = readable[_key_of(sample)]
        assert sample.image == image and sample.captions == captions
        seen.append((sample.id, _key_of(sample)))
    reader.close()
    assert sorted(k for _, k in seen) == sorted(readable)  # each once
    assert readable[_key(0, 5)][1] == ["a first caption", "a second caption"]
    assert readable[_key(0, 0)][1] == ["json caption 0 0"] and readable[_key(0, 1)][1] == ["a photo number 0 1"]
    assert reader.skipped == READ_SKIPS  # every shard's first sample is readable: nothing of epoch 1 counted yet
    text = caplog.text
    assert text.count("no caption") == 2 and "000005.tar: truncated or damaged" in text
    # the shards in epoch 0's order (shuffled), the samples of a shard in file order
    order = [reader.url(0, p) for p in range(NUM_SHARDS)]
    assert sorted(order) == wds.shard_urls(_brace(root)) and order != sorted(order)
    assert [i for i, _ in seen] == sorted(i for i, _ in seen)
    assert all(key == _key(_shard_number(reader.url(0, p)), i) for (_, p, i), key in seen)


def test_a_zero_byte_shard_is_damaged_and_an_unusable_dataset_is_one_error(tmp_path):
    _write_tar(tmp_path / "a.tar", [("k", {"txt": b"a caption but no image"})])
    (tmp_path / "b.tar").write_bytes(b"")
    it = _train(f"wds:{tmp_path}")
    with pytest.raises(sources.DatasetError, match="none of this host's 2 shards holds a usable sample"):
        next(it)
    reader = it.streams[0].reader()
    with pytest.raises(sources.DatasetError):
        next(reader)
    assert reader.skipped >= 2  # the image-less sample and the empty shard, once per epoch read


# ============================================================================================ batches

def test_batches_are_train_crops_of_the_member_bytes_and_skips_add_up(shards):
    """Each row is train_crop of its sample's bytes with the slot's generator (after the caption choice), the text
    one of its captions tokenised; the undecodable image is skipped; ``skipped`` is what the reader skipped up to
    its position plus the undecodable slots taken."""
    root, readable = shards
    it = _train(_brace(root), scale=(0.5, 1.0))
    slots = []
    stream = it.streams[0].stream()
    while len([s for s in slots if s[2] is not None]) < 12 * 8:  # three epochs and more
        t, sample = next(stream)
        assert readable[_key_of(sample)][0] == sample.image
        rng = np.random.default_rng([0, 0, t])  # seed, process index, slot
        caption = sample.captions[int(rng.integers(len(sample.captions)))]
        try:
            crop = pp.train_crop(sample.image, S, rng, scale=(0.5, 1.0))
        except Exception:
            assert _key_of(sample) == _key(*UNDECODABLE)
            crop = None
        slots.append((t, caption, crop))
    stream.reader.close()
    good = [s for s in slots if s[2] is not None]
    batches = [next(it) for _ in range(12)]
    for k, batch in enumerate(batches):
        rows = good[8 * k : 8 * k + 8]
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, S, S, 3)
        np.testing.assert_array_equal(batch["image"], np.stack([r[2] for r in rows]))
        np.testing.assert_array_equal(batch["text"], TOK([r[1] for r in rows], C))
    state = it.get_state()
    it.close()
    last_t = good[-1][0]
    assert state["sample"] == last_t + 1 and state["counts"] == [state["sample"]]
    decode_skips = sum(1 for t, _, crop in slots if crop is None and t < last_t)
    assert decode_skips >= 2
    stream_state = state["streams"][_brace(root)]
    reader = it.streams[0].reader()
    while list(reader.position) != stream_state["position"]:
        next(reader)
    reader.close()
    assert reader.skipped == stream_state["read_skipped"]
    assert state["skipped"] == state["skipped_by_source"][0] == stream_state["read_skipped"] + decode_skips
    assert it.skipped == state["skipped"] >= 3 * READ_SKIPS


def test_deterministic_for_any_threads_and_workers_and_seed_dependent(shards):
    root, _ = shards
    spec = _brace(root)
    base = _take(_train(spec, num_threads=2), 5)
    _assert_same(_take(_train(spec, num_threads=1), 5), base)
    _assert_same(_take(_train(spec, workers=1, num_threads=2), 5), base)  # decoded in a worker process
    other = _take(_train(spec, seed=1), 1)
    assert not np.array_equal(other[0]["image"], base[0]["image"])


class HeavyModules:
    """Runs ``loader`` on an item, then reports which heavy modules the worker process has imported."""

    def __init__(self, loader):
        self.loader = loader

    def __call__(self, item):
        image = self.loader(item)[0]
        return image.shape, sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "tensorflow"))


def test_decode_workers_get_the_bytes_and_import_no_jax(shards):
    import jax  # noqa: F401  (the parent holds JAX, as the trainer does)

    root, _ = shards
    it = _train(_brace(root))
    t, sample = next(it.streams[0].stream())
    item = wds.SampleItem(t, sample.where, sample.image, sample.captions)
    assert "bytes" not in repr(item) and len(repr(item)) < 200  # errors name the item, never its bytes
    with core.OrderedMap(HeavyModules(it.loader), [item], executor=core.processes(1, 1), window=1) as m:
        ((_, (shape, heavy)),) = list(m)
    assert shape == (S, S, 3) and heavy == []


def test_two_hosts_read_disjoint_shards_that_cover_the_data(shards):
    root, readable = shards
    spec = _brace(root)
    keys = []
    for host in range(2):
        it = _train(spec, global_batch_size=16, process_index=host, process_count=2)
        assert it.streams[0].reader().urls == wds.shard_urls(spec)[host::2]
        stream = it.streams[0].stream()
        keys.append({_key_of(next(stream)[1]) for _ in range(4 * USABLE)})
        stream.reader.close()
        assert len(_take(it, 2)[1]["image"]) == 8  # per-host batch: global / hosts
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(readable)
    assert {int(k[:2]) % 2 for k in keys[1]} == {1}  # shard i on host i mod 2


# ============================================================================================ resume

def test_resume_is_exact_mid_epoch_and_across_an_epoch_boundary(shards):
    root, _ = shards
    spec = _brace(root)
    it = _train(spec)
    full, states = [], []
    for _ in range(14):
        full.append(next(it))
        states.append(json.loads(json.dumps(it.get_state())))  # as a checkpoint stores it
    it.close()
    streamed = [s["streams"][spec] for s in states]
    mid = next(k for k, s in enumerate(streamed) if s["position"][0] == 0)
    boundary = next(k for k, s in enumerate(streamed) if len({i[0] for i in s["buffer"]}) == 2)  # epochs 0 and 1
    later = next(k for k, s in enumerate(streamed) if s["position"][0] == 2)
    for k in (mid, boundary, later):
        resumed = _train(spec, num_threads=1)
        resumed.set_state(states[k])
        assert resumed.skipped == states[k]["skipped"]
        _assert_same(_take(resumed, len(full) - k - 1), full[k + 1 :])
    restarted = _train(spec)
    _take(restarted, 1)
    restarted.set_state(states[boundary])  # set_state on a running iterator replaces its position
    _assert_same(_take(restarted, 2), full[boundary + 1 : boundary + 3])
    for field, value in [("seed", 3), ("shuffle_buffer", 8), ("process_count", 2)]:
        with pytest.raises(ValueError, match=field):
            _train(spec, **{field: value}).set_state(states[0])
    with pytest.raises(ValueError, match="not one of a training iterator"):
        _train(spec).set_state({**states[0], "kind": None})


def test_a_shard_deleted_mid_run_is_skipped_and_counted(shards, tmp_path, caplog):
    """A shard removed while training, or before a resume, is one skip each time its turn comes; its samples never
    come again, not even those the shuffle buffer held when the state was saved."""
    root, _ = shards
    copy = tmp_path / "shards"
    shutil.copytree(root, copy)
    spec, gone = _brace(copy), copy / "000000.tar"  # a shard without bad samples
    baseline, live = _train(spec), _train(spec)
    _take(baseline, 20)
    for _ in range(3):
        next(live)  # running on: its producer reads ahead of the batches taken
    state = live.get_state()
    buffered = [i for i in state["streams"][spec]["buffer"] if live.streams[0].reader().url(i[0], i[1]) == str(gone)]
    assert buffered  # the saved buffer holds samples of the shard
    gone.unlink()
    for _ in range(17):  # the running stream goes on (its buffered samples were read before)
        next(live)
    live.close()
    assert live.skipped - baseline.skipped >= 3  # one more skip per epoch, and more epochs for as many samples
    # one epoch read again: exactly one skip more than when the shard was there
    epoch = live.get_state()["streams"][spec]["position"][0] + 1
    reader = live.streams[0].reader({"position": [epoch, 0, 0], "read_skipped": 0})
    while next(reader).id[0] == epoch:
        pass
    reader.close()
    assert reader.skipped == READ_SKIPS + 1 + (reader.url(epoch + 1, 0) == str(gone))
    # resumed after the deletion: the buffered samples of the shard are skipped, counted, and replaced
    resumed = _train(spec)
    resumed.set_state(state)
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="clipjax.data.wds")
    stream = resumed.streams[0].stream(resumed._state["streams"][0])
    assert caplog.text.count("no longer in") == min(len(buffered), 10)
    assert not any(_key_of(next(stream)[1]).startswith("00") for _ in range(3 * USABLE))
    stream.reader.close()
    assert len(_take(resumed, 4)) == 4 and resumed.skipped >= state["skipped"] + len(buffered)
    # a directory spec now lists 5 shards: the stream goes on from the start of the state's epoch
    listed = _train(f"wds:{copy}")
    caplog.clear()
    listed.set_state({**state, "specs": [f"wds:{copy}"], "streams": {f"wds:{copy}": state["streams"][spec]}})
    position = state["streams"][spec]["position"]
    assert "lists 5 shards, 6 when" in caplog.text
    assert listed.get_state()["streams"][f"wds:{copy}"]["position"] == [position[0], 0, 0]
    assert len(_take(listed, 2)) == 2


# ============================================================================================ mixed with ArrayRecord

BAD_RECORDS = {3, 17}  # of the ArrayRecord dataset: a record with an empty caption, one whose image does not decode


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    """An ArrayRecord dataset (``dir:``) of 24 records, two of them bad."""
    from clipjax.data import records

    path = tmp_path_factory.mktemp("ar") / "ds"
    path.mkdir()
    feats = records.image_text_features(["zero", "one"])
    writer = ArrayRecordWriter(str(path / records.shard_filename("mixed", "train", 0, 1)), "group_size:1")
    for i in range(24):
        ex = {"image": _encode(1000 + i, "JPEG"), "captions": [f"record {i}"], "key": f"r{i}", "label": i % 2}
        if i == 3:
            ex["captions"] = [" "]
        if i == 17:
            ex["image"] = b"not an image"
        writer.write(feats.serialize_example(ex))
    writer.close()
    records.write_metadata(path, "mixed", feats, {"train": [24]})
    return path


def _mix(root, records_dir, w=0.6):
    return {_brace(root): w, f"dir:{records_dir}": 1 - w}


def _slots(it, n):
    """(t, source, item) of the first ``n`` slots of ``it`` from its start."""
    taken = collections.deque()
    items = it._slots(it._state, taken=taken)
    out = []
    for _ in range(n):
        item = next(items)
        out.append((item.t, taken[-1][1], item))
    items.close()
    return out


def test_a_mix_with_a_stream_draws_sources_as_an_arrayrecord_mix_and_its_members_as_alone(shards, records_dir):
    """Slot t's source is ``source_choices`` of the weights (as in a mix of ArrayRecord datasets); an ArrayRecord
    slot takes its source's next record in the host's epoch order, a stream slot the stream's next sample; counts
    follow the weights."""
    root, _ = shards
    it = _train(_mix(root, records_dir, 0.7))
    slots = _slots(it, 300)
    choices = pipeline.source_choices(np.array([0.7, 0.3]), seed=0, process_index=0, block=0)
    assert [s for _, s, _ in slots] == list(choices[:300])
    assert abs(np.mean(choices[:300] == 0) - 0.7) < 0.09  # 3.4 sigma
    record_slots = [item for _, s, item in slots if s == 1]
    want = [pipeline.epoch_order(24, seed=0, source=1, epoch=n // 24, process_index=0, process_count=1)[n % 24]
            for n in range(len(record_slots))]
    assert [item.index for item in record_slots] == want and all(item.source == 0 for item in record_slots)
    stream = it.streams[0].stream()  # the stream alone, keyed as member 0 of the mix
    from_stream = [item.where for _, s, item in slots if s == 0]
    assert from_stream == [next(stream)[1].where for _ in from_stream]
    stream.reader.close()
    batches = _take(it, 10)
    state = it.get_state()
    assert all(b["image"].shape == (8, S, S, 3) and b["image"].dtype == np.uint8 for b in batches)
    assert state["counts"] == list(np.bincount(choices[: state["sample"]], minlength=2))
    assert state["streams"][_brace(root)]["sample"] == state["counts"][0]


def test_a_mix_with_a_stream_is_deterministic_for_any_threads_and_workers(shards, records_dir):
    root, _ = shards
    spec = _mix(root, records_dir)
    base = _take(_train(spec, num_threads=2), 6)
    _assert_same(_take(_train(spec, num_threads=1), 6), base)
    _assert_same(_take(_train(spec, workers=1, num_threads=2), 6), base)  # both kinds decoded in a worker process
    other = _take(_train(spec, seed=1), 1)
    assert not np.array_equal(other[0]["image"], base[0]["image"])


def test_a_mix_with_a_stream_resumes_exactly_and_counts_skips_per_source(shards, records_dir):
    root, _ = shards
    spec = _mix(root, records_dir)
    it = _train(spec)
    full, states = [], []
    for _ in range(16):
        full.append(next(it))
        states.append(json.loads(json.dumps(it.get_state())))  # as a checkpoint stores it
    it.close()
    last = states[-1]
    assert last["skipped"] == it.skipped == sum(last["skipped_by_source"])
    assert it.skipped_by_source == dict(zip(spec, last["skipped_by_source"]))
    # each source's skips are its own: the ArrayRecord dataset's bad records, the stream's read and decode skips
    slots = _slots(_train(spec), last["sample"])
    bad_records = sum(1 for _, s, item in slots if s == 1 and item.index in BAD_RECORDS)
    undecodable = sum(1 for _, s, item in slots if s == 0 and item.where.endswith(f":{_key(*UNDECODABLE)}"))
    stream_state = last["streams"][_brace(root)]
    assert bad_records >= 2 and undecodable >= 1
    assert last["skipped_by_source"] == [stream_state["read_skipped"] + undecodable, bad_records]
    assert stream_state["read_skipped"] >= READ_SKIPS
    for k in (2, 7, 11):
        resumed = _train(spec, num_threads=1)
        resumed.set_state(states[k])
        assert resumed.skipped == states[k]["skipped"]
        _assert_same(_take(resumed, len(full) - k - 1), full[k + 1 :])
        assert resumed.get_state() == last
    for field, value in [("seed", 3), ("shuffle_buffer", 8)]:
        with pytest.raises(ValueError, match=field):
            _train(spec, **{field: value}).set_state(states[0])
    with pytest.raises(ValueError, match="specs"):
        _train(spec).set_state(_train(f"dir:{records_dir}").get_state())
    with pytest.raises(ValueError, match="inconsistent"):
        _train(spec).set_state({**states[3], "counts": [0, states[3]["sample"]]})
    reweighted = _train(_mix(root, records_dir, 0.3))  # new weights go on from the same counts
    reweighted.set_state(states[3])
    assert len(_take(reweighted, 2)) == 2


def test_two_hosts_of_a_mix_read_disjoint_shards_and_records(shards, records_dir):
    root, _ = shards
    spec = _mix(root, records_dir)
    taken = []
    for host in range(2):
        it = _train(spec, global_batch_size=16, process_index=host, process_count=2)
        slots = _slots(it, 200)
        taken.append(({item.where.rsplit(":", 1)[1][:2] for _, s, item in slots if s == 0},  # shard numbers
                      [item.index for _, s, item in slots if s == 1]))
        assert len(_take(it, 2)[1]["image"]) == 8
    assert not taken[0][0] & taken[1][0] and {int(k) % 2 for k in taken[1][0]} == {1}
    first_epoch = [set(t[1][:12]) for t in taken]  # 24 records: 12 a host in each epoch, disjoint
    assert not first_epoch[0] & first_epoch[1] and len(first_epoch[0] | first_epoch[1]) == 24


def test_two_streams_of_a_mix_are_shuffled_independently(shards):
    root, _ = shards
    it = _train({_brace(root): 1.0, f"wds:{root}": 1.0})  # the same shards, listed two ways
    a, b = it.streams[0].reader(), it.streams[1].reader()
    assert (a.key, b.key) == ((0,), (1,)) and _train(_brace(root)).streams[0].reader().key == ()  # alone: ()
    assert list(a.order(0)) != list(b.order(0))
    sa, sb = it.streams[0].stream(), it.streams[1].stream()
    assert [next(sa)[1].id for _ in range(20)] != [next(sb)[1].id for _ in range(20)]
    sa.reader.close(), sb.reader.close()
    assert len(_take(it, 3)) == 3
    with pytest.raises(sources.DatasetError, match="one labelled dataset"):
        _train({_brace(root): 1.0, f"wds:{root}": 1.0}, labels=True)


# ============================================================================================ trainer

def _config(spec, total):
    from clipjax.configs.common import base_config

    c = base_config()
    c.model.name = "ViT-T-demo"
    c.batch_size, c.total_steps, c.warmup_steps, c.lr = 8, total, 1, 1e-3
    c.log_every, c.ckpt_every, c.keep_checkpoints, c.async_checkpoints = 1, 2, 10, False
    c.data.train = spec
    return c


def _rows(workdir):
    return {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.mark.slow
def test_the_trainer_runs_on_wds_shards_and_resumes_exactly(shards, tmp_path):
    from clipjax.train import train

    root, _ = shards
    spec = _brace(root)
    ref = tmp_path / "ref"
    train(_config(spec, 4), str(ref))
    rows = _rows(ref)
    assert sorted(rows) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows.values())
    assert rows[4]["data_skipped"] > 0  # filling the 1000-sample buffer read ~30 epochs, 3 skips each
    run = tmp_path / "resumed"
    shutil.copytree(ref, run, ignore=shutil.ignore_patterns("tensorboard"))
    shutil.rmtree(run / "checkpoints" / "4")
    train(_config(spec, 4), str(run))
    again = _rows(run)
    for step in (3, 4):
        assert again[step]["loss"] == rows[step]["loss"]
        assert again[step]["data_skipped"] == rows[step]["data_skipped"]


@pytest.mark.slow
def test_the_trainer_runs_on_a_mix_with_wds_shards_and_resumes_exactly(shards, records_dir, tmp_path):
    from clipjax.train import train

    root, _ = shards
    c = _config("", 4)
    c.data.mix = ((_brace(root), 0.5), (f"dir:{records_dir}", 0.5))  # specs with dots: (spec, weight) pairs
    c.data.shuffle_buffer = 32
    ref = tmp_path / "ref"
    train(c, str(ref))
    rows = _rows(ref)
    assert sorted(rows) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows.values())
    by_source = {k: v for k, v in rows[4].items() if k.startswith("data_skipped/")}  # which source skipped what
    assert set(by_source) == {f"data_skipped/{_brace(root)}", f"data_skipped/dir:{records_dir}"}
    assert sum(by_source.values()) == rows[4]["data_skipped"] and min(by_source.values()) > 0  # both hold bad samples
    run = tmp_path / "resumed"
    shutil.copytree(ref, run, ignore=shutil.ignore_patterns("tensorboard"))
    shutil.rmtree(run / "checkpoints" / "4")
    train(c, str(run))
    again = _rows(run)
    for step in (3, 4):
        assert again[step]["loss"] == rows[step]["loss"]
        assert again[step]["data_skipped"] == rows[step]["data_skipped"]


def test_shards_that_cannot_be_opened_from_the_start_are_one_error_at_once(tmp_path, caplog):
    """A spec whose first shards cannot be opened (a wrong bucket or path, no credentials) is one DatasetError with
    the reason after 4 shards, not a skip per shard of the listing; once a shard opened, later ones that cannot be
    opened are skipped, counted and logged, the earlier failures too."""
    spec = f"wds:{tmp_path}/{{000..099}}.tar"
    _write_tar(tmp_path / "050.tar", [("k", {"jpg": _encode(0, "JPEG"), "txt": b"a caption"})])  # the listing exists
    caplog.set_level(logging.WARNING, logger="clipjax.data.wds")
    with pytest.raises(sources.DatasetError, match=r"the first 4 shards this host read cannot be opened; check the "
                                                   r"path \(last: shard .*\.tar: cannot be opened \(FileNotFoundError"):
        next(_train(spec).streams[0].reader())
    assert "skipping" not in caplog.text  # the error says it: no line per shard before it
    reader = _train(spec).streams[0].reader()
    reader.order(0)[:] = np.roll(np.arange(100), -48)  # shards 48, 49 (missing), 50, 51 (missing), ...
    sample = next(reader)
    assert sample.where.endswith("050.tar:k") and reader.skipped == 2 and caplog.text.count("cannot be opened") == 2
    next(reader)  # the next sample is an epoch later: the other missing shards skipped and counted
    assert reader.skipped == 2 + 97 + list(reader.order(1)).index(50)
    reader.close()
    missing = wds.ShardReader(f"wds:{tmp_path}/x.tar", [str(tmp_path / "x.tar")], seed=0, process_index=0)
    with pytest.raises(sources.DatasetError, match="the first 1 shards"):  # fewer shards than 4: all of them
        next(missing)
