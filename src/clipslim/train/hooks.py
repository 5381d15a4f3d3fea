"""Step hooks: things that change the run between optimizer steps without being a loss term.

A hook has ``before_step(trainer)``; the trainer calls every hook before each step with itself (step, recipe,
built models, data stream, device, distributed env). Sources: objectives that define ``before_step`` (e.g.
ProtoCLIP re-clustering at each episode start) and recipe sections that transform the model on a schedule (e.g.
``tokens:`` patch dropout). State a hook needs after a resume must live in the checkpointed module (buffers of an
objective) or be a pure function of the step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .loop import Trainer


@runtime_checkable
class StepHook(Protocol):
    def before_step(self, trainer: Trainer) -> None: ...
