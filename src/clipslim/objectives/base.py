"""The Objective interface, re-exported from :mod:`clipslim.registry` (its one definition) for objective modules."""

from ..registry import OBJECTIVES, Dims, Objective, ObjectiveConfig, Outputs, get_objective, parse_config, register

__all__ = ["OBJECTIVES", "Dims", "Objective", "ObjectiveConfig", "Outputs", "get_objective", "parse_config", "register"]
