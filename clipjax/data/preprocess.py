"""Image loading and CLIP preprocessing on the host (PIL + NumPy), channels last.

`preprocess` is open_clip's eval transform (`image_transform(size, is_train=False)`) applied to the image as
decoded, as in `preprocess(Image.open(path))`: resize the shortest side to `image_size` with PIL bicubic, in the
image's own mode (the long side is `int(size * long / short)`, truncated, as torchvision computes it; PIL itself
resizes RGBA and LA with premultiplied alpha, and palette and 1-bit images with nearest neighbour), center crop with
torchvision's offsets (`round((H - size) / 2)`, Python rounding), then PIL's `convert("RGB")`, which drops alpha and
transparency, scale to [0, 1] and normalise.
`train_transform` is open_clip's training transform on RGB-decoded images (webdataset's "pilrgb" decoder):
torchvision RandomResizedCrop's sampling (10 tries, then a center-crop fallback) driven by a NumPy Generator, bicubic
resize, normalise; `train_crop` is the same up to the normalisation, uint8 pixels (what the training pipeline ships).

`load_image` (used by `train_crop`, the eval pipeline and the ingest check) converts to RGB right after decoding, as
torchvision's ImageFolder loader and webdataset's "pilrgb" decoder do: PIL's `convert("RGB")`, which drops alpha and
transparency without compositing (CMYK without colour management). Compositing transparency over white before
resizing is an opt-in (`alpha_over_white=True`, what transformers' CLIPImageProcessor does); open_clip does not. One
deliberate difference from PIL everywhere: 16-bit and 32-bit grey is scaled to 8 bits before anything else (PIL's
`convert("RGB")` clips it at 255). EXIF orientation is not applied, as in open_clip.

Shapes: H, W image height and width; S the output size; N images in a batch.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = str | os.PathLike | bytes | Image.Image

_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _describe(source: ImageSource) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", None) or f"<PIL image {source.mode} {source.size}>"
    return os.fspath(source)


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source))
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path}")
        return Image.open(path)
    raise TypeError(f"expected an image path, bytes or PIL image, got {type(source).__name__}")


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit grey → 8-bit RGB. Values above 255 are taken as 16-bit and scaled by 255/65535."""
    values = np.asarray(image, dtype=np.float64)  # [H, W]
    if image.mode.startswith("I;16") or values.max(initial=0.0) > 255.0:
        values = values * (255.0 / 65535.0)
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)  # [H, W]
    return Image.fromarray(grey, mode="L").convert("RGB")


def has_transparency(image: Image.Image) -> bool:
    """True for an alpha band (RGBA, LA, PA, premultiplied modes) or a transparent colour / palette entries."""
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def drop_alpha(image: Image.Image) -> Image.Image:
    """PIL's `convert("RGB")`: alpha and transparency are dropped, not composited (open_clip, ImageFolder, webdataset).

    Byte-string palette transparency, which `convert("RGB")` drops with a warning, is removed first from a copy
    (same pixels, no warning). Premultiplied La goes through LA, the only way PIL converts it.
    """
    if image.mode == "RGB":
        return image
    if isinstance(image.info.get("transparency"), bytes):
        image = image.copy()  # leave the caller's image as it is
        del image.info["transparency"]
    if image.mode == "La":
        image = image.convert("LA")
    return image.convert("RGB")


def composite_over_white(image: Image.Image) -> Image.Image:
    """Transparency composited over a white background → RGB (the opt-in `alpha_over_white=True`)."""
    if image.mode == "La":  # premultiplied; PIL converts it to RGBA only through LA
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image, *, alpha_over_white: bool = False) -> Image.Image:
    """Any PIL mode → RGB: wide grey scaled to 8 bits; transparency dropped (`convert("RGB")`), or composited over
    white with `alpha_over_white=True`."""
    if image.mode in _WIDE_INT_MODES:
        return _wide_to_rgb(image)
    if alpha_over_white and has_transparency(image):
        return composite_over_white(image)
    return drop_alpha(image)


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _decoded(
    source: ImageSource, convert: Callable[[Image.Image], Image.Image], min_short_side: int | None = None
) -> Image.Image:
    """Decodes `source` and returns `convert(image)`; errors name the source. Closes what it opened."""
    name = _describe(source)
    try:
        image = _open(source)
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot decode image {name}: {e}") from e
    try:
        if min_short_side and image is not source and image.format in ("JPEG", "MPO"):
            image.draft(None, (min_short_side, min_short_side))  # keeps both sides >= min_short_side
        image.load()
        out = convert(image)
        if out is not image and image is not source:
            image.close()  # multi-frame files keep their file open until closed
        return out
    except _DECODE_ERRORS as e:
        if image is not source:
            image.close()
        raise ValueError(f"cannot decode image {name}: {e}") from e


def load_image(
    source: ImageSource, *, min_short_side: int | None = None, alpha_over_white: bool = False
) -> Image.Image:
    """Decodes `source` (path, encoded bytes or PIL image) and returns an RGB PIL image (`to_rgb`: alpha dropped as
    PIL's `convert("RGB")` does, unless `alpha_over_white`).

    `min_short_side`: for JPEG files and bytes only, lets libjpeg decode at 1/2, 1/4 or 1/8 scale (PIL `draft`) as
    long as the short side stays >= this many pixels. Faster decoding, slightly different pixels; used by
    `train_transform`, never by the eval `preprocess`.
    """
    return _decoded(source, lambda im: to_rgb(im, alpha_over_white=alpha_over_white), min_short_side)


# ---------------------------------------------------------------------------------------------------------------------
# Eval transform
# ---------------------------------------------------------------------------------------------------------------------


def oversized_image(data: bytes) -> str | None:
    """Why the image ``data`` must not be decoded, from its header alone: more pixels than PIL decodes without a
    decompression-bomb warning (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 M; a 30000² PNG of a few KB decodes to 2.7 GB).
    None when it may be (or when the header does not parse: decoding then says why)."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as e:
        return f"decompression bomb: {e}"
    except Exception:  # not an image PIL knows: decoding reports it
        return None
    if limit and width * height > limit:
        return (f"decompression bomb: {width}x{height} = {width * height:,} pixels, more than PIL's limit of "
                f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS)")
    return None



def normalize(
    array_uint8_hwc: np.ndarray, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD
) -> np.ndarray:
    """uint8 [..., H, W, 3] → float32 (x / 255 - mean) / std, computed in float32 like torchvision."""
    if array_uint8_hwc.dtype != np.uint8 or array_uint8_hwc.shape[-1] != 3:
        raise ValueError(f"normalize expects uint8 [..., H, W, 3], got {array_uint8_hwc.dtype} {array_uint8_hwc.shape}")
    x = array_uint8_hwc.astype(np.float32) / np.float32(255.0)  # [..., H, W, 3]
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def resize_shortest(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shortest side is `size`; long side int(size * long / short) (torchvision Resize)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Square center crop with torchvision's offsets; pads with zeros if the image is smaller (torchvision too: fill
    0 in the image's own mode, palette index 0 for palette images)."""
    w, h = image.size
    if size > w or size > h:
        pad_left, pad_top = max(size - w, 0) // 2, max(size - h, 0) // 2
        canvas = Image.new(image.mode, (max(w, size), max(h, size)))
        if image.mode == "P":
            canvas.putpalette(image.getpalette())
        canvas.paste(image, (pad_left, pad_top))
        image, (w, h) = canvas, canvas.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def eval_view(image: Image.Image, image_size: int, *, alpha_over_white: bool = False) -> Image.Image:
    """open_clip's eval geometry on a decoded image: resize (own mode), center crop, then `convert("RGB")`.

    Wide grey is scaled to 8 bits first; with `alpha_over_white`, transparency is composited over white first.
    """
    if image.mode in _WIDE_INT_MODES or (alpha_over_white and has_transparency(image)):
        image = to_rgb(image, alpha_over_white=alpha_over_white)
    return drop_alpha(center_crop(resize_shortest(image, image_size), image_size))  # RGB [S, S]


def preprocess(
    image: ImageSource,
    image_size: int = 224,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    *,
    alpha_over_white: bool = False,
) -> np.ndarray:
    """open_clip's eval transform on `image` as decoded → float32 [S, S, 3].

    `alpha_over_white=True` composites transparency over white before resizing instead (not open_clip's numbers).
    """
    view = _decoded(image, lambda im: eval_view(im, image_size, alpha_over_white=alpha_over_white))
    return normalize(np.asarray(view, dtype=np.uint8), mean, std)  # [S, S, 3]


def preprocess_batch(
    images: Sequence[ImageSource],
    image_size: int = 224,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    *,
    alpha_over_white: bool = False,
) -> np.ndarray:
    """`preprocess` on each image → float32 [N, S, S, 3]."""
    if len(images) == 0:
        return np.zeros((0, image_size, image_size, 3), np.float32)
    return np.stack([preprocess(im, image_size, mean, std, alpha_over_white=alpha_over_white)
                     for im in images])  # [N, S, S, 3]


# ---------------------------------------------------------------------------------------------------------------------
# Training transform
# ---------------------------------------------------------------------------------------------------------------------


def sample_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with a NumPy Generator → (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop at the nearest allowed ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image: Image.Image,
    image_size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """Random crop (area fraction in `scale`, aspect ratio in `ratio`) resized bicubic to [S, S]."""
    box = sample_crop_box(image.width, image.height, rng, scale, ratio)
    return resized_crop(image, box, image_size)


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], image_size: int) -> Image.Image:
    """Crops `box` = (top, left, height, width) and resizes it bicubic to [S, S] (torchvision F.resized_crop)."""
    top, left, h, w = box
    crop = image.crop((left, top, left + w, top + h))
    if crop.size == (image_size, image_size):
        return crop
    return crop.resize((image_size, image_size), Image.Resampling.BICUBIC)


def draft_min_short_side(image_size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> int:
    """Short side an image needs so that every crop RandomResizedCrop can pick is >= image_size on both sides."""
    r0, r1 = ratio
    smallest = min(math.sqrt(scale[0] * min(r0, 1.0 / r1)), 1.0, r1, 1.0 / r0)  # min crop side / short side
    return math.ceil(image_size / smallest) + 1


def train_crop(
    image: ImageSource,
    image_size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    alpha_over_white: bool = False,
) -> np.ndarray:
    """open_clip's training geometry → uint8 [S, S, 3] pixels, not yet normalised; deterministic given `rng`'s state.

    The image is decoded to RGB first (`load_image`: alpha dropped, as webdataset's "pilrgb" decoder does, unless
    `alpha_over_white`). JPEG paths/bytes are decoded at reduced scale when even the smallest possible crop keeps
    >= image_size pixels. `normalize` of the result is `train_transform`; the training pipeline ships these bytes
    and normalises on the device (`clipjax.step.prepare_images`), a quarter of the float32 bytes.
    """
    rgb = load_image(image, min_short_side=draft_min_short_side(image_size, scale, ratio),
                     alpha_over_white=alpha_over_white)
    crop = random_resized_crop(rgb, image_size, rng, scale, ratio)
    return np.asarray(crop, dtype=np.uint8)  # [S, S, 3]


def train_transform(
    image: ImageSource,
    image_size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    *,
    alpha_over_white: bool = False,
) -> np.ndarray:
    """open_clip's training transform → float32 [S, S, 3]: `normalize(train_crop(...))`; deterministic given `rng`."""
    crop = train_crop(image, image_size, rng, scale, ratio, alpha_over_white=alpha_over_white)  # uint8 [S, S, 3]
    return normalize(crop, mean, std)  # [S, S, 3]
