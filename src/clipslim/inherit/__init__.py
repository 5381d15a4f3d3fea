"""Weight inheritance: initialise a small CLIP student from slices of a larger teacher."""

from clipslim.inherit.manual import (
    InheritError,
    TowerGeometry,
    check_compatible,
    inherit_manual,
    interval_layers,
    tower_geometry,
)

__all__ = ["InheritError", "TowerGeometry", "check_compatible", "inherit_manual", "interval_layers", "tower_geometry"]
