"""Token compression: training-time patch dropout / patch scaling on a schedule, inference-time token pruning."""

from __future__ import annotations

from typing import Any

from torch import nn

from .schedule import TokenSection


def token_hook(section: TokenSection, model: nn.Module) -> Any:
    raise NotImplementedError("tokens: training-time token compression is not built yet")
