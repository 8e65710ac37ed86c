"""Spec strings: a registered TFDS dataset (labels, no captions) is readable by name, prepared without TF."""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clipjax.data import pipeline, sources
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
