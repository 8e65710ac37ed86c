"""Transparency handled as open_clip handles it. Goldens: tests/fixtures/preprocess_alpha (make_fidelity_fixtures.py).

- `preprocess(path)` equals open_clip's `image_transform(S, is_train=False)(Image.open(path))`: resize in the image's
  own mode, crop, then `convert("RGB")` (alpha dropped, never composited).
- `preprocess(load_image(path))` equals the same transform after torchvision's ImageFolder loader (RGB first).
- `load_image` (the training and ingest decode) equals that loader's image: PIL `convert("RGB")`.
Expected outputs are stored as the uint8 pixels open_clip's floats normalise from.
"""

import json
import pathlib
import warnings

import numpy as np
import pytest
from PIL import Image

from clipjax.data.preprocess import (
    OPENAI_MEAN,
    OPENAI_STD,
    load_image,
    preprocess,
    preprocess_batch,
    train_transform,
)

ROOT = pathlib.Path(__file__).parent / "fixtures" / "preprocess_alpha"
TOL = 1e-5  # the same pixels: only float32 (ours) vs float64 (reference) normalisation differs


def reference_normalize(pixels: np.ndarray) -> np.ndarray:
    return (pixels.astype(np.float64) / 255.0 - np.asarray(OPENAI_MEAN)) / np.asarray(OPENAI_STD)


def meta() -> dict:
    return json.loads((ROOT / "meta.json").read_text())


@pytest.fixture(scope="module")
def expected():
    with np.load(ROOT / "expected.npz") as z:
        return {k: z[k] for k in z.files}


CASES = [(name, s) for name, info in meta()["images"].items() for s in info["image_sizes"]]


def test_golden_set_has_real_transparency():
    images = meta()["images"]
    assert {"RGBA", "LA", "P", "RGB"} <= {info["mode"] for info in images.values()}
    assert all(info["transparent_fraction"] > 0 for info in images.values())
    alpha_band = [n for n, info in images.items() if info["mode"] in ("RGBA", "LA") or n == "palette_alpha.png"]
    assert len(alpha_band) >= 5 and all(images[n]["partial_fraction"] > 0.2 for n in alpha_band)
    sizes = [tuple(info["size"]) for info in images.values()]
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes) and any(max(w, h) < 48 for w, h in sizes)


@pytest.mark.parametrize("name,size", CASES)
def test_preprocess_equals_open_clip_eval_transform(expected, name, size):
    want = reference_normalize(expected[f"{name}@{size}"])  # [S, S, 3]
    got = preprocess(ROOT / "images" / name, image_size=size)
    assert got.shape == (size, size, 3) and got.dtype == np.float32
    assert float(np.abs(got - want).max()) <= TOL


@pytest.mark.parametrize("name,size", CASES)
def test_rgb_decoded_input_equals_the_image_folder_path(expected, name, size):
    want = reference_normalize(expected[f"{name}@{size}:imagefolder"])  # [S, S, 3]
    got = preprocess(load_image(ROOT / "images" / name), image_size=size)
    assert float(np.abs(got - want).max()) <= TOL


@pytest.mark.parametrize("name", sorted(meta()["images"]))
def test_decode_drops_alpha_like_pil_convert(expected, name):
    """The training / ingest decode equals torchvision's ImageFolder loader: Image.open(f).convert("RGB")."""
    path = ROOT / "images" / name
    got = np.asarray(load_image(path))
    assert np.array_equal(got, expected[f"{name}:rgb"])
    with Image.open(path) as im, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Palette images with Transparency")  # PIL's own, for tRNS bytes
        assert np.array_equal(got, np.asarray(im.convert("RGB")))


def test_train_transform_does_not_composite():
    path = ROOT / "images" / "rgba_square.png"
    with Image.open(path) as im:
        rgb = im.convert("RGB")  # alpha dropped
        white = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    got = train_transform(path, 64, np.random.default_rng(5))
    assert np.array_equal(got, train_transform(rgb, 64, np.random.default_rng(5)))
    over_white = train_transform(white.convert("RGB"), 64, np.random.default_rng(5))
    assert float(np.abs(got - over_white).mean()) > 0.1  # compositing would be visible
    assert np.array_equal(train_transform(path, 64, np.random.default_rng(5), alpha_over_white=True), over_white)


def test_alpha_over_white_is_an_opt_in(expected):
    path = ROOT / "images" / "rgba_wide.png"
    default = preprocess(path, 64)
    composited = preprocess(path, 64, alpha_over_white=True)
    with Image.open(path) as im:
        white = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    assert np.array_equal(composited, preprocess(white.convert("RGB"), 64))
    assert float(np.abs(default - composited).mean()) > 0.1
    batch = preprocess_batch([path, path], 64, alpha_over_white=True)
    assert np.array_equal(batch[1], composited)


def test_palette_transparency_bytes_give_no_warning():
    path = ROOT / "images" / "palette_alpha.png"
    with Image.open(path) as im:
        assert isinstance(im.info.get("transparency"), bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocess(path, 48)
        load_image(path)


def test_caller_image_is_left_as_it_was():
    path = ROOT / "images" / "palette_alpha.png"
    with Image.open(path) as im:
        im.load()
        info, mode, pixels = dict(im.info), im.mode, np.asarray(im).copy()
        assert np.array_equal(preprocess(im, 48), preprocess(path, 48))
        load_image(im)
        assert im.info == info and im.mode == mode and np.array_equal(np.asarray(im), pixels)
