"""``slimmable``: Scala training of a CLIP student whose sub-widths are all usable (see :mod:`clipslim.slimmable`).

Per step the full student is trained by the recipe's other objectives (its target is the teacher CLIP, e.g. through
``affinity``); this term activates the smallest width and ``n_random`` random intermediate widths on the same batch
and trains each one by *scale coordination* (Scala §3.3):

- progressive knowledge transfer: widths are run from large to small and each learns from the next larger active
  width's (detached) outputs (``transfer: full`` makes every width learn from the full net, US-Net style);
- stable sampling: with two random widths, one is drawn from the upper and one from the lower half of the
  intermediate widths, so the gap between neighbours stays steady;
- noise calibration: besides the distillation term, each width gets the plain CLIP loss on the batch.

The distillation term is affinity mimicking between widths,
``½[CE(sm(τ I_t Tᵀ), τ I_r Tᵀ) + CE(sm(τ T I_tᵀ), τ T I_rᵀ)]``,
with ``I_t`` the target width's image embeddings, ``T`` the text embeddings (the full student's, detached, unless the
text tower slims too) and ``τ`` the student's current scale (detached). Isolated activation is the slicing layout
(``isolated``), not a loss: the smallest and the full width take leading channels, the others trailing ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import ConfigError
from .affinity import soft_cross_entropy
from .base import Dims, Objective, ObjectiveConfig, Outputs, register
from .clip import contrastive_logits

if TYPE_CHECKING:
    from ..slimmable import SlimmableCLIP

WHERE = "objectives.slimmable"


@dataclass
class SlimmableConfig(ObjectiveConfig):
    widths: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    """Width ratios the one checkpoint must serve; 1.0 (the full net) is always included."""
    n_random: int = 1
    """Random intermediate widths activated per step besides the full and the smallest (Scala: 2)."""
    isolated: bool = True
    """Isolated activation: the smallest width uses leading channels, intermediate widths trailing ones."""
    transfer: str = "progressive"
    """``progressive``: each width distils from the next larger active one; ``full``: all from the full net."""
    ce_weight: float = 1.0
    """Weight of each sub-width's own CLIP loss (Scala's noise calibration); 0 disables it."""
    text: bool = False
    """Slim the text tower too (its width must allow whole heads at every ratio)."""
    seed: int = 0

    def validate(self, where: str) -> None:
        if not self.widths or any(not 0 < w <= 1 for w in self.widths):
            raise ConfigError(f"{where}.widths: expected ratios in (0, 1], got {self.widths}")
        if self.n_random < 0:
            raise ConfigError(f"{where}.n_random: expected >= 0, got {self.n_random}")
        if self.transfer not in ("progressive", "full"):
            raise ConfigError(f"{where}.transfer: expected 'progressive' or 'full', got '{self.transfer}'")
        if self.ce_weight < 0:
            raise ConfigError(f"{where}.ce_weight: expected >= 0, got {self.ce_weight}")


def width_distill_loss(sub: Outputs, target: Outputs) -> torch.Tensor:
    """Affinity mimicking of ``sub`` towards ``target`` at the sub-net's scale; ``target`` should be detached."""
    p_i2t, p_t2i = contrastive_logits(target.image, target.text, target.logit_scale)
    s_i2t, s_t2i = contrastive_logits(sub.image, sub.text, sub.logit_scale)
    return 0.5 * (soft_cross_entropy(p_i2t, s_i2t) + soft_cross_entropy(p_t2i, s_t2i))


def clip_loss(out: Outputs) -> torch.Tensor:
    i2t, t2i = contrastive_logits(out.image, out.text, out.logit_scale)
    labels = torch.arange(i2t.shape[0], device=i2t.device)
    return 0.5 * (nn.functional.cross_entropy(i2t, labels) + nn.functional.cross_entropy(t2i, labels))


def sample_widths(widths: list[float], n_random: int, rng: random.Random) -> list[float]:
    """Active widths of a step, largest first: the full, ``n_random`` intermediates (stable sampling), the smallest."""
    full, smallest = max(widths), min(widths)
    middle = sorted(w for w in widths if smallest < w < full)
    picked: list[float] = []
    if n_random >= len(middle):
        picked = middle
    elif n_random == 2 and _halves(middle, (full + smallest) / 2):
        upper, lower = _halves(middle, (full + smallest) / 2)  # Scala's stable sampling: [mid, full), (smallest, mid)
        picked = [rng.choice(upper), rng.choice(lower)]
    elif n_random > 0:
        picked = rng.sample(middle, n_random)
    return sorted({full, smallest, *picked}, reverse=True)


def _halves(middle: list[float], mid: float) -> tuple[list[float], list[float]] | None:
    upper, lower = [w for w in middle if w >= mid], [w for w in middle if w < mid]
    return (upper, lower) if upper and lower else None


@register
class SlimmableObjective(Objective):
    name = "slimmable"
    Config = SlimmableConfig

    def __init__(self, cfg: SlimmableConfig, student_dims: Dims, teacher_dims: Dims | None) -> None:
        super().__init__(cfg, student_dims, teacher_dims)
        self.cfg: SlimmableConfig = cfg
        cfg.validate(WHERE)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # checkpointed: resumes draw the same widths
        self.slim: SlimmableCLIP | None = None
        self.last_widths: list[float] = []

    def attach(self, model: nn.Module) -> None:
        """Make ``model`` slimmable (nothing is copied but frozen skeletons; the weights stay the model's)."""
        from ..slimmable import SlimmableCLIP  # lazy: clipslim.slimmable imports inherit, which imports recipes

        towers = ("visual", "text") if self.cfg.text else ("visual",)
        try:
            slim = SlimmableCLIP(model, self.cfg.widths, isolated=self.cfg.isolated, towers=towers)
        except ValueError as err:
            raise ConfigError(f"{WHERE}: {err}") from err
        object.__setattr__(self, "slim", slim)  # a reference, not a submodule: the Distiller owns the student

    def _sub_outputs(self, ratio: float, batch: dict[str, Any], full: Outputs) -> Outputs:
        assert self.slim is not None
        image = self.slim.encode_image(batch["image"], ratio)
        text = self.slim.encode_text(batch["text"], ratio) if self.cfg.text else full.text.detach()
        return Outputs(image=image, text=text, logit_scale=full.logit_scale.detach())

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.slim is None:
            raise RuntimeError("slimmable: attach(student_model) must be called before training")
        if student.rows is not None or student.image.shape[0] != batch["image"].shape[0]:
            raise ConfigError(f"{WHERE}: multi-process (torchrun) training is not supported yet")
        rng = random.Random(self.cfg.seed * 1_000_003 + int(self.calls))
        if self.training:
            self.calls += 1
        active = sample_widths(self.slim.widths, self.cfg.n_random, rng)
        self.last_widths = active
        full = Outputs(student.image.detach(), student.text.detach(), student.logit_scale.detach())
        target, kd, ce = full, student.image.new_zeros(()), student.image.new_zeros(())
        for ratio in active[1:]:
            sub = self._sub_outputs(ratio, batch, student)
            kd = kd + width_distill_loss(sub, target)
            if self.cfg.ce_weight:
                ce = ce + clip_loss(sub)
            if self.cfg.transfer == "progressive":
                target = Outputs(sub.image.detach(), sub.text.detach(), sub.logit_scale)
        loss = kd + self.cfg.ce_weight * ce
        return {"slimmable_loss": loss, "slimmable_kd": kd.detach(), "slimmable_ce": ce.detach()}
