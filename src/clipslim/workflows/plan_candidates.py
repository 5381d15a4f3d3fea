"""Which students ``clipslim plan`` measures: shipped configs a teacher can hand its weights to, and width × depth
fractions of the teacher itself, each an open_clip config (fractions and resized ones written to ``OUT/configs``)."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from ..inherit.manual import InheritError, check_compatible
from ..io import atomic_write_json
from ..models import CONFIG_DIR, quiet_random_init

DEFAULT_FRACTIONS = ("0.75x0.5", "0.5x0.5")
"""Width × depth fractions measured besides the shipped configs: between the half and quarter students and below."""

_FRACTION = re.compile(r"^(\d*\.?\d+)x(\d*\.?\d+)$")


@dataclass(frozen=True)
class Candidate:
    name: str  # an open_clip config name (registered before use)
    source: str  # "shipped", "given" or "fraction WxD of <teacher>"
    cfg: dict[str, Any]


def parse_fraction(token: str) -> tuple[float, float] | None:
    """``"0.5x0.25"`` -> (width 0.5, depth 0.25); None when the token is not a fraction."""
    match = _FRACTION.match(token.strip())
    if match is None:
        return None
    width, depth = float(match[1]), float(match[2])
    if not (0 < width <= 1 and 0 < depth <= 1):
        raise ValueError(f"--students: fractions must be in (0, 1], got '{token}'")
    return width, depth


def _cut(width: int, head_dim: int, fraction: float) -> tuple[int, int]:
    """(width, heads) at ``fraction`` of ``width``, whole heads of the same head dim (what inheritance needs)."""
    heads = max(1, round(fraction * width / head_dim))
    return heads * head_dim, heads


def fraction_config(teacher_cfg: dict[str, Any], width: float, depth: float) -> dict[str, Any]:
    """The teacher's config with both towers cut to ``width`` × ``depth`` (head dim, patch, embed dim kept)."""
    vision, text = teacher_cfg.get("vision_cfg", {}), teacher_cfg.get("text_cfg", {})
    native = isinstance(vision.get("layers"), int) and not vision.get("timm_model_name")
    if not native or text.get("hf_model_name") or "width" not in vision:
        raise ValueError("--students: width x depth fractions need a native open_clip ViT teacher")
    cfg = copy.deepcopy(teacher_cfg)
    head_width = vision.get("head_width", 64)
    cfg["vision_cfg"]["width"], _ = _cut(vision["width"], head_width, width)
    cfg["vision_cfg"]["layers"] = max(1, round(depth * vision["layers"]))
    text_head = text.get("width", 512) // text.get("heads", 8)
    cfg["text_cfg"]["width"], cfg["text_cfg"]["heads"] = _cut(text.get("width", 512), text_head, width)
    cfg["text_cfg"]["layers"] = max(1, round(depth * text.get("layers", 12)))
    return cfg


def _meta_model(cfg: dict[str, Any]) -> nn.Module:
    with quiet_random_init(), torch.device("meta"):
        return open_clip.CLIP(**cfg)


def shipped_for(teacher: nn.Module, teacher_cfg: dict[str, Any]) -> list[str]:
    """clipslim's shipped configs that manual inheritance accepts from ``teacher`` (same patch, grid, head dim)."""
    names = []
    for path in sorted(CONFIG_DIR.glob("*.json")):
        cfg = open_clip.get_model_config(path.stem)
        if not cfg or cfg == teacher_cfg:
            continue
        try:
            check_compatible(teacher, _meta_model(cfg))
        except (InheritError, TypeError, AttributeError):  # another family, or not a plain CLIP config
            continue
        names.append(path.stem)
    return names


def _sized(cfg: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    if image_size is None or cfg.get("vision_cfg", {}).get("image_size") == image_size:
        return cfg
    return {**cfg, "vision_cfg": {**cfg["vision_cfg"], "image_size": image_size}}


def _register(name: str, cfg: dict[str, Any], folder: Path) -> None:
    path = folder / f"{name}.json"
    atomic_write_json(path, cfg)
    open_clip.add_model_config(path)


def _one(token: str, teacher_arch: str, teacher_cfg: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    fraction = parse_fraction(token)
    if fraction is not None:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", teacher_arch)
        return (
            f"{base}-w{fraction[0]:g}-d{fraction[1]:g}",
            f"fraction {token} of {teacher_arch}",
            (fraction_config(teacher_cfg, *fraction)),
        )
    cfg = open_clip.get_model_config(token)
    if cfg is None:
        raise ValueError(f"--students: unknown config '{token}' (a config name or WIDTHxDEPTH like 0.5x0.5)")
    return token, "shipped" if (CONFIG_DIR / f"{token}.json").is_file() else "given", cfg


def resolve_students(
    tokens: list[str] | None,
    teacher: nn.Module,
    teacher_arch: str,
    teacher_cfg: dict[str, Any],
    image_size: int | None,
    out: Path,
) -> list[Candidate]:
    """Candidates for ``tokens`` (default: compatible shipped configs + :data:`DEFAULT_FRACTIONS`), deduplicated by
    config, at ``image_size``; fractions and resized configs are written to ``out/configs`` and registered."""
    tokens = list(tokens or [*shipped_for(teacher, teacher_cfg), *DEFAULT_FRACTIONS])
    seen: set[str] = set()
    candidates = []
    for token in tokens:
        name, source, cfg = _one(token, teacher_arch, teacher_cfg)
        sized = _sized(cfg, image_size)
        key = json.dumps(sized, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        if sized is not cfg:
            name = f"{name}-{image_size}px"
        if sized is not cfg or source.startswith("fraction"):
            _register(name, sized, out / "configs")
        candidates.append(Candidate(name, source, sized))
    return candidates
