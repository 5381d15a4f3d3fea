"""The Objective interface and its registry.

An objective is one loss term. It is an ``nn.Module`` so that anything it learns (projectors, temperatures) lives
inside the trained, checkpointed module. Recipes name objectives and give each a weight plus typed options;
unknown options are errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import build
from ..outputs import Dims, Outputs


@dataclass
class ObjectiveConfig:
    """Base for per-objective options; subclasses add typed fields."""


class Objective(nn.Module):
    """One loss term: ``forward(student, teacher, batch) -> {"<name>_loss": tensor, ...metrics}``."""

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = False
    Config: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig

    def __init__(self, cfg: ObjectiveConfig, student_dims: Dims, teacher_dims: Dims | None) -> None:
        super().__init__()
        self.cfg = cfg

    @classmethod
    def reads_teacher(cls, cfg: ObjectiveConfig) -> bool:
        """Whether this objective with these options reads teacher outputs: ``needs_teacher``, or an option that
        does (clip's teacher-mined positives)."""
        return cls.needs_teacher

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available to recipes under ``cls.name``."""
    if cls.name in OBJECTIVES:
        raise ValueError(f"objective '{cls.name}' registered twice")
    OBJECTIVES[cls.name] = cls
    return cls


def get_objective(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective '{name}'; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def parse_config(cls: type[Objective], options: dict[str, Any], where: str) -> ObjectiveConfig:
    """Build the objective's typed config from recipe options; unknown or mistyped keys name the field."""
    return build(cls.Config, options, where)
