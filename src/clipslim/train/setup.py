"""Turn a validated recipe into models: teacher (frozen), student (random / inherited / loaded), Distiller."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..attention import use_fast_attention
from ..config import ConfigError
from ..data.views import ModelView, Tokenizers, Views, model_view
from ..distiller import CachedTeacher, Distiller, OnlineTeacher
from ..hooks import StepHook
from ..models import ClipBundle, adopt_preprocess, describe, load_model, weights_fingerprint
from ..outputs import embed_dim
from ..recipe import Recipe

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
    """Called before every step with a :class:`clipslim.hooks.StepContext`."""
    teacher_cache: TeacherCache | None = None
    """data.teacher_cache, validated: teacher embeddings come from it and the teacher never runs."""
    views: list[ModelView] = field(default_factory=list)
    """What each model reads (student first); the loader makes one tensor per distinct transform/tokenizer."""

    def loader_transforms(self, augment: bool) -> tuple[Callable, Callable]:
        """(image transform, tokenizer) for the training loader: the student's own when every model reads the same
        pixels and tokens (bit-identical to a student-only run), else per-model :class:`Views` / :class:`Tokenizers`."""
        s = self.student
        pixels = self.views if len({v.pixels_id for v in self.views}) > 1 else None
        tokens = self.views if len({v.tokens_id for v in self.views}) > 1 else None
        transform = Views(pixels, augment) if pixels else (s.preprocess_train if augment else s.preprocess_val)
        return transform, Tokenizers(tokens) if tokens else s.tokenizer

    def teacher_keys(self) -> tuple[str, str]:
        """Batch keys of the teacher's pixels and tokens (the student's when they are the same)."""
        s, t = self.views[0], next(v for v in self.views if v.name == "teacher")
        return (
            t.image_key if t.pixels_id != s.pixels_id else "image",
            t.text_key if t.tokens_id != s.tokens_id else "text",
        )

    def summary(self, recipe: Recipe) -> dict[str, Any]:
        """Who reads what: recorded in results.json and printed at the start of a run."""
        return {
            "student": describe(self.student),
            "teacher": self._teacher_summary(recipe),
            "teacher_source": "cache" if self.teacher_cache else "online" if self.teacher else "none",
            "data": recipe.data.train, "steps": recipe.train.steps, "batch_size": recipe.train.batch_size,
            "objectives": dict(self.distiller.weights),
        }  # fmt: skip

    def _teacher_summary(self, recipe: Recipe) -> dict[str, Any] | None:
        if self.teacher_cache is not None:
            m = self.teacher_cache.manifest
            return {"spec": m["teacher"]["spec"], "weights": m["teacher"].get("fingerprint"),
                    "cache": str(self.teacher_cache.root), **m["image"]}  # fmt: skip
        if self.teacher is None:
            return None
        return {**describe(self.teacher), "weights": weights_fingerprint(self.teacher.model)}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{name}' requested but no CUDA device is available")
    return torch.device(name)


def build_student(recipe: Recipe, teacher: ClipBundle | None) -> tuple[ClipBundle, dict | None]:
    init = recipe.student.init
    if init == "random" or recipe.student.inherits:
        student = load_model(recipe.student.arch, tokenizers=recipe.tokenizers)
    else:
        student = load_model(init, tokenizers=recipe.tokenizers)
        if student.arch != recipe.student.arch:
            log.warning("student.init %s has arch %s, not %s", init, student.arch, recipe.student.arch)
    report = None
    if recipe.student.inherits:
        inherit_from = recipe.student.inherit_from
        source = load_model(inherit_from, tokenizers=recipe.tokenizers) if inherit_from else teacher
        assert source is not None
        report = _inherit(recipe, source, student)
        if recipe.student.preprocess == "teacher":
            report["preprocess_adopted"] = adopt_preprocess(student, source)
            if report["preprocess_adopted"]:
                log.info("student reads images like %s: %s", source.spec, _changes(report["preprocess_adopted"]))
    return student, report


def _changes(changed: dict[str, list]) -> str:
    return ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())


def _inherit(recipe: Recipe, source: ClipBundle, student: ClipBundle) -> dict:
    """inherit (manual rule) or importance:<method>, with calibration batches from data.train when needed."""
    from ..inherit import check_compatible, inherit_importance, inherit_manual
    from ..inherit.importance import calibration_batches

    name = "the teacher" if not recipe.student.inherit_from else recipe.student.inherit_from
    try:
        check_compatible(source.model, student.model)
    except ValueError as err:
        raise ConfigError(f"student.init: cannot inherit from {name}: {err}") from err
    start = recipe.student.start
    if start.kind == "inherit":
        return inherit_manual(source.model, student.model)
    method = start.method
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
    teacher = load_model(recipe.teacher, tokenizers=recipe.tokenizers) if load_teacher else None
    student, report = build_student(recipe, teacher)
    cache = _open_cache(recipe, student, teacher) if cached else None
    teacher = None if cached else teacher  # cached mode: loaded only to inherit from, never run
    if teacher is not None:
        teacher.model.to(device).eval().requires_grad_(False)
    t_dim = cache.embed_dim if cache else embed_dim(teacher.model) if teacher else None
    distiller = Distiller(student.model, recipe.objective_specs(), t_dim, recipe.train.local_loss)
    for objective in distiller.objectives.values():
        if hasattr(objective, "attach"):  # e.g. l0_sparsity: masks that gate the student's own forward
            objective.attach(student.model)
    distiller = distiller.to(device)
    if recipe.train.fast_attention:
        for bundle in (student, teacher):
            if bundle is not None:
                use_fast_attention(bundle.model)
    if teacher is not None and not distiller.needs_teacher and recipe.student.init != "inherit":
        log.info("teacher is not used by any objective; it will not run during training")
    hooks: list[StepHook] = [obj for obj in distiller.objectives.values() if isinstance(obj, StepHook)]
    if recipe.tokens is not None:
        from ..tokens.compression import token_hook

        hooks.append(token_hook(recipe.tokens, student.model))
    views = [model_view(student, "student", "image", "text")]
    if teacher is not None:
        views.append(model_view(teacher, "teacher", "teacher_pixels", "teacher_tokens"))
    return Built(distiller, student, teacher, report, hooks, cache, views)


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
    if teacher is None and recipe.teacher:  # named but not needed to inherit: loaded once, only for this check
        teacher = load_model(recipe.teacher, tokenizers=recipe.tokenizers)
    if teacher is not None:
        check_teacher_weights(cache, teacher.model)
    return cache


def teacher_source(built: Built) -> OnlineTeacher | CachedTeacher | None:
    """Where teacher outputs come from: the cache (no teacher forward), the online teacher, or nowhere."""
    if not built.distiller.needs_teacher:
        return None
    if built.teacher_cache is not None:
        return CachedTeacher(built.teacher_cache.logit_scale, built.teacher_cache.logit_bias)
    return None if built.teacher is None else OnlineTeacher(built.teacher.model, *built.teacher_keys())
