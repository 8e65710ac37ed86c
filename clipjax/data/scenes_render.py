"""Rendering and captioning of one procedural scene (the examples of the embedded ``scenes`` dataset).

A scene is 1–3 copies of a main object — one of 8 colours × 6 shapes, small or large — on a muted, textured
background, sometimes with a smaller distractor object of another colour and another shape. Colours are
saturated and backgrounds desaturated mid-tones, shapes are drawn upright (±8° jitter, so a square never turns
into a diamond), at 2× and box-downsampled: colour and shape are unambiguous at 64 px. Every caption names the
main object's colour and shape; phrasings vary (size, position, count, distractor).

Everything is a pure function of a ``numpy.random.Generator``: the builder seeds one per example.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (30, 160, 50),
    "blue": (35, 75, 220),
    "yellow": (245, 220, 30),
    "purple": (140, 45, 180),
    "orange": (250, 130, 20),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS = {s: (s + "es" if s.endswith(("s", "x")) else s + "s") for s in SHAPES}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

# Muted backgrounds: low saturation, luminance ~85–175, far from every object colour.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (165, 165, 160), (92, 96, 100), (185, 172, 148), (112, 126, 140),
    (138, 150, 126), (150, 132, 122), (120, 110, 135), (175, 178, 185), (100, 112, 100),
)
BACKGROUND_STYLES = ("flat", "gradient", "noise", "stripes")

_CENTERS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
            "center": (0.5, 0.5)}
_RADIUS = {"small": (0.10, 0.125), "large": (0.19, 0.23)}  # fraction of the image side
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
_CORNERS = ((0.18, 0.18), (0.82, 0.18), (0.18, 0.82), (0.82, 0.82))
_CELLS = tuple((x, y) for y in (0.2, 0.5, 0.8) for x in (0.2, 0.5, 0.8))
_SUPERSAMPLE = 2


@dataclasses.dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    size: str
    position: str  # "" when count > 1
    count: int
    background: str
    distractor: tuple[str, str] | None  # (colour, shape)


def sample_scene(
    rng: np.random.Generator, color: str, shape: str, distractors: list[tuple[str, str]] | None
) -> Scene:
    """Samples the free attributes of a scene whose main object is ``color shape``.

    ``distractors``: the (colour, shape) pairs a distractor may take (None: never add one).
    """
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.2, 0.2]))
    size = str(rng.choice(SIZES)) if count < 3 else "small"
    position = str(rng.choice(POSITIONS)) if count == 1 else ""
    distractor = None
    if distractors and count == 1 and rng.random() < 0.35:
        allowed = [d for d in distractors if d[0] != color and d[1] != shape]
        distractor = allowed[rng.integers(len(allowed))]
    background = str(rng.choice(BACKGROUND_STYLES))
    return Scene(color, shape, size, position, count, background, distractor)


# ----------------------------------------------------------------------------------------------- drawing


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with outer radius r, rotated by ``angle`` radians."""
    if shape == "square":
        pts = [(r * 0.85 * math.cos(a), r * 0.85 * math.sin(a)) for a in np.radians([45, 135, 225, 315])]
    elif shape == "diamond":
        pts = [(0.0, -r * 1.1), (r * 0.75, 0.0), (0.0, r * 1.1), (-r * 0.75, 0.0)]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a) + 0.15 * r) for a in np.radians([-90, 30, 150])]
    elif shape == "star":
        pts = [
            ((r if k % 2 == 0 else 0.42 * r) * math.cos(a), (r if k % 2 == 0 else 0.42 * r) * math.sin(a))
            for k, a in enumerate(np.radians(np.arange(-90, 270, 36)))
        ]
    elif shape == "cross":
        w = 0.34 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
               (-r, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _draw_object(draw: ImageDraw.ImageDraw, rng: np.random.Generator, shape: str, color: str,
                 center: tuple[float, float], size: str, side: int) -> None:
    cx, cy = center[0] * side, center[1] * side
    r = rng.uniform(*_RADIUS[size]) * side
    rgb = tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in COLORS[color])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, math.radians(rng.uniform(-8, 8))), fill=rgb)


def _background(rng: np.random.Generator, style: str, side: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], np.float32)
    img = np.broadcast_to(base, (side, side, 3)).copy()  # [S, S, 3]
    if style == "gradient":
        ramp = np.linspace(-1.0, 1.0, side, dtype=np.float32) * rng.uniform(15, 30)  # [S]
        img += ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
    elif style == "noise":
        img += rng.normal(0.0, 7.0, size=(side, side, 1)).astype(np.float32)
    elif style == "stripes":
        period = int(rng.integers(6, 14)) * _SUPERSAMPLE
        band = ((np.arange(side) // (period // 2)) % 2).astype(np.float32) * rng.uniform(10, 20)  # [S]
        img += band[:, None, None] if rng.random() < 0.5 else band[None, :, None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _centers(rng: np.random.Generator, scene: Scene) -> list[tuple[float, float]]:
    def jitter(p):
        return (p[0] + rng.uniform(-0.04, 0.04), p[1] + rng.uniform(-0.04, 0.04))

    if scene.count == 1:
        return [jitter(_CENTERS[scene.position])]
    if scene.count == 2 and scene.size == "large":
        pair = [_CENTERS["left"], _CENTERS["right"]] if rng.random() < 0.5 else [_CENTERS["top"], _CENTERS["bottom"]]
        return [jitter(p) for p in pair]
    cells = rng.choice(len(_CELLS), size=scene.count, replace=False)
    return [jitter(_CELLS[i]) for i in cells]


def render(rng: np.random.Generator, scene: Scene, image_size: int) -> Image.Image:
    """Draws ``scene`` as an RGB image of side ``image_size``."""
    side = image_size * _SUPERSAMPLE
    canvas = Image.fromarray(_background(rng, scene.background, side))
    draw = ImageDraw.Draw(canvas)
    centers = _centers(rng, scene)
    if scene.distractor is not None:
        pos = scene.position
        spot = _CENTERS[_OPPOSITE[pos]] if pos in _OPPOSITE else _CORNERS[rng.integers(len(_CORNERS))]
        _draw_object(draw, rng, scene.distractor[1], scene.distractor[0], spot, "small", side)
    for center in centers:
        _draw_object(draw, rng, scene.shape, scene.color, center, scene.size, side)
    return canvas.reduce(_SUPERSAMPLE)


def encode(image: Image.Image, image_format: str) -> bytes:
    """Encodes once; the bytes are stored as they are."""
    buf = io.BytesIO()
    if image_format == "jpeg":
        image.save(buf, format="JPEG", quality=92, subsampling=0)
    elif image_format == "png":
        image.save(buf, format="PNG", optimize=False)
    else:
        raise ValueError(f"unknown image format {image_format!r} (expected 'jpeg' or 'png')")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- captions


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption_candidates(scene: Scene) -> list[str]:
    """All captions that describe ``scene``; each names the main object's colour and shape."""
    c, s, z = scene.color, scene.shape, scene.size
    if scene.count > 1:
        n, p = NUMBER_WORDS[scene.count], PLURALS[s]
        return [f"{n} {c} {p}", f"a photo of {n} {c} {p}", f"there are {n} {z} {c} {p}",
                f"{n} {z} {c} {p}", f"a picture of {n} {c} {p}", f"an image of {n} {c} {p}"]
    where = WHERE[scene.position]
    caps = [_a(f"{c} {s}"), _a(f"{z} {c} {s}"), f"a photo of {_a(f'{c} {s}')}",
            f"a photo of {_a(f'{z} {c} {s}')}", f"{_a(f'{c} {s}')} {where}",
            f"{_a(f'{z} {c} {s}')} {where}", f"there is {_a(f'{c} {s}')} {where}",
            f"a picture of {_a(f'{z} {c} {s}')} {where}"]
    if scene.distractor is not None:
        other = f"{scene.distractor[0]} {scene.distractor[1]}"
        caps += [f"{_a(f'{c} {s}')} next to {_a(other)}", f"{_a(f'{c} {s}')} and {_a(f'small {other}')}",
                 f"there is {_a(f'{z} {c} {s}')} and {_a(other)}",
                 f"a photo of {_a(f'{c} {s}')} {where} and {_a(other)}"]
    return caps


def sample_captions(rng: np.random.Generator, scene: Scene, k: int = 4) -> list[str]:
    """``k`` distinct captions; with a distractor, at least half of them mention it."""
    caps = caption_candidates(scene)
    if scene.distractor is None:
        return [caps[i] for i in rng.choice(len(caps), size=k, replace=False)]
    plain, paired = caps[:-4], caps[-4:]
    half = k // 2
    return [plain[i] for i in rng.choice(len(plain), size=k - half, replace=False)] + [
        paired[i] for i in rng.choice(len(paired), size=half, replace=False)
    ]
