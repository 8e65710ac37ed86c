"""Image loading and preprocessing against open_clip / torchvision goldens.

Goldens come from tests/fixtures/make_text_image_fixtures.py: open_clip's `image_transform(size, is_train=False)`
applied to each image as PIL decodes it, outputs stored losslessly as the uint8 pixels they normalise, torchvision
`resized_crop` outputs for fixed boxes, and torchvision RandomResizedCrop's fallback boxes. Transparency cases are
covered further by tests/test_fidelity_preprocess.py.
"""

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from clipjax.data.preprocess import (
    OPENAI_MEAN,
    OPENAI_STD,
    draft_min_short_side,
    load_image,
    normalize,
    preprocess,
    preprocess_batch,
    random_resized_crop,
    resized_crop,
    sample_crop_box,
    train_transform,
)


@pytest.fixture(scope="module")
def golden(request):
    root = request.config.rootpath / "tests" / "fixtures" / "preprocess"
    meta = json.loads((root / "meta.json").read_text())
    expected = dict(np.load(root / "expected.npz"))
    return root / "images", meta, expected


def reference_normalize(pixels: np.ndarray) -> np.ndarray:
    """Independent float64 normalisation of stored uint8 pixels."""
    return (pixels.astype(np.float64) / 255.0 - np.asarray(OPENAI_MEAN)) / np.asarray(OPENAI_STD)


def golden_cases():
    meta = json.loads((pathlib.Path(__file__).parent / "fixtures" / "preprocess" / "meta.json").read_text())
    return [(name, s) for name, info in meta["images"].items() for s in info["image_sizes"]]


def test_golden_set_is_varied(golden):
    _, meta, _ = golden
    modes = {info["mode"] for info in meta["images"].values()}
    assert {"RGB", "RGBA", "P", "L", "LA", "CMYK", "I;16", "1"} <= modes
    assert len(meta["images"]) >= 12


@pytest.mark.parametrize("name,size", golden_cases())
def test_preprocess_matches_open_clip(golden, name, size):
    images, _, expected = golden
    want = reference_normalize(expected[f"{name}@{size}"])  # [S, S, 3]
    got = preprocess(images / name, image_size=size)
    assert got.shape == (size, size, 3) and got.dtype == np.float32
    err = float(np.abs(got - want).max())
    print(f"{name}@{size}: max abs error {err:.2e}")
    assert err <= 1e-5  # the same pixels; only float32 vs float64 normalisation differs


def test_preprocess_sources_agree(golden):
    images, _, _ = golden
    path = images / "rgba.png"
    from_path = preprocess(path, 64)
    assert np.array_equal(preprocess(str(path), 64), from_path)
    assert np.array_equal(preprocess(path.read_bytes(), 64), from_path)
    with Image.open(path) as im:
        assert np.array_equal(preprocess(im, 64), from_path)


def test_preprocess_batch(golden):
    images, _, _ = golden
    paths = [images / "rgb_small.jpg", images / "tiny_5x7.png", images / "wide.png"]
    batch = preprocess_batch(paths, image_size=32)
    assert batch.shape == (3, 32, 32, 3) and batch.dtype == np.float32
    assert np.array_equal(batch[1], preprocess(paths[1], 32))
    assert preprocess_batch([], 32).shape == (0, 32, 32, 3)


def test_normalize():
    pixels = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3) * 8
    got = normalize(pixels)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference_normalize(pixels), atol=1e-6)
    np.testing.assert_allclose(normalize(pixels, (0.5,) * 3, (0.5,) * 3), pixels / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        normalize(pixels.astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def test_load_image_modes(golden):
    images, meta, _ = golden
    for name in meta["images"]:
        img = load_image(images / name)
        assert img.mode == "RGB" and list(img.size) == meta["images"][name]["size"], name


def test_transparency_is_dropped_unless_white_is_asked_for():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red under a fully transparent alpha
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    assert (np.asarray(load_image(buf.getvalue())) == [200, 0, 0]).all()  # PIL convert("RGB"), as open_clip
    assert (np.asarray(load_image(buf.getvalue(), alpha_over_white=True)) == 255).all()


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    assert list(np.asarray(load_image(buf.getvalue()))[0, :, 0]) == [0, 1, 128, 255]


def test_load_errors_name_the_file(tmp_path, golden):
    images, _, _ = golden
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not_an_image.jpg"):
        load_image(bad)
    cut = tmp_path / "truncated.jpg"
    cut.write_bytes((images / "rgb_large.jpg").read_bytes()[:3000])
    with pytest.raises(ValueError, match="truncated.jpg"):
        preprocess(cut)
    with pytest.raises(ValueError, match="5 bytes"):
        load_image(b"hello")
    with pytest.raises(TypeError, match="int"):
        load_image(3)


# ---------------------------------------------------------------------------------------------------------------------
# Training transform
# ---------------------------------------------------------------------------------------------------------------------


def test_resized_crop_matches_torchvision(golden):
    images, meta, expected = golden
    img = load_image(images / "rgb_small.jpg")
    for k, box in enumerate(meta["resized_crop_boxes"]):
        got = np.asarray(resized_crop(img, tuple(box), 64))
        assert np.array_equal(got, expected[f"resized_crop_{k}"]), box


def test_crop_fallback_matches_torchvision(golden):
    images, meta, _ = golden
    for name, box in meta["fallback_boxes"].items():
        w, h = load_image(images / name).size
        assert list(sample_crop_box(w, h, np.random.default_rng(0))) == box, name


def test_sample_crop_box_distribution():
    rng = np.random.default_rng(0)
    boxes = np.array([sample_crop_box(1000, 800, rng, (0.5, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 800).all() and (left + w <= 1000).all()
    area = h * w / 800_000
    assert area.min() >= 0.49 and area.max() <= 1.0 and 0.65 < area.mean() < 0.85
    aspect = w / h
    assert aspect.min() >= 0.74 and aspect.max() <= 1.34


def test_random_resized_crop_full_square_is_plain_resize(golden):
    images, _, expected = golden
    img = load_image(images / "square_224.png")
    got = random_resized_crop(img, 64, np.random.default_rng(3), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert np.array_equal(np.asarray(got), np.asarray(img.resize((64, 64), Image.Resampling.BICUBIC)))
    # on a square image, open_clip's eval transform is the same plain resize
    assert np.array_equal(np.asarray(got), expected["square_224.png@64"])


def test_train_transform_deterministic_and_sane(golden):
    images, _, _ = golden
    path = images / "square_224.png"  # square: the random crops succeed (no center-crop fallback)
    a = train_transform(path, 64, np.random.default_rng(7))
    b = train_transform(path, 64, np.random.default_rng(7))
    c = train_transform(path, 64, np.random.default_rng(8))
    assert a.shape == (64, 64, 3) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    lo = (0 - np.asarray(OPENAI_MEAN)) / np.asarray(OPENAI_STD)
    hi = (1 - np.asarray(OPENAI_MEAN)) / np.asarray(OPENAI_STD)
    assert (a >= lo - 1e-5).all() and (a <= hi + 1e-5).all()
    # a 90-100 % crop shows nearly the same picture as the eval center view
    eval_view = preprocess(path, 64)
    np.testing.assert_allclose(a.mean(axis=(0, 1)), eval_view.mean(axis=(0, 1)), atol=0.15)
    assert float(np.abs(a - eval_view).mean()) < 0.5


def test_jpeg_draft_keeps_enough_pixels(golden):
    images, _, _ = golden
    path = images / "rgb_large.jpg"  # 1024 x 768
    need = draft_min_short_side(64, (0.9, 1.0), (3 / 4, 4 / 3))
    drafted = load_image(path, min_short_side=need)
    assert need <= min(drafted.size) < 768 and drafted.size == (128, 96)
    assert load_image(path, min_short_side=500).size == (1024, 768)  # halving would go below 500
    assert load_image(images / "wide.png", min_short_side=10).size == (901, 120)  # not a JPEG
    # the whole 4:3 picture (scale 1, ratio 4/3): drafted and full decodes give nearly the same output
    kw = dict(scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    out = train_transform(path, 64, np.random.default_rng(0), **kw)
    full = train_transform(load_image(path), 64, np.random.default_rng(0), **kw)  # PIL input: never drafted
    assert out.shape == full.shape == (64, 64, 3)
    print(f"draft vs full decode MAE {float(np.abs(out - full).mean()):.3f}")
    assert float(np.abs(out - full).mean()) < 0.05


def test_draft_bound_holds_for_every_crop():
    rng = np.random.default_rng(0)
    for scale, ratio in [((0.9, 1.0), (3 / 4, 4 / 3)), ((0.08, 1.0), (3 / 4, 4 / 3))]:
        short = draft_min_short_side(64, scale, ratio)
        for aspect in [1.0, 4 / 3, 2.0, 5.0]:
            for w, h in [(round(short * aspect), short), (short, round(short * aspect))]:
                boxes = np.array([sample_crop_box(w, h, rng, scale, ratio) for _ in range(300)])
                assert boxes[:, 2:].min() >= 64, (scale, w, h)
