"""Dataset specs opened as sources of (image bytes, captions, key, label) records: clipjax's one spec parser.

Spec strings:

    "scenes"         the embedded procedural dataset (``clipjax.data.scenes``), built on first use in
                     ``$CLIPJAX_DATA_DIR`` or ``$XDG_CACHE_HOME/clipjax/datasets`` (``~/.cache/clipjax/datasets``)
    "dir:PATH"       a TFDS data directory with ArrayRecord shards (written by ``clipjax.data.ingest``, by
                     ``scenes.build_scenes`` or by TFDS itself); PATH is the directory holding
                     ``dataset_info.json``, or a parent with exactly one such directory below it
    "tfds:NAME"      a registered TFDS dataset already prepared in ArrayRecord format in TFDS's data dir
    "NAME"           (also accepted: ``NAME[/config][:version]``, as ``tfds.builder`` takes it)
    PATH             a directory: the same as "dir:PATH" when it (or a folder one or two levels below) holds
                     ``dataset_info.json``; otherwise an ImageFolder when it has class subfolders
    "wds:PATTERN"    webdataset tar shards streamed in place for training (``clipjax.data.wds``): a brace pattern
                     (``/data/{00000..00099}.tar``), a directory of ``*.tar``, a glob or one shard; local, or on
                     gs://, s3://, ... through fsspec

``resolve_spec`` writes a spec in the canonical form above ("dir:PATH" for a dataset directory given as PATH).

Kinds of source:

    random access    ``open_source(spec, split)``: ``len(src)`` records, ``src.record(i)`` → ``Record``,
                     thread-safe. ``ArrayRecordSource`` (TFDS/ArrayRecord datasets) and ``ImageFolderSource``.
    streaming        ``wds:`` specs (``source_kind`` → "stream"): samples in shard order, without random access, read
                     by ``clipjax.data.wds`` (``make_train_iterator`` hands them to it); training only:
                     ``open_source`` refuses them with one line.

ImageFolder: ROOT/CLASS/.../IMAGE, read in place. Classes are the non-hidden subfolders in sorted order; a record's
label is its folder's index, its key the image path relative to ROOT, its caption ``"a photo of a {class}."``
with the class name being the folder name with ``_`` read as a space; the image bytes are read when the record is.
An ImageFolder is a single split: it opens under any split name (training reads it as "train", evaluation as
"test") and always holds all its images; ``splits`` lists it as ``"test"``.

Records of foreign TFDS datasets are mapped as: image ← ``image``; captions ← ``captions`` (list),
``caption`` or ``text``; label ← ``label``. A labelled dataset without captions gets one caption per
record from the template ``"a photo of a {}."`` with the class name (``_`` read as a space).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import pathlib
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from clipjax.data import records

SCENES = "scenes"
DIR_PREFIX = "dir:"
TFDS_PREFIX = "tfds:"
WDS_PREFIX = "wds:"
CAPTION_KEYS = ("captions", "caption", "text")
CLASS_TEMPLATE = "a photo of a {}."
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
IMAGE_FOLDER_SPLIT = "test"  # the name ``splits`` lists for an ImageFolder's single split


class DatasetError(ValueError):
    """A dataset spec that cannot be opened (unknown, missing, empty or of the wrong format)."""


@dataclasses.dataclass(frozen=True)
class Record:
    image: bytes
    captions: list[str]
    key: str
    label: int  # class id, -1 when the record has none


class RandomAccessSource(Protocol):
    """What ``open_source`` returns: records of one split by index."""

    spec: str
    split: str

    def __len__(self) -> int: ...

    def record(self, index: int) -> Record:
        """Record ``index``; raises on a record that cannot be read."""


# ============================================================================================ spec resolution

def _dataset_info_dirs(path: pathlib.Path) -> list[pathlib.Path]:
    """Folders one or two levels below ``path`` that hold ``dataset_info.json`` (TFDS's own included)."""
    return sorted(p.parent for p in path.glob("*/dataset_info.json")) + sorted(
        p.parent for p in path.glob("*/*/dataset_info.json"))


def _class_folders(root: pathlib.Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@functools.lru_cache(maxsize=256)
def _holds_image_folder(path: str, stamp: int) -> bool:
    del stamp  # part of the cache key: the folder's own mtime (a class folder added or removed)
    p = pathlib.Path(path)
    return not records.is_dataset_dir(p) and not _dataset_info_dirs(p) and bool(_class_folders(p))


def is_image_folder(spec: str | os.PathLike) -> bool:
    """A directory of class subfolders that is not a dataset directory (nor a "scenes"/"dir:"/"tfds:"/"wds:" spec)."""
    if str(spec) == SCENES or str(spec).startswith((DIR_PREFIX, TFDS_PREFIX, WDS_PREFIX)):
        return False
    p = pathlib.Path(spec).expanduser()
    try:  # the folder scan (two levels, every class folder) is remembered per folder mtime
        return p.is_dir() and _holds_image_folder(os.fspath(p.resolve()), p.stat().st_mtime_ns)
    except OSError:
        return False


def resolve_spec(spec: str) -> str:
    """``spec`` in canonical form: a directory PATH that is not an ImageFolder → "dir:PATH"; others unchanged."""
    if not isinstance(spec, str):
        raise DatasetError(f"dataset spec must be a string, got {type(spec).__name__}")
    if spec == SCENES or spec.startswith((DIR_PREFIX, TFDS_PREFIX, WDS_PREFIX)) or is_image_folder(spec):
        return spec
    p = pathlib.Path(spec).expanduser()
    return f"{DIR_PREFIX}{p}" if p.is_dir() else spec


def source_kind(spec: str) -> str:
    """"stream" (wds:), "image_folder" or "tfds" (ArrayRecord datasets: scenes, dir:, tfds:, NAME)."""
    if str(spec).startswith(WDS_PREFIX):
        return "stream"
    return "image_folder" if is_image_folder(spec) else "tfds"


def _stream_only(spec: str) -> DatasetError:
    return DatasetError(f"dataset {spec!r} is a stream of webdataset shards, read for training only (no random "
                        f"access, no splits); to evaluate on it, ingest it first (python -m clipjax.data.ingest)")


# ============================================================================================ TFDS / ArrayRecord

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
    found = [p for p in _dataset_info_dirs(path) if not p.name.endswith(".incomplete")]
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
            f"unknown dataset spec {spec!r}: expected 'scenes', 'dir:PATH', an ImageFolder PATH or a registered "
            f"TFDS name ({type(e).__name__})"
        ) from None
    if not builder.is_prepared():
        raise DatasetError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir} (clipjax never downloads)")
    return builder


def builder(spec: str) -> tfds.core.DatasetBuilder:
    """The TFDS builder behind ``spec`` (raises ``DatasetError`` naming the spec on failure)."""
    spec = resolve_spec(spec)
    if source_kind(spec) == "stream":
        raise _stream_only(spec)
    if spec == SCENES:
        from clipjax.data import scenes  # builds on first use

        return _open_dir(scenes.ensure_scenes())
    if spec.startswith(DIR_PREFIX):
        if "://" in spec:  # ArrayRecord reads local files only (google/array_record#120)
            raise DatasetError(f"dataset {spec!r}: ArrayRecord datasets are read from local disks only; stream "
                               f"webdataset shards from the object store (wds:gs://BUCKET/...) or copy the dataset "
                               f"to a local disk")
        return _open_dir(_find_dataset_dir(pathlib.Path(spec[len(DIR_PREFIX):]).expanduser(), spec))
    if is_image_folder(spec):
        raise DatasetError(f"dataset {spec!r} is an ImageFolder, not a TFDS dataset")
    return _tfds_builder(spec)


class ArrayRecordSource:
    """Random-access records of one split of a TFDS/ArrayRecord dataset. Thread-safe; ``len`` is the number of
    records."""

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


Source = ArrayRecordSource  # the name earlier code imports


# ============================================================================================ ImageFolder

class ImageFolderSource:
    """Random-access records of an ImageFolder read in place (see the module docstring). Thread-safe.

    ``classnames``: display names replacing the folder-derived ones (one per class folder, in sorted folder
    order); the captions use them.
    """

    def __init__(self, spec: str, split: str = IMAGE_FOLDER_SPLIT, classnames: Sequence[str] | None = None):
        self.spec, self.split = spec, split
        self.root = pathlib.Path(spec).expanduser()
        folders = _class_folders(self.root) if self.root.is_dir() else []
        if not folders:
            raise DatasetError(f"dataset {spec!r}: no class subfolders (expected ROOT/CLASS/IMAGE files)")
        if classnames is not None and len(classnames) != len(folders):
            raise DatasetError(f"{len(classnames)} class names given for {len(folders)} class folders in {self.root}")
        self.classnames = list(classnames) if classnames is not None else [f.replace("_", " ") for f in folders]
        self._items: list[tuple[str, int]] = []  # (path relative to root, label)
        for label, folder in enumerate(folders):
            for path in sorted((self.root / folder).rglob("*")):
                if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTS:
                    self._items.append((path.relative_to(self.root).as_posix(), label))
        if not self._items:
            raise DatasetError(f"dataset {spec!r}: no images with extensions {IMAGE_EXTS} in the class folders")

    def __len__(self) -> int:
        return len(self._items)

    def record(self, index: int) -> Record:
        """Record ``index``: its file's bytes as stored (raises if the file cannot be read)."""
        key, label = self._items[index]
        image = (self.root / key).read_bytes()
        return Record(image=image, captions=[CLASS_TEMPLATE.format(self.classnames[label])], key=key, label=label)


# ============================================================================================ public

def open_source(spec: str, split: str = "train", *, classnames: Sequence[str] | None = None) -> RandomAccessSource:
    """The random-access source of ``spec``/``split``. ``classnames`` renames an ImageFolder's classes (refused
    for other kinds, whose class names come from the dataset)."""
    spec_kind = source_kind(resolve_spec(spec))
    if spec_kind == "stream":
        raise _stream_only(spec)
    if spec_kind == "image_folder":
        return ImageFolderSource(spec, split, classnames)
    if classnames is not None:
        raise DatasetError(f"dataset {spec!r}: class names can only be given for an ImageFolder")
    return ArrayRecordSource(spec, split)


class SourceSet:
    """``open_source`` of each spec, opened on first use in each process: pickles as its specs, split and
    options, so a loader holding one can be sent to a worker process. ``set[i]`` is the source of ``specs[i]``."""

    def __init__(self, specs: Sequence[str], split: str, *, classnames: Sequence[str] | None = None,
                 opened: Sequence[RandomAccessSource] | None = None):
        self.specs, self.split = list(specs), split
        self.classnames = list(classnames) if classnames is not None else None
        self._opened = list(opened) if opened is not None else None
        self._lock = threading.Lock()

    def _open(self) -> list[RandomAccessSource]:
        with self._lock:
            if self._opened is None:
                self._opened = [open_source(s, self.split, classnames=self.classnames) for s in self.specs]
            return self._opened

    def __getitem__(self, i: int) -> RandomAccessSource:
        return (self._opened or self._open())[i]

    def __len__(self) -> int:
        return len(self.specs)

    def __getstate__(self) -> dict:
        return {"specs": self.specs, "split": self.split, "classnames": self.classnames}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["specs"], state["split"], classnames=state["classnames"])


def splits(spec: str) -> list[str]:
    """The split names of ``spec`` (an ImageFolder's single split is listed as ``IMAGE_FOLDER_SPLIT``)."""
    if is_image_folder(spec):
        return [IMAGE_FOLDER_SPLIT]
    return list(builder(spec).info.splits)


def default_split(spec: str, task: str) -> str:
    """The split evaluated when none is given: scenes' ``heldout`` for zero-shot (``test`` otherwise); for other
    datasets the first of test / validation / val / train that exists (an ImageFolder: ``test``)."""
    if spec == SCENES:
        return "heldout" if task == "zeroshot" else "test"
    names = splits(spec)
    for split in ("test", "validation", "val", "train"):
        if split in names:
            return split
    return names[0]


def metadata(spec: str) -> dict:
    """TFDS ``info.metadata`` of ``spec`` ({} for an ImageFolder)."""
    if is_image_folder(spec):
        return {}
    return dict(builder(spec).info.metadata or {})


def split_class_ids(spec: str, split: str) -> list[int] | None:
    """Global label ids of ``split``'s own class list (e.g. the scenes' held-out pairs), or None."""
    ids = metadata(spec).get("split_classes", {}).get(split)
    return list(ids) if ids is not None else None


def get_classnames(spec: str, split: str | None = None) -> list[str]:
    """Class names for zero-shot: ``split``'s own class list when the dataset declares one (scenes'
    ``heldout``/``test``), otherwise the dataset's ``ClassLabel`` names (label ``i`` ↔ name ``i``); an
    ImageFolder's folder names (any split). ``_`` is read as a space."""
    if is_image_folder(spec):
        root = pathlib.Path(spec).expanduser()
        return [f.replace("_", " ") for f in _class_folders(root)]
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
        bad = {k: v for k, v in spec_or_mix.items()
               if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 < float(v) < math.inf)}
        if bad:
            raise DatasetError(f"dataset mix weights must be positive and finite, got {bad} (numbers, not booleans)")
        weights = [float(v) for v in spec_or_mix.values()]
        total = float(sum(weights))
        if not math.isfinite(total):  # finite weights whose sum overflows (1e308, 1e308): their ratios are what count
            top = max(weights)
            weights = [w / top for w in weights]
            total = float(sum(weights))
        return list(spec_or_mix), [w / total for w in weights]
    raise DatasetError(f"dataset spec must be a string or a {{spec: weight}} dict, got {type(spec_or_mix).__name__}")
