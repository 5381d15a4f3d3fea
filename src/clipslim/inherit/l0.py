"""Auto inheritance (TinyCLIP's learned inheritance): hard-concrete L0 masks, a Lagrangian sparsity target, fusing.

Masks (Louizos et al. hard concrete, CoFiPruning/TinyCLIP constants) over each tower's residual width, every
block's heads and every block's FFN channels gate the stock open_clip forward through hooks (nothing is copied or
patched). With ``z_w`` the width mask and ``K`` its non-zero channels:

- the stream entering the blocks keeps only ``K``; every LayerNorm on the stream (``ln_pre``, ``ln_1``, ``ln_2``,
  ``ln_post`` / ``ln_final``) normalises over ``K`` only and its output is scaled by ``z_w``;
- each block's writes (attention and MLP branch outputs) are scaled by ``z_w``;
- head ``h`` of block ``l`` is scaled by ``z_heads[l, h]`` (a parametrization of ``attn.out_proj.weight``'s
  columns, since ``nn.MultiheadAttention`` reads that tensor directly), FFN channel ``m`` by ``z_mlp[l, m]``.

Every one of these is linear in a kept weight, so the masked model *is* a smaller dense model: :func:`fuse_l0`
builds it in stock open_clip (same class, smaller config) and it computes the same function. Stock open_clip has
one head count and one FFN width per tower, and width = heads * head_dim, so the deterministic masks are realised
with that structure: per tower the width (a multiple of head_dim, from the width mask's expected size), then the
FFN width that brings the non-embedding parameter count to the target, then in each block the highest-logit heads
and channels. The expected sparsity used in training counts the same parameters (both towers jointly).

Penalty: ``lambda1 * (t - s) + lambda2 * (t - s)^2``, ``s`` the expected sparsity, ``t`` a target ramped linearly;
the multipliers are trained by gradient ascent (their gradient is negated on the way back).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import ResidualAttentionBlock
from torch import nn
from torch.nn.utils import parametrize

from ..config import ConfigError
from ..models import count_params
from ..registry import Dims, Objective, Outputs, register
from .manual import (
    TEXT_AXES,
    VISUAL_AXES,
    InheritError,
    Tower,
    TowerGeometry,
    TowerSelection,
    inherit_selected,
    tower_blocks,
    tower_geometry,
    tower_pairs,
)

__all__ = ["L0Sparsity", "build_clip", "fuse_l0", "hard_concrete_keep_prob"]

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1  # temperature and stretch interval (CoFiPruning / TinyCLIP)
LOG_ALPHA_RANGE = (math.log(0.01), math.log(100.0))  # TinyCLIP clamps mask logits to this range


@dataclass
class L0Section:
    """Auto inheritance (TinyCLIP learned inheritance): hard-concrete L0 masks over width, heads and FFN channels of
    both towers, trained with a Lagrangian sparsity penalty, fused into a smaller dense model at the stage's end."""

    target_sparsity: float = 0.5
    """Fraction of the stage's starting non-embedding parameters to remove (both towers together)."""
    start_sparsity: float = 0.0
    ramp_steps: int = 100
    """Steps over which the target rises linearly from start_sparsity to target_sparsity."""
    lambda_init: float = 10.0
    """Initial Lagrange multipliers lambda1, lambda2 (trained by gradient ascent; TinyCLIP: 10)."""
    init_log_alpha: float = 1.0
    """Initial mask logits (1: keep probability 0.93); near-saturated logits (TinyCLIP: 4.6) barely move in a
    few hundred steps."""
    mask_lr_scale: float = 100.0
    """Mask logits and multipliers move this many times faster than train.lr (lr 1e-3: 0.1 per step; TinyCLIP
    uses 0.02 over thousands of steps)."""

    def validate(self, where: str) -> None:
        for name in ("target_sparsity", "start_sparsity"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{where}.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.ramp_steps < 1 or self.mask_lr_scale <= 0:
            raise ConfigError(f"{where}.ramp_steps/mask_lr_scale: must be >= 1 / > 0")


class _ScaleGrad(torch.autograd.Function):
    """``x * fwd`` forward, gradient times ``bwd`` backward: a per-tensor learning-rate multiplier under Adam
    (``fwd``) and gradient ascent for the multipliers (``bwd = -1``) inside the one optimizer the trainer has."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fwd: float, bwd: float) -> torch.Tensor:
        ctx.bwd = bwd
        return x * fwd

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad * ctx.bwd, None, None


def hard_concrete_keep_prob(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0): the probability that a hard-concrete gate is not exactly zero (the L0 norm's expectation)."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def _sample(log_alpha: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _deterministic(log_alpha: torch.Tensor) -> torch.Tensor:
    """Louizos et al.'s test-time gate: the stretched sigmoid, clamped."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------
# Parameter counting (non-embedding, the demo's size measure) as a function of kept width / heads / channels


@dataclass(frozen=True)
class _TowerCount:
    """Non-embedding parameters of a tower = sum over blocks of
    ``(4*hd*w + 3*hd) * heads + (2*w + 1) * mlp + per_block_w * w`` + ``outside_w * w + outside_const``."""

    geo: TowerGeometry
    per_block_w: int
    outside_w: int
    outside_const: int

    def params(self, w: Any, heads: Any, mlp: Any) -> Any:
        """Works for ints and (differentiable) tensors; ``heads`` / ``mlp`` are per block."""
        hd = self.geo.head_dim
        blocks = sum(
            (4 * hd * w + 3 * hd) * h + (2 * w + 1) * m + self.per_block_w * w for h, m in zip(heads, mlp, strict=True)
        )
        return blocks + self.outside_w * w + self.outside_const


def _tower_count(model: nn.Module, tower: Tower) -> _TowerCount:
    geo = tower_geometry(tower)
    w, h, hd, m = geo.width, geo.heads, geo.head_dim, geo.mlp_width
    block = tower_blocks(tower)[0]
    block_params = sum(p.numel() for p in block.parameters())
    per_block_w, rest = divmod(block_params - (4 * hd * w + 3 * hd) * h - (2 * w + 1) * m, w)
    if rest:
        raise InheritError(f"{tower.kind}: block parameters are not linear in the width; L0 cannot count them")
    rules = VISUAL_AXES if tower.kind == "visual" else TEXT_AXES
    embeddings = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Embedding)}
    outside_w = outside_const = 0
    for name, p in tower.module.named_parameters():
        flat_other = tower.prefix == "" and name.startswith("visual.")  # open_clip.CLIP: text tower = the model
        if name.startswith("transformer.") or id(p) in embeddings or "logit_" in name or flat_other:
            continue
        if name not in rules:
            raise InheritError(f"{tower.kind}.{name}: no L0 counting rule")
        if "width" in rules[name]:
            outside_w += p.numel() // w
        else:
            outside_const += p.numel()
    return _TowerCount(geo, per_block_w, outside_w, outside_const)


# --------------------------------------------------------------------------------------------------------------
# Masks as seen by the hooks


@dataclass
class _TowerMasks:
    keep: torch.Tensor  # [k] indices of the width channels in use
    width: torch.Tensor  # [W] gate values (0 outside keep)
    heads: torch.Tensor  # [L, H]
    mlp: torch.Tensor  # [L, M]


@dataclass
class _Structure:
    """Deterministic realisation of one tower: kept indices (increasing) and their gate values."""

    width: list[int]
    heads: list[list[int]]
    mlp: list[list[int]]
    masks: _TowerMasks


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.argsort(-scores.detach().double(), stable=True)[:k].tolist())


def _scatter(values: torch.Tensor, index: list[int]) -> torch.Tensor:
    out = torch.zeros_like(values)
    idx = torch.as_tensor(index, dtype=torch.long, device=values.device)
    return out.index_copy(0, idx, values.index_select(0, idx))


def _masked_layer_norm(x: torch.Tensor, ln: nn.LayerNorm, keep: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the kept channels only, output scaled by the gate and zero elsewhere."""
    out = torch.zeros_like(x)
    if keep.numel() == 0:
        return out
    weight = ln.weight.index_select(0, keep) if ln.weight is not None else None
    bias = ln.bias.index_select(0, keep) if ln.bias is not None else None
    y = F.layer_norm(x.index_select(-1, keep), (keep.numel(),), weight, bias, ln.eps)
    return out.index_copy(x.dim() - 1, keep, (y * gate.index_select(0, keep)).to(x.dtype))


class _HeadGate(nn.Module):
    """Parametrization of ``attn.out_proj.weight``: column block ``h`` times the gate of head ``h``."""

    def __init__(self, owner: L0Sparsity, kind: str, layer: int, head_dim: int) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: the objective owns the student, not vice versa
        self.kind, self.layer, self.head_dim = kind, layer, head_dim

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        gates = self._owner.tower_masks(self.kind, self.training).heads[self.layer]
        return weight * gates.repeat_interleave(self.head_dim).to(weight.dtype)[None, :]


# --------------------------------------------------------------------------------------------------------------
# The objective


@register
class L0Sparsity(Objective):
    """Hard-concrete L0 masks on the student plus the Lagrangian sparsity penalty (``l0_sparsity_loss``).

    The masks are parameters of this objective, so the Distiller trains and checkpoints them; :meth:`attach`
    (called by ``train.setup.build``) creates them for a given student and installs the gating hooks.
    """

    name = "l0_sparsity"
    Config = L0Section

    def __init__(self, cfg: L0Section, student_dims: Dims, teacher_dims: Dims | None) -> None:
        super().__init__(cfg, student_dims, teacher_dims)
        self.cfg: L0Section = cfg
        self.logits = nn.ParameterDict()  # raw mask logits (log_alpha / mask_lr_scale), 1-D: no weight decay
        self.lambdas = nn.Parameter(torch.full((2,), cfg.lambda_init / cfg.mask_lr_scale))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._counts: dict[str, _TowerCount] = {}
        self._const = 0
        self._full = 0
        self._handles: list[Any] = []
        self._model: nn.Module | None = None
        self._sampled: dict[str, _TowerMasks] | None = None
        self._eval_cache: tuple[tuple, dict[str, _Structure]] | None = None

    # -- setup --------------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Create the masks for ``model`` (all kept) and install the hooks that gate its forward."""
        if self._model is not None:
            raise RuntimeError("l0_sparsity is already attached to a student")
        scale = self.cfg.mask_lr_scale
        for tower, _ in tower_pairs(model, model):
            _check_supported(tower)
            count = _tower_count(model, tower)
            geo = count.geo
            self._counts[tower.kind] = count
            for group, size in (
                ("width", geo.width),
                ("heads", geo.layers * geo.heads),
                ("mlp", geo.layers * geo.mlp_width),
            ):
                self.logits[f"{tower.kind}_{group}"] = nn.Parameter(
                    torch.full((size,), self.cfg.init_log_alpha / scale)
                )
        self._const = sum(p.numel() for n, p in model.named_parameters() if n in ("logit_scale", "logit_bias"))
        self._full = count_params(model).non_embedding
        full = self._params(
            {
                k: (c.geo.width, [c.geo.heads] * c.geo.layers, [c.geo.mlp_width] * c.geo.layers)
                for k, c in self._counts.items()
            }
        )
        if full != self._full:
            raise InheritError(
                f"l0: parameter count formula gives {full}, the model has {self._full} (unsupported module)"
            )
        object.__setattr__(self, "_model", model)  # a reference, not a submodule (the Distiller owns it)
        for tower, _ in tower_pairs(model, model):
            self._install(tower)

    def detach(self) -> None:
        """Remove every hook and parametrization; the student computes its unmasked function again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._model is not None:
            for tower, _ in tower_pairs(self._model, self._model):
                for block in tower_blocks(tower):
                    if parametrize.is_parametrized(block.attn.out_proj, "weight"):
                        parametrize.remove_parametrizations(block.attn.out_proj, "weight", leave_parametrized=False)
        object.__setattr__(self, "_model", None)

    def _install(self, tower: Tower) -> None:
        kind, m = tower.kind, tower.module
        self._handles.append(m.transformer.register_forward_pre_hook(self._entry_hook(kind)))
        norms = [m.ln_pre] if kind == "visual" else []
        norms.append(m.ln_post if kind == "visual" else m.ln_final)
        for i, block in enumerate(tower_blocks(tower)):
            norms += [block.ln_1, block.ln_2]
            for ls in (block.ls_1, block.ls_2):
                self._handles.append(ls.register_forward_hook(self._write_hook(kind)))
            self._handles.append(block.mlp.c_proj.register_forward_pre_hook(self._mlp_hook(kind, i)))
            gate = _HeadGate(self, kind, i, block.attn.head_dim)
            parametrize.register_parametrization(block.attn.out_proj, "weight", gate)
        for norm in norms:
            if isinstance(norm, nn.LayerNorm):
                self._handles.append(norm.register_forward_hook(self._norm_hook(kind)))

    def _entry_hook(self, kind: str) -> Callable[..., tuple]:
        def hook(module: nn.Module, args: tuple) -> tuple:
            masks = self.tower_masks(kind, module.training)
            keep = torch.zeros_like(masks.width).index_fill(0, masks.keep, 1.0)
            return (args[0] * keep.to(args[0].dtype), *args[1:])

        return hook

    def _norm_hook(self, kind: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.LayerNorm, args: tuple, output: torch.Tensor) -> torch.Tensor:
            masks = self.tower_masks(kind, module.training)
            return _masked_layer_norm(args[0], module, masks.keep, masks.width)

        return hook

    def _write_hook(self, kind: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output * self.tower_masks(kind, module.training).width.to(output.dtype)

        return hook

    def _mlp_hook(self, kind: str, layer: int) -> Callable[..., tuple]:
        def hook(module: nn.Module, args: tuple) -> tuple:
            gate = self.tower_masks(kind, module.training).mlp[layer]
            return (args[0] * gate.to(args[0].dtype), *args[1:])

        return hook

    # -- masks --------------------------------------------------------------------------------------------------

    def log_alphas(self, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask logits of one tower: width [W], heads [L, H], FFN channels [L, M]."""
        geo, scale = self._counts[kind].geo, self.cfg.mask_lr_scale
        width, heads, mlp = (
            _ScaleGrad.apply(self.logits[f"{kind}_{g}"], scale, 1.0) for g in ("width", "heads", "mlp")
        )
        return width, heads.view(geo.layers, geo.heads), mlp.view(geo.layers, geo.mlp_width)

    def tower_masks(self, kind: str, training: bool) -> _TowerMasks:
        """Gates for the hooks: one sample per training step (shared by both towers and every hook), or the
        deterministic realisation at the final target in eval mode."""
        if not training:
            return self.realize()[kind].masks
        if self._sampled is None:
            self._clamp()
            self._sampled = {}
            for k in self._counts:
                width, heads, mlp = (_sample(a) for a in self.log_alphas(k))
                self._sampled[k] = _TowerMasks(torch.nonzero(width > 0).flatten(), width, heads, mlp)
        return self._sampled[kind]

    @torch.no_grad()
    def _clamp(self) -> None:
        lo, hi = (v / self.cfg.mask_lr_scale for v in LOG_ALPHA_RANGE)
        for p in self.logits.values():
            p.clamp_(lo, hi)

    def _params(self, shapes: dict[str, tuple[Any, Any, Any]]) -> Any:
        return sum(self._counts[k].params(*shapes[k]) for k in shapes) + self._const

    def expected_sparsity(self) -> torch.Tensor:
        """1 - E[kept non-embedding params] / all of them, jointly over both towers (differentiable)."""
        shapes = {}
        for kind in self._counts:
            width, heads, mlp = (hard_concrete_keep_prob(a) for a in self.log_alphas(kind))
            shapes[kind] = (width.sum(), heads.sum(1), mlp.sum(1))
        return 1 - self._params(shapes) / self._full

    def target(self) -> float:
        """Linear ramp from start_sparsity to target_sparsity over ramp_steps."""
        c = self.cfg
        return c.start_sparsity + (c.target_sparsity - c.start_sparsity) * min(1.0, int(self.step) / c.ramp_steps)

    @property
    def full_params(self) -> int:
        return self._full

    # -- deterministic realisation ------------------------------------------------------------------------------

    @torch.no_grad()
    def realize(self, target_sparsity: float | None = None) -> dict[str, _Structure]:
        """Kept indices and gates per tower, shaped like a stock open_clip model, at (1 - target) of the params."""
        t = self.cfg.target_sparsity if target_sparsity is None else target_sparsity
        key = (t, *((p.data_ptr(), p._version) for p in self.logits.values()))
        if self._eval_cache is not None and self._eval_cache[0] == key:
            return self._eval_cache[1]
        logits = {k: self.log_alphas(k) for k in self._counts}
        shape = self._uniform_shape(logits, (1 - t) * self._full)
        out = {k: _structure(logits[k], self._counts[k].geo, *shape[k]) for k in self._counts}
        self._eval_cache = (key, out)
        return out

    def _total(self, heads: dict[str, int], mlp: dict[str, int]) -> int:
        return self._params(
            {
                k: (heads[k] * c.geo.head_dim, [heads[k]] * c.geo.layers, [mlp[k]] * c.geo.layers)
                for k, c in self._counts.items()
            }
        )

    def _uniform_shape(self, logits: dict, budget: float) -> dict[str, tuple[int, int]]:
        """(heads, FFN width) per tower: width from the width masks' expected size, then the FFN width that fills
        the parameter budget (widths are moved by one head at a time when no FFN width can)."""
        geo = {k: c.geo for k, c in self._counts.items()}
        heads = {}
        for k, g in geo.items():
            expected = hard_concrete_keep_prob(logits[k][0]).sum().item()
            heads[k] = min(max(round(expected / g.head_dim), 1), g.heads)
        one, full = dict.fromkeys(geo, 1), {k: g.mlp_width for k, g in geo.items()}
        while self._total(heads, one) > budget and any(heads[k] > 1 for k in geo):
            k = max((k for k in geo if heads[k] > 1), key=lambda k: heads[k] / geo[k].heads)
            heads[k] -= 1
        while self._total(heads, full) < budget and any(heads[k] < geo[k].heads for k in geo):
            k = min((k for k in geo if heads[k] < geo[k].heads), key=lambda k: heads[k] / geo[k].heads)
            heads[k] += 1
        frac = {
            k: max(hard_concrete_keep_prob(logits[k][2]).sum(1).mean().item() / g.mlp_width, 1e-3)
            for k, g in geo.items()
        }

        def mlp_at(s: float) -> dict[str, int]:
            return {k: min(max(round(s * frac[k] * g.mlp_width), 1), g.mlp_width) for k, g in geo.items()}

        lo, hi = 0.0, 1.0 / min(frac.values())
        if self._total(heads, mlp_at(hi)) <= budget:
            lo = hi
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self._total(heads, mlp_at(mid)) <= budget else (lo, mid)
        mlp = mlp_at(lo)
        return {k: (heads[k], mlp[k]) for k in geo}

    # -- the loss -----------------------------------------------------------------------------------------------

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self._model is None:
            raise RuntimeError("l0_sparsity is not attached to a student (train.setup.build attaches it)")
        sparsity = self.expected_sparsity()
        target = self.target()
        gap = target - sparsity
        lam = _ScaleGrad.apply(self.lambdas, self.cfg.mask_lr_scale, -1.0)  # gradient ascent on lambda
        loss = lam[0] * gap + lam[1] * gap * gap
        if self.training:
            self.step.add_(1)
            self._sampled = None  # the next student forward draws new gates
        return {
            "l0_sparsity_loss": loss,
            "l0_expected_sparsity": sparsity.detach(),
            "l0_target": torch.tensor(target),
            "l0_lambda1": lam[0].detach(),
            "l0_lambda2": lam[1].detach(),
        }


def _structure(logits: tuple[torch.Tensor, ...], geo: TowerGeometry, heads_n: int, mlp_n: int) -> _Structure:
    """The highest-logit width channels, heads and FFN channels, with Louizos' deterministic gates."""
    width_l, heads_l, mlp_l = logits
    width = _top(width_l, heads_n * geo.head_dim)
    heads = [_top(heads_l[i], heads_n) for i in range(geo.layers)]
    mlp = [_top(mlp_l[i], mlp_n) for i in range(geo.layers)]
    gates = _TowerMasks(
        keep=torch.as_tensor(width, dtype=torch.long, device=width_l.device),
        width=_scatter(_deterministic(width_l), width),
        heads=torch.stack([_scatter(_deterministic(heads_l[i]), heads[i]) for i in range(geo.layers)]),
        mlp=torch.stack([_scatter(_deterministic(mlp_l[i]), mlp[i]) for i in range(geo.layers)]),
    )
    return _Structure(width, heads, mlp, gates)


def _check_supported(tower: Tower) -> None:
    norms = [tower.module.ln_post if tower.kind == "visual" else tower.module.ln_final]
    for block in tower_blocks(tower):
        if not isinstance(block, ResidualAttentionBlock) or hasattr(block, "ln_1_kv"):
            raise InheritError(f"{tower.kind}: L0 masks support open_clip's standard ResidualAttentionBlock only")
        if not block.attn.batch_first:
            raise InheritError(f"{tower.kind}: L0 masks need batch-first attention")
        norms += [block.ln_1, block.ln_2]
    for norm in norms:
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
            raise InheritError(f"{tower.kind}: L0 masks need affine LayerNorms on the residual stream")


# --------------------------------------------------------------------------------------------------------------
# Fusing


def build_clip(model_cfg: dict[str, Any]) -> nn.Module:
    """A stock open_clip CLIP / CustomTextCLIP from an architecture dict (``open_clip_config.json``'s model_cfg)."""
    from ..models import quiet_random_init

    cfg = copy.deepcopy(model_cfg)
    custom = cfg.pop("custom_text", False)
    if "multimodal_cfg" in cfg:
        raise InheritError("model_cfg: CoCa (multimodal_cfg) models are not supported")
    with quiet_random_init():
        return (CustomTextCLIP if custom else CLIP)(**cfg)


def mlp_ratio_of(width: int, mlp: int) -> float:
    """A ratio that open_clip turns back into exactly ``mlp`` channels (``int(width * ratio)``)."""
    for ratio in (mlp / width, (mlp + 0.5) / width):
        if int(width * ratio) == mlp:
            return ratio
    raise InheritError(f"no mlp_ratio gives {mlp} channels at width {width}")


def _fused_cfg(model_cfg: dict[str, Any], structure: dict[str, _Structure], geo: dict[str, TowerGeometry]) -> dict:
    cfg = copy.deepcopy(model_cfg)
    for kind, key in (("visual", "vision_cfg"), ("text", "text_cfg")):
        s, g = structure[kind], geo[kind]
        width, heads, mlp = len(s.width), len(s.heads[0]), len(s.mlp[0])
        section = cfg[key]
        section.update(width=width, mlp_ratio=mlp_ratio_of(width, mlp))
        if kind == "visual":
            section["head_width"] = g.head_dim
        else:
            section["heads"] = heads
    return cfg


@torch.no_grad()
def _apply_gates(model: nn.Module, structure: dict[str, _Structure]) -> None:
    """Fold the gate values into the fused weights (the LayerNorm affines and the branch output projections)."""
    for tower, _ in tower_pairs(model, model):
        s, m = structure[tower.kind], tower.module
        zw = s.masks.width.index_select(0, s.masks.keep).to(torch.float32)
        norms = [m.ln_pre, m.ln_post] if tower.kind == "visual" else [m.ln_final]
        for i, block in enumerate(tower_blocks(tower)):
            norms += [block.ln_1, block.ln_2]
            zh = s.masks.heads[i][s.heads[i]].repeat_interleave(block.attn.head_dim)
            zm = s.masks.mlp[i][s.mlp[i]]
            for linear, gate in ((block.attn.out_proj, zh), (block.mlp.c_proj, zm)):
                linear.weight.mul_((zw[:, None] * gate[None, :]).to(linear.weight))
                linear.bias.mul_(zw.to(linear.bias))
        for norm in norms:
            if isinstance(norm, nn.LayerNorm):
                norm.weight.mul_(zw.to(norm.weight))
                norm.bias.mul_(zw.to(norm.bias))


def fuse_l0(model: nn.Module, masks: L0Sparsity, model_cfg: dict[str, Any]) -> tuple[nn.Module, dict, dict]:
    """The smaller dense model that the deterministic masks define: ``(fused model, its model_cfg, report)``.

    The fused model is a fresh stock open_clip model (export it with ``export_open_clip``); ``model`` is not
    changed. On the same input it computes what ``model`` computes in eval mode with the masks attached.
    """
    structure = masks.realize()
    geo = {k: c.geo for k, c in masks._counts.items()}
    cfg = _fused_cfg(model_cfg, structure, geo)
    fused = build_clip(cfg)
    selections = {
        k: TowerSelection(list(range(g.layers)), s.width, s.heads, s.mlp, list(range(g.embed_dim)))
        for (k, s), g in zip(structure.items(), geo.values(), strict=True)
    }
    inherit_selected(model, fused, selections)
    _apply_gates(fused, structure)
    fused.train(model.training)
    achieved = count_params(fused).non_embedding
    target = (1 - masks.cfg.target_sparsity) * masks.full_params
    report = {
        "target_sparsity": masks.cfg.target_sparsity,
        "params_non_embedding": achieved,
        "target_params_non_embedding": round(target),
        "from_params_non_embedding": masks.full_params,
        **{
            k: {"width": len(s.width), "heads": len(s.heads[0]), "mlp_width": len(s.mlp[0])}
            for k, s in structure.items()
        },
    }
    return fused, cfg, report
