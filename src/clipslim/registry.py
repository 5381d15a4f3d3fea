"""The Objective interface and its name registry: one loss term, known by name before any of them is imported.

An objective is one loss term. It is an ``nn.Module`` so that anything it learns (projectors, temperatures) lives
inside the trained, checkpointed module. Recipes name objectives and give each a weight plus typed options;
unknown options are errors that name the key. A leaf: method packages (``objectives/``, ``inherit/l0.py``) define
objectives against it without importing each other.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import build
from .outputs import Dims, Outputs

__all__ = ["OBJECTIVES", "Dims", "Objective", "ObjectiveConfig", "Outputs", "get_objective", "objective_names",
           "parse_config", "register"]  # fmt: skip


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


OBJECTIVE_MODULES: dict[str, str] = {
    "clip": "clipslim.objectives.clip",
    "affinity": "clipslim.objectives.affinity",
    "feature": "clipslim.objectives.feature",
    "masked_feature": "clipslim.objectives.masked_feature",
    "icl": "clipslim.objectives.icl",
    "cross_kd": "clipslim.objectives.cross_kd",
    "gradient": "clipslim.objectives.gradient",
    "fusion": "clipslim.objectives.fusion",
    "proto": "clipslim.objectives.proto",
    "slimmable": "clipslim.objectives.slimmable",
    "l0_sparsity": "clipslim.inherit.l0",
}
"""Every shipped objective by name and the module that defines it: a recipe can name any of them whatever was
imported before, and a module is imported only when a recipe uses it (ProtoCLIP's faiss stays unloaded otherwise).
A test checks this table against every ``@register`` in the source."""

OBJECTIVES: dict[str, type[Objective]] = {}
"""Objectives imported so far (shipped ones arrive on first use; tests may register their own)."""


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available to recipes under ``cls.name``."""
    if cls.name in OBJECTIVES:
        raise ValueError(f"objective '{cls.name}' registered twice")
    OBJECTIVES[cls.name] = cls
    return cls


def get_objective(name: str) -> type[Objective]:
    if name not in OBJECTIVES and name in OBJECTIVE_MODULES:
        importlib.import_module(OBJECTIVE_MODULES[name])
    if name not in OBJECTIVES:
        known = sorted({*OBJECTIVE_MODULES, *OBJECTIVES})
        raise KeyError(f"unknown objective '{name}'; known: {', '.join(known)}")
    return OBJECTIVES[name]


def objective_names() -> list[str]:
    """Every objective a recipe may name."""
    return sorted({*OBJECTIVE_MODULES, *OBJECTIVES})


def parse_config(cls: type[Objective], options: dict[str, Any], where: str) -> ObjectiveConfig:
    """Build the objective's typed config from recipe options; unknown or mistyped keys name the field."""
    return build(cls.Config, options, where)
