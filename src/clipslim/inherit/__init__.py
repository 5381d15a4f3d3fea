"""Weight inheritance: initialise a small CLIP student from a larger teacher (or an earlier, larger student).

- :func:`inherit_manual`: TinyCLIP's manual rule (interval layers, leading heads/channels).
- :func:`inherit_importance`: the same shapes, keeping the most important layers, heads and channels.
- :class:`~clipslim.inherit.l0.L0Sparsity` / :func:`fuse_l0`: auto inheritance with hard-concrete L0 masks.
- :mod:`clipslim.inherit.blocks`: score residual blocks by their removal impact and build the smaller model.

The end-to-end jobs around these (``clipslim inherit``, ``prune-blocks``, ``stages``) are in :mod:`clipslim.workflows`.
"""

from clipslim.inherit.importance import TowerScores, importance_scores, importance_selection, inherit_importance
from clipslim.inherit.l0 import L0Sparsity, build_clip, fuse_l0
from clipslim.inherit.manual import (
    InheritError,
    TowerGeometry,
    TowerSelection,
    check_compatible,
    inherit_manual,
    inherit_selected,
    interval_layers,
    manual_selection,
    tower_geometry,
)

__all__ = [
    "InheritError",
    "L0Sparsity",
    "TowerGeometry",
    "TowerScores",
    "TowerSelection",
    "build_clip",
    "check_compatible",
    "fuse_l0",
    "importance_scores",
    "importance_selection",
    "inherit_importance",
    "inherit_manual",
    "inherit_selected",
    "interval_layers",
    "manual_selection",
    "tower_geometry",
]
