"""Training: one loop for CPU and one GPU, crash-safe checkpoints, exact resume."""

from .loop import Trainer, train

__all__ = ["Trainer", "train"]
