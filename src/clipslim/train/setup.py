"""Turn a validated recipe into models: teacher (frozen), student (random / inherited / loaded), Distiller."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..config import ConfigError
from ..distiller import CachedTeacher, Distiller, OnlineTeacher, embed_dim
from ..models import ClipBundle, load_model
from ..recipe import Recipe
from .hooks import StepHook

if TYPE_CHECKING:
    from ..data.teacher_cache import TeacherCache

log = logging.getLogger(__name__)


@dataclass
class Built:
    distiller: Distiller
    student: ClipBundle
    teacher: ClipBundle | None
    inherit_report: dict | None = None
    hooks: list[StepHook] = field(default_factory=list)
    """Called before every step (see :mod:`clipslim.train.hooks`)."""
    teacher_cache: TeacherCache | None = None
    """data.teacher_cache, validated: teacher embeddings come from it and the teacher never runs."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{name}' requested but no CUDA device is available")
    return torch.device(name)


def _check_pairing(teacher: ClipBundle, student: ClipBundle) -> None:
    """The teacher reads the student's batch, so image size and context length must agree."""
    t_v, s_v = teacher.model_cfg.get("vision_cfg", {}), student.model_cfg.get("vision_cfg", {})
    t_t, s_t = teacher.model_cfg.get("text_cfg", {}), student.model_cfg.get("text_cfg", {})
    if t_v.get("image_size") != s_v.get("image_size"):
        raise ConfigError(f"teacher: image_size {t_v.get('image_size')} differs from student {s_v.get('image_size')}")
    if t_t.get("context_length", 77) != s_t.get("context_length", 77):
        raise ConfigError(
            f"teacher: context_length {t_t.get('context_length', 77)} differs from "
            f"student {s_t.get('context_length', 77)}"
        )


def build_student(recipe: Recipe, teacher: ClipBundle | None) -> tuple[ClipBundle, dict | None]:
    init = recipe.student.init
    if init == "random" or recipe.student.inherits:
        student = load_model(recipe.student.arch)
    else:
        student = load_model(init)
        if student.arch != recipe.student.arch:
            log.warning("student.init %s has arch %s, not %s", init, student.arch, recipe.student.arch)
    report = None
    if recipe.student.inherits:
        source = load_model(recipe.student.inherit_from) if recipe.student.inherit_from else teacher
        assert source is not None
        report = _inherit(recipe, source, student)
    return student, report


def _inherit(recipe: Recipe, source: ClipBundle, student: ClipBundle) -> dict:
    """inherit (manual rule) or importance:<method>, with calibration batches from data.train when needed."""
    from ..inherit import check_compatible, inherit_importance, inherit_manual
    from ..inherit.importance import calibration_batches

    name = "the teacher" if not recipe.student.inherit_from else recipe.student.inherit_from
    try:
        check_compatible(source.model, student.model)
    except ValueError as err:
        raise ConfigError(f"student.init: cannot inherit from {name}: {err}") from err
    if recipe.student.init == "inherit":
        return inherit_manual(source.model, student.model)
    method = recipe.student.init.removeprefix("importance:")
    batches = None
    if method != "magnitude":
        bs = min(recipe.train.batch_size, 64)
        batches = calibration_batches(recipe.data.train, source, recipe.student.calib_batches, bs)
    return inherit_importance(source.model, student.model, method=method, calib_batches=batches)


def build(recipe: Recipe, device: torch.device) -> Built:
    """Load teacher and student, inherit if asked, and wrap the student with its objectives."""
    if recipe.stages:
        raise ConfigError("stages: a multi-stage recipe runs with `clipslim stages` (clipslim.inherit.run_stages)")
    cached = recipe.data.teacher_cache is not None
    load_teacher = recipe.teacher and (not cached or (recipe.student.inherits and not recipe.student.inherit_from))
    teacher = load_model(recipe.teacher) if load_teacher else None
    student, report = build_student(recipe, teacher)
    cache = _open_cache(recipe, student, teacher) if cached else None
    teacher = None if cached else teacher  # cached mode: loaded only to inherit from, never run
    if teacher is not None:
        _check_pairing(teacher, student)
        teacher.model.to(device).eval().requires_grad_(False)
    t_dim = cache.embed_dim if cache else embed_dim(teacher.model) if teacher else None
    distiller = Distiller(student.model, recipe.objective_specs(), t_dim, recipe.train.local_loss)
    for objective in distiller.objectives.values():
        if hasattr(objective, "attach"):  # e.g. l0_sparsity: masks that gate the student's own forward
            objective.attach(student.model)
    distiller = distiller.to(device)
    if teacher is not None and not distiller.needs_teacher and recipe.student.init != "inherit":
        log.info("teacher is not used by any objective; it will not run during training")
    hooks: list[StepHook] = [obj for obj in distiller.objectives.values() if isinstance(obj, StepHook)]
    if recipe.tokens is not None:
        from ..tokens import token_hook

        hooks.append(token_hook(recipe.tokens, student.model))
    return Built(distiller, student, teacher, report, hooks, cache)


def _open_cache(recipe: Recipe, student: ClipBundle, teacher: ClipBundle | None) -> TeacherCache:
    """Check data.teacher_cache against the data, the recipe's teacher and the student before any compute."""
    from ..data.teacher_cache import check_teacher_weights, open_teacher_cache

    assert recipe.data.teacher_cache is not None
    size = student.model_cfg.get("vision_cfg", {}).get("image_size")
    pre = student.preprocess_cfg
    cache = open_teacher_cache(
        recipe.data.teacher_cache, recipe.data.train, image_size=size, mean=pre["mean"], std=pre["std"],
        teacher=recipe.teacher,
    )  # fmt: skip
    if teacher is not None:
        check_teacher_weights(cache, teacher.model)
    return cache


def teacher_source(built: Built) -> OnlineTeacher | CachedTeacher | None:
    """Where teacher outputs come from: the cache (no teacher forward), the online teacher, or nowhere."""
    if not built.distiller.needs_teacher:
        return None
    if built.teacher_cache is not None:
        return CachedTeacher(built.teacher_cache.logit_scale, built.teacher_cache.logit_bias)
    return None if built.teacher is None else OnlineTeacher(built.teacher.model)
