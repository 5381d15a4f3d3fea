"""The embedded "shapes" dataset: procedural image-caption pairs that need no download.

Every image is 1-2 coloured shapes on a noisy tinted background, so a tiny CLIP can learn it in minutes on a CPU,
while 12 held-out (colour, shape) combinations, never seen in training, test compositional zero-shot transfer.
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
from PIL import Image, ImageDraw
from tqdm import tqdm

from clipslim.io import atomic_write, atomic_write_json, atomic_write_text

VERSION = 1
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "ring")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
SPLITS = ("train", "eval")
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (140, 45, 185),
    "orange": (250, 135, 15),
    "white": (250, 250, 250),
    "black": (12, 12, 12),
}
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
TEMPLATES: tuple[str, ...] = ("a {}.", "a photo of a {}.", "a drawing of a {}.", "a {} on a noisy background.")
# Caption templates. Each must stay <= 14 BPE tokens for every fill ("hexagon" is 2 tokens), see tests.
SINGLE_CAPTIONS: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}",
    "a picture of a {size} {colour} {shape}",
    "a {colour} {shape} {where}",
    "a {size} {colour} {shape}",
    "a photo of a {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "a drawing of a {colour} {shape}",
)
PAIR_CAPTIONS: tuple[str, ...] = (
    "a {size} {colour} {shape} {rel} a {size2} {colour2} {shape2}",
    "a {colour} {shape} at {position} and a {colour2} {shape2} at {position2}",
    "a {size} {colour} {shape} and a {size2} {colour2} {shape2}",
    "a {colour} {shape} and a {colour2} {shape2}",
)
WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATION = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}
CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
RADIUS = {"small": (0.10, 0.13), "large": (0.18, 0.21)}  # fraction of the image side
PAIR_AXES = (("left", "right"), ("top", "bottom"))
SPLIT_IDS = {"train": 0, "eval": 1}
PAIR_PROB = 0.3
SPECK_PROB = 0.25


def classnames() -> list[str]:
    """The 64 zero-shot classes, colour-major; a class index is a position in this list."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def class_index(colour: str, shape: str) -> int:
    return COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


SEEN: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT)


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


def _draw_object(draw: ImageDraw.ImageDraw, rng: np.random.Generator, obj: dict[str, str], size: int) -> None:
    """Draw one shape with jittered centre, radius, rotation and colour, so a model must learn the concept rather
    than memorise a template."""
    fx, fy = CENTRES[obj["position"]]
    cx, cy = (fx + rng.uniform(-0.02, 0.02)) * size, (fy + rng.uniform(-0.02, 0.02)) * size
    r = rng.uniform(*RADIUS[obj["size"]]) * size
    colour = tuple(
        min(255, max(0, v + int(d))) for v, d in zip(RGB[obj["colour"]], rng.integers(-12, 13, 3), strict=True)
    )
    shape = obj["shape"]
    if shape in ("circle", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        width = 0 if shape == "circle" else max(2, round(r * 0.38))
        draw.ellipse(box, fill=colour if shape == "circle" else None, outline=colour, width=width)
        return
    angle = rng.uniform(-0.17, 0.17)  # +-10 degrees: a square stays a square, a diamond a diamond
    cos, sin = math.cos(angle), math.sin(angle)
    pts = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in UNIT_POLYGONS[shape]]
    draw.polygon(pts, fill=colour)


@functools.lru_cache(maxsize=8)
def _unit_ramp(size: int) -> np.ndarray:
    return np.linspace(-1.0, 1.0, size, dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Mid-grey with a random tint, a gentle gradient and luminance noise: contrasts with every colour, black and
    white included. The noise is shared by the three channels, which keeps PNG encoding (the bottleneck) fast."""
    base = (128 + rng.integers(-22, 23, 3)).astype(np.int16)
    ramp = (_unit_ramp(size) * rng.uniform(-14, 14)).astype(np.int16)
    noise = rng.integers(-20, 21, (size, size), dtype=np.int16) + (ramp[:, None] if rng.random() < 0.5 else ramp)
    return (noise[:, :, None] + base).astype(np.uint8)  # 128 +- 22 +- 14 +- 20 stays inside 0..255: no clip


def render(objects: Sequence[dict[str, str]], rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Render objects (dicts with colour, shape, size, position) onto a fresh noisy background."""
    img = Image.fromarray(_background(rng, image_size), "RGB")
    draw = ImageDraw.Draw(img)
    for obj in objects:
        _draw_object(draw, rng, obj, image_size)
    if rng.random() < SPECK_PROB:
        x, y = rng.integers(0, image_size - 2, 2)
        speck = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.rectangle((int(x), int(y), int(x) + 1, int(y) + 1), fill=speck)
    return img


def _fix_articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption_for(objects: Sequence[dict[str, str]], template: int) -> str:
    """Caption for one or two objects with the given template index (into SINGLE_ or PAIR_CAPTIONS)."""
    first = objects[0]
    fields: dict[str, str] = dict(first, where=WHERE[first["position"]], rel=RELATION.get(first["position"], ""))
    if len(objects) == 1:
        return _fix_articles(SINGLE_CAPTIONS[template].format(**fields))
    fields.update({f"{k}2": v for k, v in objects[1].items()})
    return _fix_articles(PAIR_CAPTIONS[template].format(**fields))


def _pick_objects(rng: np.random.Generator, split: str, cls: int | None) -> list[dict[str, str]]:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split '{split}' (expected one of {SPLITS})")
    size = SIZES[rng.integers(len(SIZES))]
    if split == "eval":
        cls = int(rng.integers(len(COLOURS) * len(SHAPES))) if cls is None else cls
        colour, shape = COLOURS[cls // len(SHAPES)], SHAPES[cls % len(SHAPES)]
        return [dict(colour=colour, shape=shape, size=size, position=POSITIONS[rng.integers(len(POSITIONS))])]
    if rng.random() >= PAIR_PROB:
        colour, shape = SEEN[rng.integers(len(SEEN))]
        return [dict(colour=colour, shape=shape, size=size, position=POSITIONS[rng.integers(len(POSITIONS))])]
    i, j = rng.choice(len(SEEN), size=2, replace=False)
    positions = PAIR_AXES[rng.integers(2)][:: 1 if rng.random() < 0.5 else -1]
    sizes = (size, SIZES[rng.integers(len(SIZES))])
    return [
        dict(colour=SEEN[k][0], shape=SEEN[k][1], size=s, position=p)
        for k, s, p in zip((i, j), sizes, positions, strict=True)
    ]


def generate_sample(
    rng: np.random.Generator, split: str, image_size: int = 64, *, cls: int | None = None
) -> tuple[Image.Image, str, dict[str, Any]]:
    """One (image, caption, meta); `cls` fixes the class of an eval sample (round-robin balancing)."""
    objects = _pick_objects(rng, split, cls)
    templates = SINGLE_CAPTIONS if len(objects) == 1 else PAIR_CAPTIONS
    caption = caption_for(objects, int(rng.integers(len(templates))))
    image = render(objects, rng, image_size)
    primary = (objects[0]["colour"], objects[0]["shape"])
    meta = {"objects": objects, "n_objects": len(objects), "cls": class_index(*primary), "heldout": primary in HELDOUT}
    return image, caption, meta


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # ~2x faster than the default 6, and smaller on this noise
    return buf.getvalue()


def shard_samples(split: str, shard: int, start: int, count: int, seed: int, image_size: int) -> Iterator[dict]:
    """Encoded samples of one shard; seeded by (seed, split, shard) so any shard can be made independently."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], shard])
    n_classes = len(COLOURS) * len(SHAPES)
    for idx in range(start, start + count):
        cls = idx % n_classes if split == "eval" else None
        image, caption, meta = generate_sample(rng, split, image_size, cls=cls)
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


def _write_shard(task: tuple[Path, str, int, int, int, int, int]) -> int:
    """Write one shard atomically (temp name, then rename); returns its sample count."""
    out, split, shard, start, count, seed, image_size = task
    atomic_write(
        out / split / shard_name(split, shard),
        lambda p: _write_tar(p, shard_samples(split, shard, start, count, seed, image_size)),
    )
    return count


def _plan(n_samples: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(shard index, first sample index, sample count) for each shard of a split."""
    return [(i, start, min(shard_size, n_samples - start)) for i, start in enumerate(range(0, n_samples, shard_size))]


def _expected_info(n_train: int, n_eval: int, seed: int, shard_size: int, image_size: int) -> dict[str, Any]:
    splits = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        splits[split] = {"num_samples": n, "num_shards": len(_plan(n, shard_size))}
    heldout = [list(pair) for pair in sorted(HELDOUT)]
    info = {"name": "shapes", "seed": seed, "image_size": image_size, "shard_size": shard_size, "splits": splits}
    return {**info, "heldout": heldout, "version": VERSION}


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
    n_eval: int = 2048,
    seed: int = 0,
    shard_size: int = 2000,
    image_size: int = 64,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the train/eval shards, classnames, templates and info.json; a no-op if they already match."""
    out = Path(out)
    if shard_size < 1 or n_train < 0 or n_eval < 0:
        raise ValueError("shard_size must be >= 1 and sample counts >= 0")
    info = _expected_info(n_train, n_eval, seed, shard_size, image_size)
    if _is_complete(out, info):
        return info
    (out / "info.json").unlink(missing_ok=True)  # an interrupted run must not look complete
    tasks = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        (out / split).mkdir(parents=True, exist_ok=True)
        plan = _plan(n, shard_size)
        _remove_stale(out, split, len(plan))
        tasks += [(out, split, shard, start, count, seed, image_size) for shard, start, count in plan]
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
