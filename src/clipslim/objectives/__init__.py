"""Registered loss terms. Importing this package registers every built-in objective."""

from . import affinity, clip, cross_kd, feature, fusion, gradient, icl, masked_feature, proto, slimmable  # noqa: F401  (registration side effects)
from .base import OBJECTIVES, Dims, Objective, ObjectiveConfig, Outputs, get_objective, parse_config, register

__all__ = ["OBJECTIVES", "Dims", "Objective", "ObjectiveConfig", "Outputs", "get_objective", "parse_config", "register"]
