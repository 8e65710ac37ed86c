"""Saved training-iterator states and the batches that follow them: the datasets, the iterators and the fixtures of
``tests/test_data_states.py``.

``python tests/data_states.py`` (from the repository root) builds small datasets of every source kind (ArrayRecord
datasets written by ``clipjax.data.scenes``, an ImageFolder with an image that does not decode, webdataset shards with
a sample without a caption and an image that does not decode), reads ``BATCHES`` batches of each case below from the
start, and writes ``fixtures/data_states/CASE.json``: the arguments, the state after each batch (``get_state()``,
the dataset root written as ``@ROOT@``) and the sha256 of each batch's arrays. The states kept there were written by
the three iterators clipjax had before they became one (ArrayRecord, ``wds:`` stream, mix with streams): the test
restores them with today's iterator and checks that it yields the same batches and reaches the same positions.

Every dataset is made of lossless PNGs from seeded generators: the same pixels on any machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import sys
import tarfile

import numpy as np

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data_states"
ROOT = "@ROOT@"
BATCHES = 7  # batches read per case; the test resumes from the state after batch RESUME_AT
RESUME_AT = 3

_COMMON = dict(global_batch_size=8, image_size=24, context_length=12, seed=3, process_index=0, process_count=1,
               num_threads=2)
CASES = {  # name → (spec or mix, keyword arguments of make_train_iterator beyond _COMMON)
    "arrayrecord": ("dir:@ROOT@/a", dict(process_index=1, process_count=2)),
    "arrayrecord_mix": ({"dir:@ROOT@/a": 0.6, "dir:@ROOT@/b": 0.4}, {}),
    "imagefolder_labels": ("@ROOT@/folder", dict(labels=True)),
    "imagefolder_mix": ({"@ROOT@/folder": 0.5, "dir:@ROOT@/b": 0.5}, {}),
    "wds": ("wds:@ROOT@/shards/{0..2}.tar", dict(shuffle_buffer=4)),
    "wds_hosts": ("wds:@ROOT@/shards", dict(shuffle_buffer=3, process_index=1, process_count=2)),
    "wds_mix": ({"wds:@ROOT@/shards/{0..2}.tar": 0.5, "dir:@ROOT@/a": 0.3, "@ROOT@/folder": 0.2},
                dict(shuffle_buffer=4)),
}


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def build(root: pathlib.Path) -> pathlib.Path:
    """The datasets of ``CASES`` under ``root`` (a, b: ArrayRecord; folder: an ImageFolder; shards: 3 tar shards)."""
    from clipjax.data import scenes

    root = pathlib.Path(root)
    scenes.build_scenes(root / "a", num_train=40, num_test=2, num_heldout=2, image_size=32, seed=0, workers=0,
                        progress=False)
    scenes.build_scenes(root / "b", num_train=24, num_test=2, num_heldout=2, image_size=32, seed=1, workers=0,
                        progress=False)
    rng = np.random.default_rng(7)
    for c, name in enumerate(["red_ball", "green_leaf", "blue_sky"]):
        (root / "folder" / name).mkdir(parents=True)
        for i in range(5):
            base = np.array([[200, 30, 30], [30, 190, 40], [40, 60, 230]][c])
            px = np.clip(base + rng.integers(-40, 40, (30 + 2 * i, 36, 3)), 0, 255).astype(np.uint8)
            (root / "folder" / name / f"{i}.png").write_bytes(_png(px))
    (root / "folder" / "green_leaf" / "9.png").write_bytes(b"not an image")
    (root / "shards").mkdir()
    for s in range(3):
        with tarfile.open(root / "shards" / f"{s}.tar", "w") as tar:
            for i in range(6):
                key = f"{s}{i:03d}"
                files = {"png": _png(rng.integers(0, 256, (28, 34, 3), dtype=np.uint8))}
                if (s, i) == (1, 3):
                    files["png"] = b"these bytes are not an image"
                if (s, i) != (2, 1):  # a sample without a caption
                    files["txt" if i % 2 else "json"] = (f"sample {s} {i}".encode() if i % 2 else
                                                         json.dumps({"caption": f"json {s} {i}"}).encode())
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def _rooted(value, root: str):
    """``value`` (a spec, a mix, a state) with ``@ROOT@`` replaced by ``root``."""
    return json.loads(json.dumps(value).replace(ROOT, root))


def spec_of(case: str, root: pathlib.Path):
    return _rooted(CASES[case][0], str(root))


def make(case: str, root: pathlib.Path):
    """The training iterator of ``case`` over the datasets under ``root``."""
    from clipjax.data import pipeline
    from clipjax.data.tokenizer import get_tokenizer

    spec, kw = CASES[case]
    return pipeline.make_train_iterator(spec_of(case, root), tokenizer=get_tokenizer(), **{**_COMMON, **kw})


def digest(batch: dict) -> dict[str, str]:
    """{field: sha256 of its dtype, shape and bytes}."""
    out = {}
    for k, v in sorted(batch.items()):
        v = np.ascontiguousarray(v)
        out[k] = hashlib.sha256(f"{v.dtype}{v.shape}".encode() + v.tobytes()).hexdigest()
    return out


def unrooted(state: dict, root: pathlib.Path) -> dict:
    return json.loads(json.dumps(state).replace(str(root), ROOT))


def rooted(state: dict, root: pathlib.Path) -> dict:
    return _rooted(state, str(root))


def record(root: pathlib.Path) -> dict[str, dict]:
    """{case: {"batches": [digest], "states": [state after each batch]}} of the iterators of this clipjax."""
    out = {}
    for case in CASES:
        it = make(case, root)
        batches, states = [], []
        try:
            for _ in range(BATCHES):
                batches.append(digest(next(it)))
                states.append(unrooted(it.get_state(), root))
        finally:
            it.close()
        out[case] = {"batches": batches, "states": states}
    return out


def main() -> int:
    import tempfile

    import PIL

    with tempfile.TemporaryDirectory() as tmp:
        root = build(pathlib.Path(tmp))
        recorded = record(root)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for case, value in recorded.items():
        (FIXTURES / f"{case}.json").write_text(json.dumps(
            {"case": case, "pillow": PIL.__version__, "numpy": np.__version__, **value}, indent=1) + "\n")
    print(f"wrote {len(recorded)} cases to {FIXTURES}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    sys.exit(main())
