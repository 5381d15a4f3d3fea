"""The embedded "shapes" dataset: procedural image-caption pairs that need no download.

Every image is 1-2 coloured shapes drawn with a random style (rotation, scale, solid / shaded / outlined fill,
stroke width, colour jitter within the named colour) on a random background (flat, gradient, noise or clouds), with
distractor specks and lines and an optional blur, so a model must learn colour and shape rather than one renderer.
Three splits:

- ``train``: the 52 seen (colour, shape) combinations, ~30% of images with two objects; a quarter of the
  single-object captions name only the shape or only the colour;
- ``eval``: single objects, alternating held-out and seen classes (so >= 2,000 held-out images at the default
  size), drawn in the training styles: 12 combinations are never in ``train`` (compositional zero-shot);
- ``ood``: single objects of all 64 classes drawn with fill styles never used in train or eval (hatched, dotted).

Generation is deterministic per (seed, split, shard), so shards are byte-identical across runs and can be written
in parallel.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from clipslim.io import atomic_write, atomic_write_json, atomic_write_text

VERSION = 3
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "ring")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
SPLITS = ("train", "eval", "ood")
# Shades per colour name: a drawn colour is a random mix of two of them plus a little noise, so colours vary within
# a name but never cross into a neighbour (red/orange differ by >= 50 in green, blue/purple by >= 50 in red).
PALETTE: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((215, 25, 25), (245, 55, 45), (175, 15, 20)),
    "green": ((30, 165, 50), (75, 205, 70), (20, 120, 55)),
    "blue": ((40, 70, 230), (70, 115, 250), (25, 40, 175)),
    "yellow": ((245, 225, 30), (255, 245, 95), (225, 205, 15)),
    "purple": ((140, 45, 185), (170, 75, 215), (110, 30, 150)),
    "orange": ((250, 135, 15), (255, 160, 45), (235, 112, 10)),
    "white": ((250, 250, 250), (232, 234, 238), (255, 255, 244)),
    "black": ((12, 12, 12), (38, 38, 44), (24, 20, 16)),
}
RGB: dict[str, tuple[int, int, int]] = {name: shades[0] for name, shades in PALETTE.items()}
# One held-out shape per colour (a permutation) plus four more: every colour and shape keeps >= 6 training partners.
HELDOUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("green", "ring"),
        ("blue", "triangle"),
        ("yellow", "hexagon"),
        ("purple", "circle"),
        ("orange", "cross"),
        ("white", "diamond"),
        ("black", "square"),
        ("green", "square"),
        ("yellow", "ring"),
        ("orange", "triangle"),
        ("black", "circle"),
    }
)
TEMPLATES: tuple[str, ...] = ("a {}.", "a photo of a {}.", "a drawing of a {}.", "a picture of a {}.")
# Fill styles: train/eval draw TRAIN_FILLS; OOD_FILLS are reserved for the ood split (a style never trained on).
# A circle or ring is never outlined (an outlined circle would be a ring).
TRAIN_FILLS = ("solid", "shaded", "outline")
OOD_FILLS = ("hatched", "dotted")
FILL_WORDS = {"solid": "solid", "shaded": "shaded", "outline": "outlined"}
BACKGROUNDS = ("flat", "gradient", "noise", "clouds")
# Caption templates. Each must stay <= 14 BPE tokens for every fill ("hexagon" is 2 tokens), see tests.
SINGLE_CAPTIONS: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}",
    "a picture of a {size} {colour} {shape}",
    "a {colour} {shape} {where}",
    "a {size} {colour} {shape}",
    "a photo of a {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "a drawing of a {colour} {shape}",
    "an image of one {colour} {shape}",
    "a {colour} {shape}",
    "the {shape} {where} is {colour}",
    "a {size} {shape} coloured {colour}",
    "{colour} {shape} {where}",
    "a {colour} {shape} drawn {where}",
    "a {fill} {colour} {shape} {where}",
    "a {fill} {size} {colour} {shape}",
)
PAIR_CAPTIONS: tuple[str, ...] = (
    "a {size} {colour} {shape} {rel} a {size2} {colour2} {shape2}",
    "a {colour} {shape} at {position} and a {colour2} {shape2} at {position2}",
    "a {size} {colour} {shape} and a {size2} {colour2} {shape2}",
    "a {colour} {shape} and a {colour2} {shape2}",
    "a {colour} {shape} {rel} a {colour2} {shape2}",
    "two shapes: a {colour} {shape} and a {colour2} {shape2}",
    "a {colour} {shape} next to a {colour2} {shape2}",
    "a {colour} {shape} with a {colour2} {shape2} {where2}",
)
# Captions that name only the shape or only the colour, for some single-object training images: real captions leave
# attributes out, and a caption that names one attribute ties it to the image whatever the other one is, which is
# what lets a model name a colour-shape combination it has never seen (issue 16: held-out errors were almost all a
# *seen* shape of the right colour).
PARTIAL_CAPTIONS: tuple[str, ...] = (
    "a {shape}",
    "a {size} {shape} {where}",
    "a drawing of a {shape}",
    "a {fill} {shape}",
    "something {colour}",
    "a {colour} shape {where}",
    "a {size} {colour} object",
)
PARTIAL_PROB = 0.25
# Free-colour samples (`--free-colour P`, off by default): one object in a random RGB colour captioned by its shape
# alone. The named palette makes every training star one of 7 colours, so a small ViT can learn shape *within* each
# colour; random colours force shape features that hold across colours. A colour near a named colour that the shape
# is held out with is redrawn, so no held-out combination is drawn (issue 16: a shape probe on the teacher's image
# features scored 96.5% on seen but 21.5% on held-out images).
SHAPE_ONLY_CAPTIONS = tuple(t for t in PARTIAL_CAPTIONS if "{colour}" not in t)
FREE_COLOUR_MARGIN = 100.0  # RGB distance a free colour keeps from every shade of a held-out colour of its shape
WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATION = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}
CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
RADIUS = {"small": (0.09, 0.13), "large": (0.17, 0.23)}  # fraction of the image side
# Rotation range in degrees: a square or diamond turned by 45 would become the other, a cross an "x".
ROTATION = {"square": 25.0, "diamond": 25.0, "cross": 30.0, "triangle": 180.0, "star": 180.0, "hexagon": 180.0}
PAIR_AXES = (("left", "right"), ("top", "bottom"))
SPLIT_IDS = {"train": 0, "eval": 1, "ood": 2}
PAIR_PROB = 0.3
BLUR_PROB = 0.2
SS = 2  # object masks are drawn at SS x the size and box-filtered down: anti-aliased edges


def classnames() -> list[str]:
    """The 64 zero-shot classes, colour-major; a class index is a position in this list."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def class_index(colour: str, shape: str) -> int:
    return COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


SEEN: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT)
HELDOUT_ORDER: tuple[tuple[str, str], ...] = tuple(sorted(HELDOUT, key=lambda cs: class_index(*cs)))


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    radii = [1.0 if i % 2 == 0 else inner for i in range(2 * points)]
    return [(r * math.sin(math.pi * i / points), -r * math.cos(math.pi * i / points)) for i, r in enumerate(radii)]


def _regular(n: int, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(math.cos(phase + 2 * math.pi * i / n), math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]


def _cross(w: float) -> list[tuple[float, float]]:
    """A plus sign of half-width w: the top arm's corners, turned by 90 degrees four times."""
    arm, points = [(-w, -1.0), (w, -1.0), (w, -w)], []
    for _ in range(4):
        points += arm
        arm = [(-y, x) for x, y in arm]
    return points


UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)],
    "star": _star(5, 0.45),
    "cross": _cross(0.34),
    "hexagon": _regular(6),
    "diamond": [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)],
}


def jitter_colour(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    """A shade of the named colour: a random mix of two of its PALETTE shades, plus +-6 per channel."""
    shades = PALETTE[colour]
    a, b = rng.choice(len(shades), size=2, replace=False)
    t = rng.uniform()
    mixed = (1 - t) * np.array(shades[a]) + t * np.array(shades[b]) + rng.integers(-6, 7, 3)
    return tuple(int(v) for v in np.clip(np.rint(mixed), 0, 255))


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel coordinates in [-1, 1]."""
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return ramp[:, None] + np.zeros((1, size), np.float32), ramp[None, :] + np.zeros((size, 1), np.float32)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A mid-grey tinted background of one random family, luminance ~60..200, so black and white objects both
    contrast. Luminance variation is shared by the channels, which keeps PNG encoding (the bottleneck) fast."""
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    base = 128.0 + rng.uniform(-28, 28)
    tint = rng.integers(-18, 19, 3).astype(np.float32)
    if kind == "gradient":
        y, x = _grid(size)
        angle = rng.uniform(0, 2 * math.pi)
        lum = (x * math.cos(angle) + y * math.sin(angle)) * rng.uniform(15, 38)
    elif kind == "noise":
        lum = rng.normal(0.0, rng.uniform(6, 16), (size, size)).astype(np.float32)
    elif kind == "clouds":
        cells = int(rng.integers(3, 7))
        coarse = Image.fromarray(rng.uniform(-1, 1, (cells, cells)).astype(np.float32), "F")
        lum = np.asarray(coarse.resize((size, size), Image.BILINEAR)) * rng.uniform(20, 40)
    else:
        lum = rng.normal(0.0, 2.5, (size, size)).astype(np.float32)
    pixels = np.clip(lum, -55, 55)[:, :, None] + (base + tint)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), kind


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _pattern(fill: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """The OOD fills' pixel pattern at mask resolution: stripes at a random angle, or a dot grid."""
    y, x = (np.indices((size, size)) + rng.uniform(0, 8, (2, 1, 1))).astype(np.float32)
    if fill == "hatched":
        angle = rng.uniform(0, math.pi)
        period = SS * rng.uniform(3.0, 4.5)
        return ((x * math.cos(angle) + y * math.sin(angle)) % period) < period * 0.5
    period = SS * int(rng.integers(3, 5))
    return ((x % period) < SS * 1.5) & ((y % period) < SS * 1.5)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The silhouette's 1-pixel edge (after downsampling) of a boolean mask."""
    return mask & ~_erode(_erode(mask))


def _object_mask(obj: dict[str, str], rng: np.random.Generator, size: int) -> Image.Image:
    """The object's coverage (mode L, anti-aliased) with jittered centre, radius and rotation, in its fill style."""
    big = size * SS
    fx, fy = CENTRES[obj["position"]]
    cx, cy = (fx + rng.uniform(-0.03, 0.03)) * big, (fy + rng.uniform(-0.03, 0.03)) * big
    r = rng.uniform(*RADIUS[obj["size"]]) * big
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    shape, fill = obj["shape"], obj.get("fill", "solid")
    if shape in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape == "ring":
            inner = r * (1 - rng.uniform(0.3, 0.45))
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        angle = math.radians(rng.uniform(-ROTATION[shape], ROTATION[shape]))
        cos, sin = math.cos(angle), math.sin(angle)
        pts = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in UNIT_POLYGONS[shape]]
        if fill == "outline":
            stroke = SS * rng.uniform(1.0, max(1.5, 0.25 * r / SS))
            draw.line([*pts, pts[0], pts[1]], fill=255, width=max(SS, round(stroke)), joint="curve")
        else:
            draw.polygon(pts, fill=255)
    if fill in OOD_FILLS:
        region = np.asarray(canvas) > 0
        canvas = Image.fromarray(((region & _pattern(fill, rng, big)) | _outline(region)).astype(np.uint8) * 255)
    return canvas.reduce(SS)


def free_colour(rng: np.random.Generator, shape: str) -> tuple[int, int, int]:
    """A random RGB colour at least FREE_COLOUR_MARGIN from every shade of each colour ``shape`` is held out with."""
    banned = np.array([shade for c, s in HELDOUT if s == shape for shade in PALETTE[c]], dtype=float).reshape(-1, 3)
    while True:
        rgb = rng.integers(0, 256, 3)
        if not len(banned) or np.linalg.norm(banned - rgb, axis=1).min() >= FREE_COLOUR_MARGIN:
            return tuple(int(v) for v in rgb)


def _shade(rng: np.random.Generator, obj: dict[str, Any]) -> tuple[int, int, int]:
    """A jittered shade of the object's named colour, or its free RGB colour (+-6 per channel)."""
    if "rgb" not in obj:
        return jitter_colour(rng, obj["colour"])
    return tuple(int(v) for v in np.clip(np.array(obj["rgb"]) + rng.integers(-6, 7, 3), 0, 255))


def _paint(img: Image.Image, obj: dict[str, Any], rng: np.random.Generator) -> None:
    """Paste one object: a jittered shade of its colour, or (shaded) a ramp between two shades across the image."""
    mask = _object_mask(obj, rng, img.size[0])
    if obj.get("fill") != "shaded":
        img.paste(_shade(rng, obj), mask=mask)
        return
    a, b = np.array(_shade(rng, obj)), np.array(_shade(rng, obj))
    y, x = _grid(img.size[0])
    angle = rng.uniform(0, 2 * math.pi)
    t = ((x * math.cos(angle) + y * math.sin(angle)) * 0.5 + 0.5)[:, :, None]
    layer = np.rint((1 - t) * a + t * b).astype(np.uint8)
    img.paste(Image.fromarray(layer, "RGB"), mask=mask)


def _lines(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    """Distractor lines in a random grey, thin enough never to hide an object."""
    for _ in range(int(rng.integers(1, 3))):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        grey = int(rng.integers(0, 256))
        draw.line((x0, y0, x1, y1), fill=(grey, grey, grey), width=1)


def _specks(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    """1-2 pixel specks of any colour."""
    for _ in range(int(rng.integers(1, 4))):
        x, y = (int(v) for v in rng.integers(0, size - 2, 2))
        side = int(rng.integers(0, 2))
        draw.rectangle((x, y, x + side, y + side), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))


def draw_scene(
    objects: Sequence[dict[str, str]], rng: np.random.Generator, image_size: int = 64
) -> tuple[Image.Image, dict[str, Any]]:
    """Render objects (colour, shape, size, position, optional fill) in a random style; returns the image and the
    style drawn (background family, distractors, blur) for the sample's meta."""
    pixels, background = _background(rng, image_size)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    lines, specks = bool(rng.random() < 0.3), bool(rng.random() < 0.4)
    if lines:
        _lines(draw, rng, image_size)
    for obj in objects:
        _paint(img, obj, rng)
    if specks:
        _specks(draw, rng, image_size)
    blur = float(rng.uniform(0.4, 0.9)) if rng.random() < BLUR_PROB else 0.0
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return img, {"background": background, "lines": lines, "specks": specks, "blur": round(blur, 3)}


def render(objects: Sequence[dict[str, str]], rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Render objects (dicts with colour, shape, size, position and optionally fill) in a random style."""
    return draw_scene(objects, rng, image_size)[0]


def _fix_articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption_for(objects: Sequence[dict[str, str]], template: int) -> str:
    """Caption for one or two objects with the given template index (into SINGLE_ or PAIR_CAPTIONS)."""
    first = objects[0]
    fields: dict[str, str] = dict(first, where=WHERE[first["position"]], rel=RELATION.get(first["position"], ""))
    fields["fill"] = FILL_WORDS.get(first.get("fill", "solid"), "")
    if len(objects) == 1:
        return _fix_articles(SINGLE_CAPTIONS[template].format(**fields))
    fields.update({f"{k}2": v for k, v in objects[1].items()}, where2=WHERE[objects[1]["position"]])
    return _fix_articles(PAIR_CAPTIONS[template].format(**fields))


def partial_caption(obj: dict[str, str], template: int) -> str:
    """A caption naming only the shape or only the colour of one object (PARTIAL_CAPTIONS[template])."""
    fields = dict(obj, where=WHERE[obj["position"]], fill=FILL_WORDS.get(obj.get("fill", "solid"), ""))
    return _fix_articles(PARTIAL_CAPTIONS[template].format(**fields))


def caption_choices(objects: Sequence[dict[str, str]]) -> list[int]:
    """Template indices usable for these objects: fill words only for the training fills (an ood fill has none)."""
    if len(objects) > 1:
        return list(range(len(PAIR_CAPTIONS)))
    named = objects[0].get("fill", "solid") in FILL_WORDS
    return [i for i, t in enumerate(SINGLE_CAPTIONS) if named or "{fill}" not in t]


def _fill(rng: np.random.Generator, shape: str, ood: bool) -> str:
    if ood:
        return OOD_FILLS[rng.integers(len(OOD_FILLS))]
    fills = TRAIN_FILLS if shape not in ("circle", "ring") else TRAIN_FILLS[:2]
    return fills[rng.integers(len(fills))]


def _single(rng: np.random.Generator, colour: str, shape: str, size: str, ood: bool) -> dict[str, str]:
    position = POSITIONS[rng.integers(len(POSITIONS))]
    return dict(colour=colour, shape=shape, size=size, position=position, fill=_fill(rng, shape, ood))


def eval_class(split: str, idx: int) -> tuple[str, str]:
    """The class of eval sample ``idx``: held-out and seen classes alternate in ``eval``, all 64 cycle in ``ood``."""
    if split == "ood":
        return COLOURS[idx % 64 // len(SHAPES)], SHAPES[idx % len(SHAPES)]
    if idx % 2 == 0:
        return HELDOUT_ORDER[idx // 2 % len(HELDOUT_ORDER)]
    return SEEN[idx // 2 % len(SEEN)]


def _pick_objects(rng: np.random.Generator, split: str, cls: tuple[str, str] | None) -> list[dict[str, str]]:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split '{split}' (expected one of {SPLITS})")
    size = SIZES[rng.integers(len(SIZES))]
    if split != "train":
        colour, shape = cls if cls is not None else eval_class(split, int(rng.integers(2 * len(SEEN))))
        return [_single(rng, colour, shape, size, ood=split == "ood")]
    if rng.random() >= PAIR_PROB:
        return [_single(rng, *SEEN[rng.integers(len(SEEN))], size, ood=False)]
    i, j = rng.choice(len(SEEN), size=2, replace=False)
    positions = PAIR_AXES[rng.integers(2)][:: 1 if rng.random() < 0.5 else -1]
    sizes = (size, SIZES[rng.integers(len(SIZES))])
    return [
        dict(colour=SEEN[k][0], shape=SEEN[k][1], size=s, position=p, fill=_fill(rng, SEEN[k][1], False))
        for k, s, p in zip((i, j), sizes, positions, strict=True)
    ]


def generate_sample(
    rng: np.random.Generator,
    split: str,
    image_size: int = 64,
    *,
    cls: int | tuple[str, str] | None = None,
    free: float = 0.0,
) -> tuple[Image.Image, str, dict[str, Any]]:
    """One (image, caption, meta); ``cls`` (an index or a (colour, shape)) fixes the class of an eval/ood sample;
    ``free``: probability that a single-object training sample is a free-colour one (cls -1, shape-only caption)."""
    if isinstance(cls, int):
        cls = (COLOURS[cls // len(SHAPES)], SHAPES[cls % len(SHAPES)])
    objects = _pick_objects(rng, split, cls)
    # `free > 0` is tested first so that free = 0 draws exactly the random numbers (and shards) it always did.
    if split == "train" and free > 0 and len(objects) == 1 and bool(rng.random() < free):
        return _free_colour_sample(rng, objects[0], image_size)
    partial = split == "train" and len(objects) == 1 and bool(rng.random() < PARTIAL_PROB)
    if partial:
        caption = partial_caption(objects[0], int(rng.integers(len(PARTIAL_CAPTIONS))))
    else:
        choices = caption_choices(objects)
        caption = caption_for(objects, choices[int(rng.integers(len(choices)))])
    image, style = draw_scene(objects, rng, image_size)
    primary = (objects[0]["colour"], objects[0]["shape"])
    meta = {
        "objects": objects,
        "n_objects": len(objects),
        "cls": class_index(*primary),
        "heldout": primary in HELDOUT,
        "ood": split == "ood",
        "partial_caption": partial,
        "style": style,
    }
    return image, caption, meta


def _free_colour_sample(
    rng: np.random.Generator, obj: dict[str, Any], image_size: int
) -> tuple[Image.Image, str, dict[str, Any]]:
    obj = {**obj, "colour": "free", "rgb": list(free_colour(rng, obj["shape"]))}
    caption = partial_caption(obj, PARTIAL_CAPTIONS.index(SHAPE_ONLY_CAPTIONS[rng.integers(len(SHAPE_ONLY_CAPTIONS))]))
    image, style = draw_scene([obj], rng, image_size)
    meta = {"objects": [obj], "n_objects": 1, "cls": -1, "heldout": False, "ood": False, "partial_caption": True}
    return image, caption, {**meta, "free_colour": True, "style": style}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # ~2x faster than the default 6, and smaller on this noise
    return buf.getvalue()


def shard_samples(
    split: str, shard: int, start: int, count: int, seed: int, image_size: int, free: float = 0.0
) -> Iterator[dict]:
    """Encoded samples of one shard; seeded by (seed, split, shard) so any shard can be made independently."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], shard])
    for idx in range(start, start + count):
        cls = eval_class(split, idx) if split != "train" else None
        image, caption, meta = generate_sample(rng, split, image_size, cls=cls, free=free)
        yield {
            "__key__": f"{split}-{idx:08d}",
            "png": _png(image),
            "txt": caption.encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        }


def _write_tar(path: Path, samples: Iterator[dict]) -> None:
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0.0, user="clipslim", group="clipslim") as w:
        # TarWriter accepts `format` but never hands it to tarfile; plain ustar headers are ~3x cheaper than pax.
        w.tarstream.format = tarfile.USTAR_FORMAT
        for sample in samples:
            w.write(sample)


def shard_name(split: str, shard: int) -> str:
    return f"shapes-{split}-{shard:06d}.tar"


def _write_shard(task: tuple[Path, str, int, int, int, int, int, float]) -> int:
    """Write one shard atomically (temp name, then rename); returns its sample count."""
    out, split, shard, start, count, seed, image_size, free = task
    atomic_write(
        out / split / shard_name(split, shard),
        lambda p: _write_tar(p, shard_samples(split, shard, start, count, seed, image_size, free)),
    )
    return count


def _plan(n_samples: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(shard index, first sample index, sample count) for each shard of a split."""
    return [(i, start, min(shard_size, n_samples - start)) for i, start in enumerate(range(0, n_samples, shard_size))]


def _expected_info(
    counts: dict[str, int], seed: int, shard_size: int, image_size: int, free: float = 0.0
) -> dict[str, Any]:
    splits = {split: {"num_samples": n, "num_shards": len(_plan(n, shard_size))} for split, n in counts.items()}
    heldout = [list(pair) for pair in sorted(HELDOUT)]
    info = {"name": "shapes", "seed": seed, "image_size": image_size, "shard_size": shard_size, "splits": splits}
    extra = {"free_colour": free} if free > 0 else {}  # absent when off: older folders stay complete
    return {**info, "heldout": heldout, "ood_fills": list(OOD_FILLS), "version": VERSION, **extra}


def _is_complete(out: Path, info: dict[str, Any]) -> bool:
    """True when out/info.json matches `info` and every shard it names is present."""
    path = out / "info.json"
    try:
        if json.loads(path.read_text()) != info:
            return False
    except (OSError, ValueError):
        return False
    splits = info["splits"].items()
    return all((out / s / shard_name(s, i)).is_file() for s, v in splits for i in range(v["num_shards"]))


def _remove_stale(out: Path, split: str, keep: int) -> None:
    """Delete shards left over from an earlier, larger generation, so a directory glob sees only this one."""
    for path in (out / split).glob(f"shapes-{split}-*.tar"):
        stem = path.stem.rsplit("-", 1)[-1]
        if not stem.isdigit() or int(stem) >= keep:
            path.unlink()


def _run_tasks(tasks: list[tuple], workers: int, progress: bool) -> None:
    bar = tqdm(total=sum(t[4] for t in tasks), unit="img", desc="shapes", disable=not progress)
    with bar:
        if workers <= 1:
            for task in tasks:
                bar.update(_write_shard(task))
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for count in pool.map(_write_shard, tasks):
                bar.update(count)


def write_shapes(
    out: str | Path,
    n_train: int = 40000,
    n_eval: int = 4096,
    seed: int = 0,
    shard_size: int = 2000,
    image_size: int = 64,
    workers: int = 2,
    progress: bool = True,
    n_ood: int | None = None,
    free_colour: float = 0.0,
) -> dict[str, Any]:
    """Write the train/eval/ood shards, classnames, templates and info.json; a no-op if they already match.

    ``n_eval`` images alternate held-out and seen classes (half are held-out); ``n_ood`` defaults to n_eval / 2.
    ``free_colour``: fraction of single-object training samples drawn in a free colour (eval/ood are unchanged).
    """
    out = Path(out)
    n_ood = n_eval // 2 if n_ood is None else n_ood
    if shard_size < 1 or min(n_train, n_eval, n_ood) < 0:
        raise ValueError("shard_size must be >= 1 and sample counts >= 0")
    if not 0.0 <= free_colour <= 1.0:
        raise ValueError(f"free_colour must be in [0, 1], got {free_colour}")
    counts = {"train": n_train, "eval": n_eval, "ood": n_ood}
    info = _expected_info(counts, seed, shard_size, image_size, free_colour)
    if _is_complete(out, info):
        return info
    (out / "info.json").unlink(missing_ok=True)  # an interrupted run must not look complete
    tasks = []
    for split, n in counts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        plan = _plan(n, shard_size)
        _remove_stale(out, split, len(plan))
        tasks += [(out, split, shard, start, count, seed, image_size, free_colour) for shard, start, count in plan]
        sizes = {shard_name(split, shard): count for shard, _, count in plan}
        atomic_write_json(out / split / "sizes.json", sizes)
    _run_tasks(tasks, workers, progress)
    atomic_write_text(out / "classnames.txt", "\n".join(classnames()) + "\n")
    atomic_write_text(out / "templates.txt", "\n".join(TEMPLATES) + "\n")
    atomic_write_json(out / "info.json", info)
    return info


def load_info(path: str | Path) -> dict[str, Any]:
    """Read info.json from a dataset directory (or the file itself)."""
    path = Path(path)
    return json.loads((path / "info.json" if path.is_dir() else path).read_text())


def read_lines(path: str | Path) -> list[str]:
    """Non-empty stripped lines of a text file (classnames.txt, templates.txt)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
