"""Training-time token compression installed on a ViT: patch dropout + patch scaling, set by a step hook."""

from __future__ import annotations

import logging

from torch import nn

from ..hooks import StepContext
from .schedule import TokenSection

log = logging.getLogger(__name__)


class TokenCompression:
    """Patch dropout + patch scaling installed on one open_clip ViT; :meth:`set` changes both at once."""

    def __init__(self, visual: nn.Module, kernel_resize: str = "pinv") -> None:
        from .dropout import ScheduledPatchDropout
        from .patch_scale import PatchScaler, check_scalable

        check_scalable(visual, 1)
        self.visual = visual
        self.dropout = ScheduledPatchDropout()
        visual.patch_dropout = self.dropout
        self.scaler = PatchScaler(visual, kernel_resize).install()

    def set(self, patch_dropout: float, patch_scale: int) -> None:
        self.dropout.ratio = patch_dropout
        self.scaler.scale = patch_scale

    @property
    def setting(self) -> tuple[float, int]:
        return self.dropout.ratio, self.scaler.scale

    def remove(self) -> None:
        """Back to the stock forward (open_clip's own no-op dropout)."""
        self.visual.patch_dropout = nn.Identity()
        self.scaler.remove()


class TokenScheduleHook:
    """Step hook: before each step, put the phase of ``section`` for that step into force."""

    def __init__(self, section: TokenSection, compression: TokenCompression) -> None:
        self.section, self.compression = section, compression

    def before_step(self, ctx: StepContext) -> None:
        phase = self.section.at(ctx.step, ctx.total_steps)
        setting = (phase.patch_dropout, phase.patch_scale)
        if setting != self.compression.setting:
            log.info("step %d: patch dropout %.2f, patch scale %dx", ctx.step, *setting)
            self.compression.set(*setting)


def token_hook(section: TokenSection, model: nn.Module) -> TokenScheduleHook:
    """Install token compression on ``model.visual`` and return the hook that schedules it (errors name the field)."""
    from ..config import ConfigError
    from .patch_scale import check_scalable

    visual = getattr(model, "visual", None)
    if visual is None:
        raise ConfigError("tokens: the student has no image tower (model.visual)")
    for i, phase in enumerate(section.phases()):
        check_scalable(visual, phase.patch_scale, f"tokens.schedule[{i}]")
    return TokenScheduleHook(section, TokenCompression(visual, section.kernel_resize))
