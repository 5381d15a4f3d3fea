"""Loss terms, one file each, registered by name (:data:`clipslim.registry.OBJECTIVE_MODULES`).

Importing this package imports none of them: a recipe's objectives are imported when it is validated.
"""

from ..registry import (
    OBJECTIVES,
    Dims,
    Objective,
    ObjectiveConfig,
    Outputs,
    get_objective,
    objective_names,
    parse_config,
    register,
)

__all__ = ["OBJECTIVES", "Dims", "Objective", "ObjectiveConfig", "Outputs", "get_objective", "objective_names",
           "parse_config", "register"]  # fmt: skip
