"""Replayable random augmentation: a few numbers per draw reproduce the exact pixels.

A teacher cache (MobileCLIP's dataset reinforcement) stores the teacher's embedding of K augmented views of each
image. Training must show the student the very pixels the teacher saw, so an augmentation here is *parameters*
(crop box, flip, colour-jitter factors, and the seed they were drawn from) plus a deterministic function that
applies them. Jitter factors are rounded to float16 when drawn, so the stored values are the applied values.

No hue jitter and no flip by default: captions name colours and sides ("a red star on the left").
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from ..config import ConfigError

JITTER = ("brightness", "contrast", "saturation")


@dataclass
class AugmentConfig:
    """The distribution augmentations are drawn from (recorded in a cache's manifest)."""

    scale: tuple[float, float] = (0.9, 1.0)
    """Crop area as a fraction of the image (RandomResizedCrop); open_clip's training crop by default."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Crop aspect ratio range."""
    flip: float = 0.0
    """Probability of a horizontal flip."""
    brightness: float = 0.1
    """Jitter strength: a factor drawn uniformly from [1 - s, 1 + s] (0: off). Same for contrast, saturation."""
    contrast: float = 0.1
    saturation: float = 0.1

    def validate(self, where: str) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{where}.scale: expected 0 < min <= max <= 1, got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"{where}.ratio: expected 0 < min <= max, got {list(self.ratio)}")
        if not 0 <= self.flip <= 1:
            raise ConfigError(f"{where}.flip: must be in [0, 1], got {self.flip}")
        for name in JITTER:
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class AugParams:
    """One draw: crop box in source pixels, flip, jitter factors (float16-exact) and the seed that drew them."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: tuple[float, float, float]
    seed: int


def _f16(x: float) -> float:
    return float(np.float16(x))


def _crop_box(rng: random.Random, width: int, height: int, cfg: AugmentConfig) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop rule (10 tries, then a centre crop clamped to the ratio range)."""
    area = width * height
    log_ratio = (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*cfg.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < cfg.ratio[0]:
        w, h = width, round(width / cfg.ratio[0])
    elif in_ratio > cfg.ratio[1]:
        h, w = height, round(height * cfg.ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(cfg: AugmentConfig, width: int, height: int, seed: int) -> AugParams:
    """The augmentation a seed stands for on a ``width`` x ``height`` image (pure: same seed, same draw)."""
    rng = random.Random(seed)
    top, left, h, w = _crop_box(rng, width, height, cfg)
    flip = rng.random() < cfg.flip
    jitter = tuple(
        _f16(rng.uniform(1 - s, 1 + s)) if s > 0 else 1.0 for s in (cfg.brightness, cfg.contrast, cfg.saturation)
    )
    return AugParams(top, left, h, w, flip, jitter, seed)  # type: ignore[arg-type]


class Replay:
    """Applies :class:`AugParams` to a PIL image and returns the normalised tensor a CLIP model reads.

    Called with an image alone it draws fresh parameters from the torch RNG, so it also serves as an ordinary
    random training transform (the loader seeds the torch RNG per worker).
    """

    def __init__(self, cfg: AugmentConfig, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.cfg, self.size, self.mean, self.std = cfg, size, list(mean), list(std)

    def apply(self, image: Image.Image, p: AugParams) -> torch.Tensor:
        img = TF.resized_crop(
            image, p.top, p.left, p.height, p.width, [self.size, self.size],
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        )  # fmt: skip
        if p.flip:
            img = TF.hflip(img)
        for adjust, factor in zip(
            (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation), p.jitter, strict=True
        ):
            if factor != 1.0:
                img = adjust(img, factor)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, ()))
        return self.apply(image, sample_params(self.cfg, image.width, image.height, seed))


def pack(params: list[list[AugParams]]) -> dict[str, torch.Tensor]:
    """[N samples][K draws] -> compact tensors: box int32 [N,K,4], flip uint8, jitter float16 [N,K,3], seed int64."""
    flat = [p for row in params for p in row]
    n, k = len(params), len(params[0]) if params else 0
    box = torch.tensor([[p.top, p.left, p.height, p.width] for p in flat], dtype=torch.int32).reshape(n, k, 4)
    flip = torch.tensor([p.flip for p in flat], dtype=torch.uint8).reshape(n, k)
    jitter = torch.tensor([p.jitter for p in flat], dtype=torch.float16).reshape(n, k, 3)
    seed = torch.tensor([p.seed for p in flat], dtype=torch.int64).reshape(n, k)
    return {"aug_box": box, "aug_flip": flip, "aug_jitter": jitter, "aug_seed": seed}


def unpack(tensors: dict[str, torch.Tensor], row: int, k: int) -> AugParams:
    """The k-th stored draw of sample ``row`` (inverse of :func:`pack`)."""
    top, left, h, w = (int(v) for v in tensors["aug_box"][row, k])
    jitter = tuple(float(v) for v in tensors["aug_jitter"][row, k])
    return AugParams(top, left, h, w, bool(tensors["aug_flip"][row, k]), jitter, int(tensors["aug_seed"][row, k]))  # type: ignore[arg-type]
