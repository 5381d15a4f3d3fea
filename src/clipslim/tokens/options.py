"""Options of fitting a token pruner (``clipslim prune-tokens``): one definition, read by the CLI for its defaults.

Torch-free, so the command-line parser can read it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FitOptions:
    calib_images: int = 1024
    """Calibration images read from the training shards (pruner fitting and learnable-token distillation)."""
    golden_images: int = 256
    """Images whose greedy (golden) token ranking trains the predictor (80%) and measures it (20%)."""
    predictor_steps: int = 300
    """Optimizer steps of the ranking predictor."""
    token_steps: int = 200
    """Distillation steps of the learnable tokens (with everything else frozen)."""
