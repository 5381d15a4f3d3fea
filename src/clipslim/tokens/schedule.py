"""Recipe section ``tokens:``: training-time sequence compression on a schedule (filled in by the tokens work)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenSection:
    patch_dropout: float = 0.0
    """Fraction of patch tokens dropped per sample (CLS kept)."""
