"""The Distiller: the one module that is trained and checkpointed.

It owns the student and every objective (with whatever those learn: projectors, temperatures), so an optimizer
over ``distiller.parameters()``, a DDP wrapper or a checkpoint of ``distiller.state_dict()`` sees all trainable
state. The teacher is *not* a submodule: it is frozen, never saved with the student, and may be replaced by cached
embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import gather_outputs
from .objectives import Objective, get_objective
from .outputs import Dims, Outputs, embed_dim, encode
from .recipe import ObjectiveSpec


class OnlineTeacher:
    """Runs a frozen teacher per batch in eval mode under no_grad (the anchors' cost, which caching removes).

    It reads its own pixels and tokens (``image_key`` / ``text_key``, made by the loader with the teacher's own
    transform and tokenizer, see :mod:`clipslim.data.views`); they are the student's keys when both agree."""

    def __init__(self, model: nn.Module, image_key: str = "image", text_key: str = "text") -> None:
        self.model = model.eval().requires_grad_(False)
        self.image_key, self.text_key = image_key, text_key

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> Outputs:
        dtype = next(self.model.parameters()).dtype  # a teacher kept in bf16/fp16 (train.teacher_precision)
        out = encode(self.model, batch[self.image_key].to(dtype), batch[self.text_key])
        if dtype != torch.float32:
            out.image, out.text, out.logit_scale = out.image.float(), out.text.float(), out.logit_scale.float()
        return out


class CachedTeacher:
    """Teacher outputs read from the batch (``teacher_image`` / ``teacher_text``, stored by `clipslim cache-teacher`)
    at the teacher's own logit scale: distillation without a teacher forward."""

    def __init__(self, logit_scale: float, logit_bias: float | None = None) -> None:
        self.logit_scale, self.logit_bias = logit_scale, logit_bias

    def __call__(self, batch: dict[str, Any]) -> Outputs:
        image = F.normalize(batch["teacher_image"].float(), dim=-1)  # stored in fp16/bf16: re-normalise
        text = F.normalize(batch["teacher_text"].float(), dim=-1)
        scale = torch.tensor(self.logit_scale, device=image.device)
        bias = None if self.logit_bias is None else torch.tensor(self.logit_bias, device=image.device)
        return Outputs(image=image, text=text, logit_scale=scale, logit_bias=bias)


@runtime_checkable
class HasStudentView(Protocol):
    """An objective that needs its own student forward (e.g. MFD's masked image tower).

    ``student_view`` gets the student model, the batch and the shared student outputs and returns the outputs this
    objective's ``forward`` should see instead; it runs inside ``Distiller.forward``, so gradients flow as usual.
    """

    def student_view(self, model: nn.Module, batch: dict[str, Any], student: Outputs) -> Outputs: ...


class Distiller(nn.Module):
    """Student + weighted objectives; ``forward`` returns ``{"loss": total, "<name>_loss": ..., ...}``.

    Every objective sees the same student outputs unless it implements :class:`HasStudentView`.
    """

    def __init__(
        self, student: nn.Module, specs: list[ObjectiveSpec], teacher_dim: int | None = None, local_loss: bool = False
    ) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.student = student
        s_dims = Dims(embed_dim(student))
        t_dims = Dims(teacher_dim) if teacher_dim else None
        self.objectives = nn.ModuleDict({s.name: get_objective(s.name)(s.cfg, s_dims, t_dims) for s in specs})
        self.weights = {s.name: s.weight for s in specs}

    @property
    def needs_teacher(self) -> bool:
        return any(type(obj).reads_teacher(obj.cfg) for obj in self.objectives.values())

    def encode_batch(self, batch: dict[str, Any]) -> Outputs:
        """The student's outputs for a batch (or a micro-batch)."""
        return encode(self.student, batch["image"], batch["text"])

    def forward(
        self, batch: dict[str, Any], teacher: Outputs | None = None, splice: Callable | None = None
    ) -> dict[str, torch.Tensor]:
        """``splice`` (gradient accumulation, see clipslim.train.accum) makes the student's outputs of the whole
        batch from :meth:`encode_batch` of one micro-batch plus cached rows."""
        local = self.encode_batch(batch) if splice is None else splice(self.encode_batch)
        student = gather_outputs(local, self.local_loss)  # under torchrun: the global batch, with gradient
        teacher = gather_outputs(teacher)
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=local.image.device)
        for name, objective in self.objectives.items():
            view = student
            if isinstance(objective, HasStudentView):
                view = gather_outputs(objective.student_view(self.student, batch, local), self.local_loss)
            terms = _call(objective, view, teacher, batch)
            total = total + self.weights[name] * terms[f"{name}_loss"]
            out.update(terms)
        out["loss"] = total
        out["logit_scale"] = student.logit_scale.detach()
        return out

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """open_clip's rule: the learned scale never exceeds 100 (ln 100 in log space)."""
        self.student.logit_scale.clamp_(0, math.log(max_scale))


def _call(objective: Objective, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict:
    if type(objective).reads_teacher(objective.cfg) and teacher is None:
        raise RuntimeError(f"objective '{objective.name}' needs teacher outputs but none were given")
    return objective(student, teacher, batch)
