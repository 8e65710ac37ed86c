"""Opening dataset specs as random-access sources of (image bytes, captions, key, label) records.

Spec strings:

    "scenes"         the embedded procedural dataset (``clipjax.data.scenes``), built on first use in
                     ``$CLIPJAX_DATA_DIR`` or ``~/.cache/clipjax/datasets``
    "dir:PATH"       a TFDS data directory with ArrayRecord shards (written by ``clipjax.data.ingest``, by
                     ``scenes.build_scenes`` or by TFDS itself); PATH is the directory holding
                     ``dataset_info.json``, or a parent with exactly one such directory below it
    "tfds:NAME"      a registered TFDS dataset already prepared in ArrayRecord format in TFDS's data dir
    "NAME"           (also accepted: ``NAME[/config][:version]``, as ``tfds.builder`` takes it)

Records of foreign TFDS datasets are mapped as: image ← ``image``; captions ← ``captions`` (list),
``caption`` or ``text``; label ← ``label``. A labelled dataset without captions gets one caption per
record from the template ``"a photo of a {}."`` with the class name (``_`` read as a space).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from clipjax.data import records

SCENES = "scenes"
DIR_PREFIX = "dir:"
TFDS_PREFIX = "tfds:"
CAPTION_KEYS = ("captions", "caption", "text")
CLASS_TEMPLATE = "a photo of a {}."


class DatasetError(ValueError):
    """A dataset spec that cannot be opened (unknown, missing, empty or of the wrong format)."""


@dataclasses.dataclass(frozen=True)
class Record:
    image: bytes
    captions: list[str]
    key: str
    label: int


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _is_text(feature) -> bool:
    if isinstance(feature, tfds.features.Sequence):
        feature = feature.feature
    return isinstance(feature, tfds.features.Text)


def _find_dataset_dir(path: pathlib.Path, spec: str) -> pathlib.Path:
    if not path.is_dir():
        raise DatasetError(f"dataset {spec!r}: directory {path} does not exist")
    if records.is_dataset_dir(path):
        return path
    found = sorted(p.parent for p in path.glob("*/dataset_info.json")) + sorted(
        p.parent for p in path.glob("*/*/dataset_info.json")
    )
    found = [p for p in found if not p.name.endswith(".incomplete")]
    if len(found) != 1:
        what = "no dataset_info.json" if not found else f"{len(found)} datasets ({', '.join(map(str, found))})"
        raise DatasetError(f"dataset {spec!r}: {path} holds {what}; point dir: at one dataset directory")
    return found[0]


@functools.lru_cache(maxsize=64)
def _builder_from_dir(path: str, stamp: int) -> tfds.core.DatasetBuilder:
    del stamp  # part of the cache key: a rewritten dataset is read again
    return tfds.builder_from_directory(path)


def _open_dir(path: pathlib.Path) -> tfds.core.DatasetBuilder:
    return _builder_from_dir(os.fspath(path), (path / "dataset_info.json").stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _tfds_builder(spec: str) -> tfds.core.DatasetBuilder:
    name = spec[len(TFDS_PREFIX):] if spec.startswith(TFDS_PREFIX) else spec
    if not name:
        raise DatasetError(f"unknown dataset spec {spec!r}: expected 'scenes', 'dir:PATH' or a TFDS name")
    try:
        builder = tfds.builder(name)
    except Exception as e:  # tfds raises several types for unknown names
        raise DatasetError(
            f"unknown dataset spec {spec!r}: expected 'scenes', 'dir:PATH' or a registered TFDS name "
            f"({type(e).__name__})"
        ) from None
    if not builder.is_prepared():
        raise DatasetError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir} (clipjax never downloads)")
    return builder


def builder(spec: str) -> tfds.core.DatasetBuilder:
    """The TFDS builder behind ``spec`` (raises ``DatasetError`` naming the spec on failure)."""
    if not isinstance(spec, str):
        raise DatasetError(f"dataset spec must be a string, got {type(spec).__name__}")
    if spec == SCENES:
        from clipjax.data import scenes  # builds on first use

        return _open_dir(scenes.ensure_scenes())
    if spec.startswith(DIR_PREFIX):
        return _open_dir(_find_dataset_dir(pathlib.Path(spec[len(DIR_PREFIX):]).expanduser(), spec))
    return _tfds_builder(spec)


def splits(spec: str) -> list[str]:
    return list(builder(spec).info.splits)


class Source:
    """Random-access records of one split of a dataset. Thread-safe; ``len`` is the number of records."""

    def __init__(self, spec: str, split: str):
        b = builder(spec)
        info = b.info
        if split not in info.splits:
            raise DatasetError(f"dataset {spec!r} has no split {split!r}; splits: {sorted(info.splits)}")
        if info.splits[split].num_examples == 0:
            raise DatasetError(f"dataset {spec!r} split {split!r} is empty")
        features = info.features
        if "image" not in features or not isinstance(features["image"], tfds.features.Image):
            raise DatasetError(f"dataset {spec!r} has no 'image' Image feature")
        self.spec, self.split = spec, split
        self.name = info.name
        self._caption_key = next((k for k in CAPTION_KEYS if k in features and _is_text(features[k])), None)
        label = features["label"] if "label" in features else None
        self.classnames: list[str] | None = (
            list(label.names) if isinstance(label, tfds.features.ClassLabel) else None
        )
        if self._caption_key is None and self.classnames is None:
            raise DatasetError(f"dataset {spec!r} has neither captions ({'/'.join(CAPTION_KEYS)}) nor class labels")
        self._has_label = label is not None
        try:  # raw serialized records: the few fields needed are read from the proto directly (~80x faster)
            self._data = b.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        except Exception as e:
            raise DatasetError(f"dataset {spec!r} split {split!r} cannot be read as a data source: {e}") from None

    def __len__(self) -> int:
        return len(self._data)

    def record(self, index: int) -> Record:
        """Record ``index`` (raises on a corrupt serialized record)."""
        fields = tf_example_pb2.Example.FromString(self._data[index]).features.feature
        if "image" not in fields or not fields["image"].bytes_list.value:
            raise ValueError(f"record {index} of {self.spec!r} split {self.split!r} has no image")
        label = int(fields["label"].int64_list.value[0]) if self._has_label and "label" in fields else -1
        if self._caption_key is None:
            captions = [CLASS_TEMPLATE.format(self.classnames[label].replace("_", " "))] if label >= 0 else []
        elif self._caption_key in fields:
            captions = [_text(c) for c in fields[self._caption_key].bytes_list.value]
        else:
            captions = []
        key = _text(fields["key"].bytes_list.value[0]) if "key" in fields else f"{self.split}-{index}"
        return Record(image=fields["image"].bytes_list.value[0], captions=captions, key=key, label=label)


def open_source(spec: str, split: str = "train") -> Source:
    return Source(spec, split)


def metadata(spec: str) -> dict:
    return dict(builder(spec).info.metadata or {})


def split_class_ids(spec: str, split: str) -> list[int] | None:
    """Global label ids of ``split``'s own class list (e.g. the scenes' held-out pairs), or None."""
    ids = metadata(spec).get("split_classes", {}).get(split)
    return list(ids) if ids is not None else None


def get_classnames(spec: str, split: str | None = None) -> list[str]:
    """Class names for zero-shot: ``split``'s own class list when the dataset declares one (scenes'
    ``heldout``/``test``), otherwise the dataset's ``ClassLabel`` names (label ``i`` ↔ name ``i``)."""
    b = builder(spec)
    if split is not None and split not in b.info.splits:
        raise DatasetError(f"dataset {spec!r} has no split {split!r}; splits: {sorted(b.info.splits)}")
    label = b.info.features["label"] if "label" in b.info.features else None
    if not isinstance(label, tfds.features.ClassLabel):
        raise DatasetError(f"dataset {spec!r} has no class labels")
    names = [n.replace("_", " ") for n in label.names]
    ids = split_class_ids(spec, split) if split is not None else None
    return [names[i] for i in ids] if ids is not None else names


def resolve_specs(spec_or_mix: str | dict[str, float] | Sequence[str]) -> tuple[list[str], list[float]]:
    """``"spec"`` or ``{spec: weight}`` → (specs, normalised weights)."""
    if isinstance(spec_or_mix, str):
        return [spec_or_mix], [1.0]
    if isinstance(spec_or_mix, dict):
        if not spec_or_mix:
            raise DatasetError("empty dataset mix")
        bad = {k: v for k, v in spec_or_mix.items() if not (float(v) > 0)}
        if bad:
            raise DatasetError(f"dataset mix weights must be > 0, got {bad}")
        total = float(sum(spec_or_mix.values()))
        return list(spec_or_mix), [float(v) / total for v in spec_or_mix.values()]
    raise DatasetError(f"dataset spec must be a string or a {{spec: weight}} dict, got {type(spec_or_mix).__name__}")
