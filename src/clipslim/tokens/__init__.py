"""Token compression: training-time patch dropout / patch scaling on a schedule, inference-time token pruning.

Training: a ``tokens:`` recipe section (:class:`TokenSection`) becomes a step hook (:func:`token_hook`) that sets
the student ViT's dropout ratio and patch scale before every step. Inference: :func:`clipslim.tokens.prune.
apply_token_pruning` keeps the top tokens after a chosen block. Both are transforms applied to a stock open_clip
model; neither changes its state dict.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FitOptions", "TokenCompression", "TokenPhase", "TokenSection", "token_hook"]

_WHERE = {
    "FitOptions": "options",
    "TokenCompression": "compression",
    "TokenPhase": "schedule",
    "TokenSection": "schedule",
    "token_hook": "compression",
}


def __getattr__(name: str) -> Any:
    """Names are imported from their modules on first use, so ``clipslim.tokens.options`` (CLI defaults) and
    ``clipslim.tokens.schedule`` (recipes) load without torch."""
    if name not in _WHERE:
        raise AttributeError(f"module 'clipslim.tokens' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
