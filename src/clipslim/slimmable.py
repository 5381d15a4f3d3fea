"""Slimmable CLIP towers (Scala): one set of weights, runnable at several width ratios, sliceable to stock models.

A width ratio ``r`` keeps ``r * heads`` attention heads (head size unchanged), ``r * width`` residual channels and
``r * mlp`` FFN channels in every block of a tower; depth, patch size and the shared embedding size stay. Which
channels are kept is Scala's *isolated activation* layout (Zhang et al., "Slicing Vision Transformer for Flexible
Inference", NeurIPS 2024, arXiv 2412.04786; reference code ``BeSpontaneous/Scala-pytorch``): the full net and the
smallest net take the *leading* heads/channels, every intermediate width takes the *trailing* ones. The smallest
net's channels are then touched only by itself and the full net, so intermediate widths never overwrite them.
``isolated=False`` gives the plain US-Net/TinyCLIP layout (leading everywhere).

Running a sub-width is a stock open_clip forward with sliced tensors: a copy of the model whose attention and
LayerNorm sizes are set to the sub-width serves as the *skeleton*, and :func:`torch.func.functional_call` runs it
with slices of the real parameters (gradients flow back into the shared weights). Slices are cut by the same engine
as manual inheritance (``inherit/manual.py``), so :meth:`SlimmableCLIP.extract` (a stock model built from the
sub-config and filled by :func:`inherit_selected`) computes exactly what the slimmable model computes at that width.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .inherit.l0 import build_clip, mlp_ratio_of
from .inherit.manual import (
    BLOCK_AXES,
    BLOCK_RE,
    TEXT_AXES,
    VISUAL_AXES,
    InheritError,
    Tower,
    TowerSelection,
    axis_index,
    inherit_selected,
    tower_geometry,
    tower_pairs,
)

__all__ = ["SlimmableCLIP", "TowerWidth", "layout_of", "sub_config"]

_TOL = 1e-6


@dataclass(frozen=True)
class TowerWidth:
    """Sizes and kept indices of one tower at one width ratio."""

    heads: list[int]
    width: list[int]
    mlp: list[int]


def layout_of(ratio: float, widths: Sequence[float], isolated: bool) -> str:
    """``leading`` for the full and the smallest width (and everywhere without isolation), else ``trailing``."""
    if not isolated or math.isclose(ratio, 1.0) or math.isclose(ratio, min(widths)):
        return "leading"
    return "trailing"


def _count(ratio: float, total: int, what: str) -> int:
    n = ratio * total
    if abs(n - round(n)) > _TOL or round(n) < 1:
        raise InheritError(f"width {ratio}: {what} {total} * {ratio} = {n:g} is not a whole number >= 1")
    return int(round(n))


def _keep(n: int, total: int, layout: str) -> list[int]:
    return list(range(n)) if layout == "leading" else list(range(total - n, total))


def tower_width(tower: Tower, ratio: float, layout: str) -> TowerWidth:
    g = tower_geometry(tower)
    heads = _count(ratio, g.heads, f"{tower.kind}.heads")
    mlp = _count(ratio, g.mlp_width, f"{tower.kind}.mlp_width")
    width = heads * g.head_dim
    return TowerWidth(_keep(heads, g.heads, layout), _keep(width, g.width, layout), _keep(mlp, g.mlp_width, layout))


def _selection(tower: Tower, tw: TowerWidth) -> TowerSelection:
    g = tower_geometry(tower)
    return TowerSelection(
        layers=list(range(g.layers)),
        width=tw.width,
        heads=[tw.heads] * g.layers,
        mlp=[tw.mlp] * g.layers,
        embed=list(range(g.embed_dim)),
    )


def _axes(tower: Tower, local: str) -> tuple[tuple[str | None, ...], int | None] | None:
    """Slicing axes of a tower parameter (by its name inside the tower) and its block index; None: no rule."""
    block = BLOCK_RE.fullmatch(local)
    if block is not None:
        rest = block.group(2)
        return (BLOCK_AXES[rest], int(block.group(1))) if rest in BLOCK_AXES else None
    rules = VISUAL_AXES if tower.kind == "visual" else TEXT_AXES
    return (rules[local], None) if local in rules else None


def _slice(t: torch.Tensor, axes: tuple[str | None, ...], sel: TowerSelection, block: int | None, hd: int):
    """``t`` cut to the selection along every axis (``None`` axes keep their full size); differentiable."""
    out = t
    for dim, axis in enumerate(axes):
        if axis is None:
            continue
        index = axis_index(axis, sel, block, t.shape[dim], t.shape[dim], hd)
        if len(index) != t.shape[dim]:
            out = out.index_select(dim, torch.as_tensor(index, dtype=torch.long, device=t.device))
    return out


def _tower_names(model: nn.Module, tower: Tower) -> list[str]:
    """Names (in the full model) of the parameters that belong to ``tower``."""
    names = []
    for name, _ in model.named_parameters():
        if tower.prefix:
            if name.startswith(tower.prefix):
                names.append(name)
        elif not name.startswith("visual.") and name not in ("logit_scale", "logit_bias"):
            names.append(name)  # open_clip.CLIP: the text tower is flattened into the model
    return names


def _shrink(tower_module: nn.Module, full: TowerWidth, sub: TowerWidth, head_dim: int) -> None:
    """Set the sizes a stock forward reads (attention width/heads, LayerNorm shapes) to the sub-width, in place."""
    w_full, m_full = len(full.width), len(full.mlp)
    for mod in tower_module.modules():
        if isinstance(mod, nn.MultiheadAttention):
            mod.embed_dim = mod.kdim = mod.vdim = len(sub.width)
            mod.num_heads = len(sub.heads)
            mod.head_dim = head_dim
        elif hasattr(mod, "num_heads") and hasattr(mod, "head_dim"):  # open_clip's own Attention
            mod.num_heads = len(sub.heads)
        elif isinstance(mod, nn.LayerNorm) and mod.normalized_shape in ((w_full,), (m_full,)):
            if w_full == m_full:
                raise InheritError("slimmable: width equals FFN width, cannot tell LayerNorm sizes apart")
            mod.normalized_shape = (len(sub.width),) if mod.normalized_shape == (w_full,) else (len(sub.mlp),)


def sub_config(model_cfg: dict[str, Any], model: nn.Module, ratio: float, towers: Sequence[str]) -> dict[str, Any]:
    """open_clip architecture dict of the sub-network at ``ratio`` (the slimmed ``towers`` resized)."""
    cfg = copy.deepcopy(model_cfg)
    for tower, _ in tower_pairs(model, model):
        if tower.kind not in towers:
            continue
        tw = tower_width(tower, ratio, "leading")
        section = cfg["vision_cfg" if tower.kind == "visual" else "text_cfg"]
        width, heads, mlp = len(tw.width), len(tw.heads), len(tw.mlp)
        section.update(width=width, mlp_ratio=mlp_ratio_of(width, mlp))
        if tower.kind == "visual":
            section["head_width"] = tower_geometry(tower).head_dim
        else:
            section["heads"] = heads
    return cfg


class SlimmableCLIP:
    """A stock open_clip model viewed as a family of widths; holds a reference to the model, not a copy of it.

    ``widths``: the trained ratios (their minimum is the isolated one); ``towers``: ``("visual",)`` or
    ``("visual", "text")``.
    """

    def __init__(
        self, model: nn.Module, widths: Sequence[float], *, isolated: bool = True, towers: Sequence[str] = ("visual",)
    ) -> None:
        if not widths or any(not 0 < w <= 1 for w in widths):
            raise InheritError(f"widths: expected ratios in (0, 1], got {list(widths)}")
        bad = [t for t in towers if t not in ("visual", "text")]
        if bad or not towers:
            raise InheritError(f"towers: expected 'visual' and/or 'text', got {list(towers)}")
        self.model = model
        self.widths = sorted({float(w) for w in widths} | {1.0})
        self.isolated, self.towers = isolated, tuple(towers)
        self._towers = {t.kind: t for t, _ in tower_pairs(model, model)}
        self._names = {k: _tower_names(model, t) for k, t in self._towers.items()}
        self._skeletons: dict[float, nn.Module] = {}
        for w in self.widths:
            self.selections(w)  # validate every width (whole head / channel counts) up front
        self._check_rules()

    def _check_rules(self) -> None:
        for kind in self.towers:
            tower = self._towers[kind]
            missing = [n for n in self._names[kind] if _axes(tower, n[len(tower.prefix) :]) is None]
            if missing:
                raise InheritError(f"slimmable {kind} tower: no slicing rule for {', '.join(missing[:3])}")

    def layout(self, ratio: float) -> str:
        return layout_of(ratio, self.widths, self.isolated)

    def selections(self, ratio: float) -> dict[str, TowerSelection]:
        """Kept indices of both towers at ``ratio`` (towers that do not slim keep everything)."""
        out = {}
        for kind, tower in self._towers.items():
            r = ratio if kind in self.towers else 1.0
            out[kind] = _selection(tower, tower_width(tower, r, layout_of(r, self.widths, self.isolated)))
        return out

    def sliced_parameters(self, ratio: float) -> dict[str, torch.Tensor]:
        """Every parameter of the model, slimmed towers cut to ``ratio`` (views into the shared weights' graph)."""
        params = dict(self.model.named_parameters())
        sels = self.selections(ratio)
        for kind in self.towers:
            tower, sel = self._towers[kind], sels[kind]
            hd = tower_geometry(tower).head_dim
            for name in self._names[kind]:
                axes, block = _axes(tower, name[len(tower.prefix) :])  # type: ignore[misc]
                params[name] = _slice(params[name], axes, sel, block, hd)
        return params

    def skeleton(self, ratio: float) -> nn.Module:
        """A frozen copy of the model with attention/LayerNorm sizes set to ``ratio`` (its own weights unused)."""
        ratio = float(ratio)
        if ratio not in self._skeletons:
            skel = copy.deepcopy(self.model).requires_grad_(False)
            for tower, _ in tower_pairs(skel, skel):
                if tower.kind in self.towers:
                    full, sub = tower_width(tower, 1.0, "leading"), tower_width(tower, ratio, "leading")
                    module = tower.module if tower.prefix else _flat_text(skel)
                    _shrink(module, full, sub, tower_geometry(tower).head_dim)
            for param in skel.parameters():  # never read: every forward swaps in the sliced real weights
                param.data = param.data.new_empty(0)
            self._skeletons[ratio] = skel
        return self._skeletons[ratio]

    def _run(self, ratio: float, images: torch.Tensor | None, texts: torch.Tensor | None) -> Any:
        skel = self.skeleton(ratio)
        skel.train(self.model.training)
        out = functional_call(skel, self.sliced_parameters(ratio), (images, texts), strict=False)
        return out if isinstance(out, dict) else {"image_features": out[0], "text_features": out[1]}

    def encode_image(self, images: torch.Tensor, ratio: float) -> torch.Tensor:
        """L2-normalised image embeddings of the sub-network at ``ratio``."""
        if math.isclose(ratio, 1.0):
            return F.normalize(self.model.encode_image(images), dim=-1)
        return self._run(ratio, images, None)["image_features"]

    def encode_text(self, texts: torch.Tensor, ratio: float) -> torch.Tensor:
        """L2-normalised text embeddings at ``ratio`` (the full text tower when text does not slim)."""
        if math.isclose(ratio, 1.0) or "text" not in self.towers:
            return F.normalize(self.model.encode_text(texts), dim=-1)
        return self._run(ratio, None, texts)["text_features"]

    def param_count(self, ratio: float) -> int:
        """Parameters of the sub-network at ``ratio`` (what its extracted stock model holds)."""
        with torch.no_grad():
            return sum(p.numel() for p in self.sliced_parameters(ratio).values())

    def extract(self, ratio: float, model_cfg: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        """A stock open_clip model of the sub-network at ``ratio`` and its architecture dict."""
        cfg = sub_config(model_cfg, self.model, ratio, self.towers)
        small = build_clip(cfg)
        ref = next(self.model.parameters())
        small.to(device=ref.device, dtype=ref.dtype)
        inherit_selected(self.model, small, self.selections(ratio))
        return small.eval(), cfg


def _flat_text(model: nn.Module) -> nn.Module:
    """The modules of a flattened CLIP text tower (everything but ``visual``), for resizing."""
    holder = nn.Module()
    for name, child in model.named_children():
        if name != "visual":
            holder.add_module(name, child)
    return holder
