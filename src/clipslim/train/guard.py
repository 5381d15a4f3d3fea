"""Divergence guard: a run that has stopped learning says so in one line, with the step and the likely cause.

Two signs, both watched only after warm-up: a contrastive term (any cross-entropy over the batch: clip, affinity,
icl, ...) that sits at exactly chance level, log(batch), for ``patience`` steps in a row (the embeddings have
collapsed to one point; seen with lr = 10), and a total loss that jumps to 10x its recent median.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

CHANCE_TOLERANCE = 1e-3
"""Relative distance from log(batch) that counts as chance. A collapsed student sits within 1e-5; a healthy run
passes near chance for a step or two at most, so a tight band and a streak keep false alarms away."""
JUMP = 10.0
WINDOW = 10


@dataclass
class DivergenceGuard:
    batch_size: int
    """Global batch: the number of classes each contrastive row chooses among."""
    warmup: int
    patience: int
    lr: float
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    streaks: dict[str, int] = field(default_factory=dict)
    reported: list[str] = field(default_factory=list)
    """Kinds already reported (each once per run)."""
    messages: list[str] = field(default_factory=list)

    def observe(self, step: int, terms: dict[str, float]) -> str | None:
        """Feed one step's losses (``loss`` and each ``<term>_loss``); returns a new one-line report, or None."""
        if step <= self.warmup or self.patience < 1:
            return None
        return self._chance(step, terms) or self._jump(step, terms.get("loss"))

    def _chance(self, step: int, terms: dict[str, float]) -> str | None:
        chance = math.log(self.batch_size)
        for name, value in terms.items():
            if not name.endswith("_loss"):
                continue
            near = math.isfinite(value) and abs(value - chance) <= CHANCE_TOLERANCE * chance
            self.streaks[name] = self.streaks.get(name, 0) + 1 if near else 0
            if self.streaks[name] == self.patience and "chance" not in self.reported:
                return self._report(
                    "chance",
                    f"step {step}: {name} has sat at chance level (log {self.batch_size} = {chance:.3f}) for "
                    f"{self.patience} steps after warm-up: the embeddings have collapsed; likely cause: train.lr "
                    f"{self.lr:g} too high (try 10x lower)",
                )
        return None

    def _jump(self, step: int, loss: float | None) -> str | None:
        if loss is None or not math.isfinite(loss):
            return None
        before = statistics.median(self.recent) if len(self.recent) == WINDOW else None
        self.recent.append(loss)
        if before is None or before <= 0 or loss < JUMP * before or "jump" in self.reported:
            return None
        return self._report(
            "jump",
            f"step {step}: loss jumped {loss / before:.0f}x ({before:.4g} -> {loss:.4g}); likely cause: train.lr "
            f"{self.lr:g} too high (try 10x lower, or a longer train.warmup)",
        )

    def _report(self, kind: str, message: str) -> str:
        self.reported.append(kind)
        self.messages.append(message)
        return message
