"""Recipe section ``tokens:``: training-time sequence compression (patch dropout, patch scaling) on a schedule.

```yaml
tokens:
  schedule:                                   # phases, by fraction of train.steps
    - {until: 0.5, patch_dropout: 0.5, patch_scale: 2}   # first half: half the patches, at twice the patch size
    - {until: 0.8, patch_dropout: 0.25}
    - {until: 1.0}                            # the end trains on the full sequence, as evaluated
```
A schedule is a pure function of the step, so a resumed run picks up the same phase. ``patch_dropout`` alone
(no ``schedule``) is one phase for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import ConfigError


@dataclass
class TokenPhase:
    """One phase of the schedule: the setting used while ``step / train.steps < until``."""

    until: float = 1.0
    """End of this phase as a fraction of training, in (0, 1]; phases are in increasing order."""
    patch_dropout: float = 0.0
    """Fraction of patch tokens dropped per sample (CLS kept), in [0, 1)."""
    patch_scale: int = 1
    """Patch size multiplier (2: a 16 px ViT runs on 32 px patches, a quarter of the tokens); 1 is native."""

    def validate(self, where: str) -> None:
        if not 0.0 < self.until <= 1.0:
            raise ConfigError(f"{where}.until: must be in (0, 1], got {self.until}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"{where}.patch_dropout: must be in [0, 1), got {self.patch_dropout}")
        if self.patch_scale < 1:
            raise ConfigError(f"{where}.patch_scale: must be >= 1, got {self.patch_scale}")


@dataclass
class TokenSection:
    patch_dropout: float = 0.0
    """Fraction of patch tokens dropped per sample (CLS kept) for the whole run; ignored when ``schedule`` is set."""
    schedule: list[TokenPhase] = field(default_factory=list)
    """Phases by fraction of training; the last one must reach until: 1.0."""
    kernel_resize: Literal["pinv", "bilinear"] = "pinv"
    """How the patch-embedding kernel is resized for patch_scale > 1: FlexiViT's pseudo-inverse resize (a patch
    that is an upsampled native patch embeds exactly as before) or plain bilinear resampling (area-normalised)."""

    def validate(self, where: str) -> None:
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"{where}.patch_dropout: must be in [0, 1), got {self.patch_dropout}")
        ends = [p.until for p in self.schedule]
        if any(b <= a for a, b in zip(ends, ends[1:], strict=False)):
            raise ConfigError(f"{where}.schedule: 'until' must increase from phase to phase, got {ends}")
        if self.schedule and ends[-1] != 1.0:
            raise ConfigError(f"{where}.schedule[{len(ends) - 1}].until: the last phase must end at 1.0")

    def phases(self) -> list[TokenPhase]:
        """The schedule, or one phase with the constant ``patch_dropout``."""
        return list(self.schedule) or [TokenPhase(1.0, self.patch_dropout, 1)]

    def at(self, step: int, total_steps: int) -> TokenPhase:
        """The phase in force at ``step`` (0-based) of ``total_steps``."""
        frac = step / max(1, total_steps)
        for phase in self.phases():
            if frac < phase.until:
                return phase
        return self.phases()[-1]

    def mean_cost(self, cost: dict[tuple[float, int], float]) -> float:
        """Average relative step cost over training, given the cost of each (dropout, scale) setting."""
        total, start = 0.0, 0.0
        for phase in self.phases():
            total += (phase.until - start) * cost[(phase.patch_dropout, phase.patch_scale)]
            start = phase.until
        return total
