"""Headless matplotlib figures written crash-safely: every clipslim plot goes through these two helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import atomic_write


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG via a temp file + rename, then free it."""
    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format="png"))
    finally:
        pyplot().close(fig)
