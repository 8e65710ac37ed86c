"""On-disk format of clipjax datasets: TFDS-compatible ArrayRecord shards, written without TensorFlow.

A dataset directory (what the ``"dir:PATH"`` spec opens) is a TFDS data directory::

    DIR/dataset_info.json, features.json, metadata.json, label.labels.txt
    DIR/{name}-{split}.array_record-{i:05d}-of-{n:05d}

so ``tfds.builder_from_directory(DIR).as_data_source(split)`` reads it, and
``grain.sources.ArrayRecordDataSource`` reads the raw shards (records are serialized ``tf.train.Example``
protos, parsed with ``features.deserialize_example_np``).

One record (the ``image_text_features`` spec):

    image     encoded image bytes exactly as written (JPEG/PNG/WebP), never re-encoded
    captions  list of strings (one or more)
    key       unique string key
    label     int class id (``ClassLabel`` when the dataset has class names, else -1)
    meta      dict of per-dataset attribute fields (optional, e.g. the scenes' colour/shape/count)

Shards are written by ``ShardWriter`` (``group_size:1``, the layout TFDS uses for random access);
``write_metadata`` then adds the TFDS metadata with ``tfds.folder_dataset.write_metadata`` (its
``check_data`` step needs TensorFlow, so it is off). Dataset-level extras (class names per split, builder
parameters) go into TFDS's ``metadata.json`` and come back as ``builder.info.metadata``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter

FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
FILE_SUFFIX = "array_record"


def image_text_features(
    classnames: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> tfds.features.FeaturesDict:
    """The record spec. ``meta`` maps field name -> ``"text"`` | ``"int"``."""
    label = (
        tfds.features.ClassLabel(names=list(classnames))
        if classnames
        else tfds.features.Scalar(np.int64)
    )
    feats: dict[str, Any] = {
        "image": tfds.features.Image(encoding_format=None),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "key": tfds.features.Text(),
        "label": label,
    }
    if meta:
        kinds = {"text": tfds.features.Text, "int": lambda: tfds.features.Scalar(np.int64)}
        feats["meta"] = tfds.features.FeaturesDict({k: kinds[v]() for k, v in meta.items()})
    return tfds.features.FeaturesDict(feats)


def shard_filename(name: str, split: str, index: int, count: int) -> str:
    return f"{name}-{split}.{FILE_SUFFIX}-{index:05d}-of-{count:05d}"


class ShardWriter:
    """Writes serialized records to one ArrayRecord shard (via a temp file, renamed on close)."""

    def __init__(self, path: str | os.PathLike, features: tfds.features.FeaturesDict):
        self.path = pathlib.Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._features = features
        self._writer = ArrayRecordWriter(os.fspath(self._tmp), "group_size:1")
        self.count = 0
        self.image_bytes = 0

    def write(self, example: Mapping[str, Any]) -> None:
        self._writer.write(self._features.serialize_example(example))
        self.count += 1
        self.image_bytes += len(example["image"])

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.path)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)


def write_metadata(
    directory: str | os.PathLike,
    name: str,
    features: tfds.features.FeaturesDict,
    shard_lengths: Mapping[str, Sequence[int]],
    *,
    description: str = "",
    metadata: Mapping[str, Any] | None = None,
    version: str = "1.0.0",
    shard_bytes: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Writes TFDS metadata for the shards ``{name}-{split}.array_record-*`` already in ``directory``; with
    ``shard_bytes`` (the size of each shard, by split) the shards are not looked at, so the metadata can be written
    apart from them (to be copied next to shards in an object store)."""
    directory = pathlib.Path(directory)
    template = tfds.core.ShardedFileTemplate(
        data_dir=directory, template=FILE_TEMPLATE, dataset_name=name, filetype_suffix=FILE_SUFFIX
    )
    split_infos = []
    for split, lengths in shard_lengths.items():
        if shard_bytes is not None:
            num_bytes = sum(shard_bytes[split])
        else:
            files = [directory / shard_filename(name, split, i, len(lengths)) for i in range(len(lengths))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise FileNotFoundError(f"{directory}: split {split!r} is missing shards {missing}")
            num_bytes = sum(f.stat().st_size for f in files)
        split_infos.append(
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=list(lengths),
                num_bytes=num_bytes,
                filename_template=template.replace(split=split),
            )
        )
    tfds.folder_dataset.write_metadata(
        data_dir=directory,
        features=features,
        split_infos=split_infos,
        filename_template=template,
        version=version,
        check_data=False,  # reading back through as_dataset would need TensorFlow
        description=description,
        metadata=tfds.core.MetadataDict(metadata or {}),
    )


def is_dataset_dir(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / "dataset_info.json").is_file()
