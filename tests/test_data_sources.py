"""Spec strings: a registered TFDS dataset (labels, no captions) is readable by name, prepared without TF; an
ImageFolder of real JPEG/PNG files is read in place for training (with labels) and evaluation; paths resolve."""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clipjax.data import pipeline, sources
from clipjax.data import preprocess as pp
from clipjax.data.tokenizer import get_tokenizer

NAMES = ["sea_lion", "fire truck"]


class ClipjaxTinyClasses(tfds.core.GeneratorBasedBuilder):
    """Six solid images with two class labels, no captions (an ImageNet-like layout)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="png"),
            "label": tfds.features.ClassLabel(names=NAMES),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(np.full((24, 24, 3), 40 * i, np.uint8)).save(buf, format="PNG")
            yield i, {"image": buf.getvalue(), "label": i % 2}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    ClipjaxTinyClasses(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    tfds.core.add_data_dir(str(data_dir))
    return "clipjax_tiny_classes"


@pytest.mark.parametrize("prefix", ["tfds:", ""])
def test_registered_tfds_name_with_template_captions(registered, prefix):
    src = sources.open_source(prefix + registered, "train")
    recs = [src.record(i) for i in range(len(src))]
    assert len(recs) == 6
    for r in recs:
        assert r.captions == [f"a photo of a {NAMES[r.label].replace('_', ' ')}."]
    assert sources.get_classnames(prefix + registered) == ["sea lion", "fire truck"]
    it = pipeline.make_train_iterator(prefix + registered, global_batch_size=4, image_size=16, context_length=12,
                                      tokenizer=get_tokenizer(), seed=0, process_index=0, process_count=1)
    batch = next(it)
    it.close()
    assert batch["image"].shape == (4, 16, 16, 3) and batch["text"].shape == (4, 12)


def test_unknown_and_unprepared_names(registered):
    with pytest.raises(sources.DatasetError, match="'tfds:nope_not_a_dataset'"):
        sources.open_source("tfds:nope_not_a_dataset")
    with pytest.raises(sources.DatasetError, match="not prepared"):
        sources.open_source("tfds:mnist")  # registered in TFDS, never downloaded here
    with pytest.raises(sources.DatasetError, match="no split 'validation'"):
        sources.open_source(registered, "validation")


# ============================================================================================ ImageFolder

FOLDER_CLASSES = ["cat", "fire_truck", "sea_lion"]


def _noise_image(rng, size):
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 class folders of real JPEG and PNG files (one nested), plus things that are not records: a hidden folder,
    a text file, and one corrupt JPEG (a bad record)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(FOLDER_CLASSES):
        (root / name / "more").mkdir(parents=True)
        for i in range(3 + c):
            fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            _noise_image(rng, 24).save(root / name / f"{i}.{ext}", format=fmt, quality=95)
        _noise_image(rng, 28).save(root / name / "more" / "deep.PNG", format="PNG")
        (root / name / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    _noise_image(rng, 24).save(root / ".hidden" / "x.png")
    (root / "sea_lion" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def _folder_files(root):
    """(relative path, label) of every image, in the source's order."""
    out = []
    for label, name in enumerate(FOLDER_CLASSES):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in (".jpg", ".png"))
        out += [(p.relative_to(root).as_posix(), label) for p in files]
    return out


def test_image_folder_source_reads_files_in_place(folder):
    spec = str(folder)
    assert sources.is_image_folder(spec) and sources.source_kind(spec) == "image_folder"
    assert sources.resolve_spec(spec) == spec and sources.splits(spec) == ["test"]
    assert sources.default_split(spec, "zeroshot") == "test"
    assert sources.get_classnames(spec) == sources.get_classnames(spec, "train") == ["cat", "fire truck", "sea lion"]
    src = sources.open_source(spec, "train")
    files = _folder_files(folder)
    assert len(src) == len(files) == 4 + 5 + 7
    for i, (key, label) in enumerate(files):
        rec = src.record(i)
        assert (rec.key, rec.label) == (key, label)
        assert rec.image == (folder / key).read_bytes()
        assert rec.captions == [f"a photo of a {FOLDER_CLASSES[label].replace('_', ' ')}."]
    assert sources.open_source(spec, "test").record(3) == src.record(3)  # one split, any name
    renamed = sources.open_source(spec, classnames=["kitty", "engine", "seal"])
    assert renamed.record(len(src) - 1).captions == ["a photo of a seal."]
    with pytest.raises(sources.DatasetError, match="2 class names given for 3 class folders"):
        sources.open_source(spec, classnames=["a", "b"])


def test_spec_resolution_of_paths(folder, registered, tmp_path):
    with pytest.raises(sources.DatasetError, match="only be given for an ImageFolder"):
        sources.open_source(registered, classnames=["a", "b"])
    (tmp_path / "empty_classes" / "a").mkdir(parents=True)
    with pytest.raises(sources.DatasetError, match="no images"):
        sources.open_source(str(tmp_path / "empty_classes"))
    assert not sources.is_image_folder(tmp_path / "nowhere") and not sources.is_image_folder("scenes")
    assert sources.resolve_spec(str(tmp_path / "nowhere")) == str(tmp_path / "nowhere")


def test_dataset_directory_path_is_dir_spec(tmp_path):
    from clipjax.data import scenes

    ds = scenes.build_scenes(tmp_path / "ds", num_train=6, num_test=2, num_heldout=2, seed=0, workers=0,
                             progress=False)
    for path in (ds, tmp_path):  # the dataset directory, or its parent
        assert not sources.is_image_folder(str(path)) and sources.resolve_spec(str(path)) == f"dir:{path}"
    a, b = sources.open_source(str(tmp_path), "train"), sources.open_source(f"dir:{ds}", "train")
    assert len(a) == len(b) == 6 and a.record(5) == b.record(5)
    assert sources.splits(str(ds)) == sources.splits(f"dir:{ds}") and "heldout" in sources.splits(str(ds))


def _train_folder(spec, **kw):
    args = dict(global_batch_size=5, image_size=24, context_length=12, tokenizer=get_tokenizer(), seed=0,
                process_index=0, process_count=1, scale=(1.0, 1.0), labels=True)
    return pipeline.make_train_iterator(spec, **{**args, **kw})


def test_image_folder_trains_with_labels(folder):
    """Each row is a file of the folder, transformed exactly as the direct transform does it, with its folder's
    label and caption; the corrupt file is skipped and counted."""
    tok = get_tokenizer()
    direct = {}  # full-image transform (scale 1 on square images) → (key, label)
    for key, label in _folder_files(folder):
        try:
            image = pp.train_crop((folder / key).read_bytes(), 24, np.random.default_rng(0), scale=(1.0, 1.0))
        except ValueError:
            assert key.endswith("broken.jpg")
            continue
        direct[image.tobytes()] = (key, label)
    assert len(direct) == 15
    it = _train_folder(str(folder))
    assert it.classnames == ["cat", "fire truck", "sea lion"]
    batches = [next(it) for _ in range(6)]  # 30 rows: two epochs of 16 slots hold at least 30 good ones
    it.close()
    seen = []
    for b in batches:
        assert b["label"].dtype == np.int32 and b["label"].shape == (5,)
        for image, label, text in zip(b["image"], b["label"], b["text"]):
            key, want = direct[image.tobytes()]
            assert label == want
            caption = f"a photo of a {it.classnames[label]}."
            np.testing.assert_array_equal(text, tok([caption], 12)[0])
            seen.append(key)
    assert set(seen[:15]) == {k for k, _ in direct.values()}  # the first epoch: every good file once
    assert it.skipped >= 1 and it.get_state()["sample"] == 30 + it.skipped


def test_image_folder_eval_batches(folder):
    from clipjax.evaluate import datasets

    files = [f for f in _folder_files(folder) if not f[0].endswith("broken.jpg")]
    data, names, split = datasets.open_eval_data(str(folder), None, task="zeroshot", image_size=16, batch_size=6)
    batches = list(data)
    assert names == ["cat", "fire truck", "sea lion"] and split == "test" and data.skipped == 1
    assert [int(b["mask"].sum()) for b in batches] == [6, 6, 3] and len(data) == 3
    keys = [k for b in batches for k, m in zip(b["key"], b["mask"]) if m]
    assert keys == [k for k, _ in files]
    rows = [(b["image"][i], b["label"][i], b["captions"][i]) for b in batches for i in range(6) if b["mask"][i]]
    for (key, label), (image, got, captions) in zip(files, rows):
        np.testing.assert_array_equal(image, pp.preprocess(folder / key, 16))
        assert got == label and captions == [f"a photo of a {names[label]}."]
    last = batches[-1]
    assert not last["image"][3:].any() and (last["label"][3:] == -1).all() and last["key"][3:] == [""] * 3
    # max_examples: evenly spaced over the class-sorted files, so every class stays represented
    few, _, _ = datasets.open_eval_data(str(folder), "test", task="zeroshot", image_size=16, batch_size=6,
                                        max_examples=4)
    labels = [int(x) for b in few for x, m in zip(b["label"], b["mask"]) if m]
    assert few.num_examples == 4 and sorted(set(labels)) == [0, 1, 2]
    # class names given: labels unchanged, names and captions renamed
    renamed, names, _ = datasets.open_eval_data(str(folder), "test", task="zeroshot", image_size=16, batch_size=6,
                                                classnames=["kitty", "engine", "seal"])
    first = next(iter(renamed))
    assert names == ["kitty", "engine", "seal"] and first["captions"][0] == ["a photo of a kitty."]
    np.testing.assert_array_equal(first["label"], batches[0]["label"])


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_mix_weights_must_be_positive_and_finite(weight):
    with pytest.raises(sources.DatasetError, match=r"dataset mix weights must be positive and finite, got \{'b': "):
        sources.resolve_specs({"a": 1.0, "b": weight})
    assert sources.resolve_specs({"a": 1.0, "b": 3.0}) == (["a", "b"], [0.25, 0.75])


@pytest.mark.parametrize("scale", [(0.0, 1.0), (0.9, 0.5), (0.5, 1.5)])
def test_a_crop_scale_that_cannot_crop_is_refused_when_the_iterator_is_made(scale):
    """(0, 1) made every record fail to crop ("float division by zero"), skipped until TooManyBadRecords."""
    with pytest.raises(ValueError, match=r"crop scale .*: must be \(MIN, MAX\) with 0 < MIN <= MAX <= 1"):
        pipeline.make_train_iterator("scenes", global_batch_size=8, image_size=32, context_length=16,
                                     tokenizer=get_tokenizer(), seed=0, process_index=0, process_count=1, scale=scale)
