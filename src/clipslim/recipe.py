"""Recipes: one YAML file says what to train, from what, with which loss terms.

```yaml
name: demo-distill
teacher: shapes-teacher:demo
student: {arch: shapes-student-50, init: inherit}
data: {train: .data/shapes/train, eval: .data/shapes}
objectives: {clip: 0.0, affinity: {weight: 1.0, teacher_scale: 50}}
train: {steps: 400, batch_size: 128, lr: 1.0e-3}
```
Everything is checked by :func:`load_recipe` before any compute starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import ConfigError, build, to_dict
from .objectives import get_objective, parse_config
from .objectives.base import ObjectiveConfig


@dataclass
class StudentSection:
    arch: str = ""
    """open_clip architecture of the student (e.g. shapes-student-50, ViT-S-32)."""
    init: str = "random"
    """random | inherit (TinyCLIP manual rule from the teacher) | a model spec to start from."""

    def validate(self, where: str) -> None:
        if not self.arch:
            raise ConfigError(f"{where}.arch: required (an open_clip architecture name)")


@dataclass
class DataSection:
    train: str = ""
    """Training pairs: webdataset shard dir / .tar / brace pattern, or a CSV (filepath,caption)."""
    eval: str | None = None
    """A shapes-style eval dir (eval/*.tar + classnames.txt + templates.txt) for zero-shot and retrieval."""
    num_workers: int = 1
    augment: bool = False
    """Use open_clip's random-crop training transform instead of the deterministic eval transform."""

    def validate(self, where: str) -> None:
        if not self.train:
            raise ConfigError(f"{where}.train: required (path to training shards or CSV)")
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers: must be >= 0, got {self.num_workers}")


@dataclass
class TrainSection:
    steps: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that has it (else fp16 + loss scaling), fp32 on CPU."""
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 0
    """Evaluate on data.eval every N steps (0: only at the end)."""

    def validate(self, where: str) -> None:
        for name in ("steps", "batch_size", "log_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be > 0, got {self.lr}")
        if self.warmup < 0 or self.eval_every < 0:
            raise ConfigError(f"{where}.warmup/eval_every: must be >= 0")


@dataclass
class ObjectiveSpec:
    name: str
    weight: float
    cfg: ObjectiveConfig


@dataclass
class Recipe:
    name: str = "run"
    description: str = ""
    teacher: str | None = None
    """Teacher model spec (arch, arch:tag, arch:/path/weights, hub folder); frozen, eval mode, no grad."""
    student: StudentSection = field(default_factory=StudentSection)
    data: DataSection = field(default_factory=DataSection)
    objectives: dict[str, Any] = field(default_factory=dict)
    """name -> weight, or name -> {weight: w, <options>}. A weight of 0 turns the term off entirely."""
    train: TrainSection = field(default_factory=TrainSection)

    def objective_specs(self) -> list[ObjectiveSpec]:
        """Typed objectives with non-zero weight, in recipe order."""
        specs = []
        for name, value in self.objectives.items():
            where = f"objectives.{name}"
            options = dict(value) if isinstance(value, dict) else {"weight": value}
            weight = options.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ConfigError(f"{where}.weight: expected a number >= 0, got {weight!r}")
            try:
                cls = get_objective(name)
            except KeyError as err:
                raise ConfigError(f"{where}: {err.args[0]}") from err
            cfg = parse_config(cls, options, where)
            if weight > 0:
                specs.append(ObjectiveSpec(name, float(weight), cfg))
        return specs

    def validate(self, where: str) -> None:
        specs = self.objective_specs()
        if not specs:
            raise ConfigError("objectives: at least one objective needs a weight > 0")
        needs = [s.name for s in specs if get_objective(s.name).needs_teacher]
        if needs and not self.teacher:
            raise ConfigError(f"teacher: required by objective(s) {', '.join(needs)}")
        if self.student.init == "inherit" and not self.teacher:
            raise ConfigError("student.init: 'inherit' needs a teacher")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.steps=20", "objectives.clip=0"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{pair}': expected KEY=VALUE, e.g. train.steps=20")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def recipe_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    return build(Recipe, _merge(data, parse_overrides(overrides or [])), "recipe")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a YAML recipe; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    try:
        return recipe_from_dict(data, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
