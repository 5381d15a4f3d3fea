"""Importance-ranked inheritance: keep the teacher's heads, FFN channels, layers and width channels that matter most.

The student gets exactly the shapes of the manual rule (its config is unchanged); only *which* teacher indices it
keeps differs. The leading heads/channels of a trained network are an arbitrary subset (a transformer is symmetric
under permuting heads, FFN channels and residual channels), so ranking them by importance keeps more of what the
teacher computes. Three estimates, all returned as :class:`TowerScores`:

- ``magnitude`` (weights only): a structure matters if it both reads and writes. Head ``h``:
  ``||W_v[h]|| * ||W_out[:, h]||``; FFN channel: ``||c_fc[m]|| * ||c_proj[:, m]||``; residual channel: (norms of
  what reads it, through the LayerNorm gains) * (norms of what writes it); layer: sum of its head + channel scores.
- ``activation`` (a few calibration batches): each head's and FFN channel's mean contribution to the residual
  stream (norm after the output projection), each residual channel's RMS over all blocks' inputs, each layer's
  relative update ``||f(x)|| / ||x||``.
- ``gradient`` (a few calibration batches): first-order Taylor estimate of the loss change when a structure is
  removed, ``|sum(g * w)|`` over its weights, with the teacher's own contrastive loss (no labels needed).

Ties keep the lower index, so uniform scores reproduce the manual rule's leading channels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from ..config import ConfigError
from .manual import (
    BLOCK_AXES,
    BLOCK_RE,
    TEXT_AXES,
    VISUAL_AXES,
    InheritError,
    Tower,
    TowerSelection,
    check_compatible,
    inherit_selected,
    interval_layers,
    tower_blocks,
    tower_geometry,
    tower_pairs,
)

__all__ = [
    "METHODS",
    "TowerScores",
    "calibration_batches",
    "importance_scores",
    "importance_selection",
    "inherit_importance",
]

METHODS = ("magnitude", "activation", "gradient")


@dataclass(frozen=True)
class InitSpec:
    """How a student starts, parsed once from its text form (``student.init``, a stage's ``init``, ``--strategy``)."""

    kind: Literal["random", "inherit", "importance", "continue", "spec"]
    method: str | None = None
    """The importance method (magnitude | activation | gradient) when kind is importance."""
    spec: str | None = None
    """The model spec to start from when kind is spec."""

    @property
    def inherits(self) -> bool:
        """Whether the student copies slices of another model (the teacher, ``inherit_from`` or a previous stage)."""
        return self.kind in ("inherit", "importance")


def parse_init(text: str, where: str) -> InitSpec:
    """``random`` | ``inherit`` (or ``manual``) | ``importance:<method>`` | ``continue`` | a model spec."""
    if text in ("random", "inherit", "continue"):
        return InitSpec(text)  # type: ignore[arg-type]
    if text == "manual":
        return InitSpec("inherit")
    if text.startswith("importance:"):
        method = text.removeprefix("importance:")
        if method not in METHODS:
            raise ConfigError(f"{where}: unknown importance method '{method}' (one of {', '.join(METHODS)})")
        return InitSpec("importance", method=method)
    return InitSpec("spec", spec=text)


Batch = dict[str, Any] | tuple[torch.Tensor, torch.Tensor]


@dataclass
class TowerScores:
    """Importance of every structure of one teacher tower (higher = keep)."""

    layers: torch.Tensor  # [L]
    width: torch.Tensor  # [W] residual-stream channels
    heads: torch.Tensor  # [L, H]
    mlp: torch.Tensor  # [L, M]
    embed: torch.Tensor  # [E] output channels (added over both towers when ranked)


# --------------------------------------------------------------------------------------------------------------
# Shared helpers


def _standard_blocks(tower: Tower) -> nn.ModuleList:
    blocks = tower_blocks(tower)
    if not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
        raise InheritError(f"{tower.kind}: importance ranking supports open_clip's standard ResidualAttentionBlock")
    return blocks


def _proj_matrix(tower: Tower) -> torch.Tensor | None:
    """The output projection as [width, embed], whatever its layout."""
    m = tower.module
    proj = m.proj if tower.kind == "visual" else m.text_projection
    if proj is None:
        return None
    return proj.weight.t() if isinstance(proj, nn.Linear) else proj


def _final_norm(tower: Tower) -> nn.Module:
    return tower.module.ln_post if tower.kind == "visual" else tower.module.ln_final


def _gain(norm: nn.Module, width: int) -> torch.Tensor:
    weight = getattr(norm, "weight", None)
    return weight.detach().abs() if weight is not None else torch.ones(width)


def _as_batch(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, texts = (batch["image"], batch["text"]) if isinstance(batch, dict) else batch
    return images.to(device), texts.to(device)


# --------------------------------------------------------------------------------------------------------------
# magnitude


@torch.no_grad()
def _magnitude_tower(tower: Tower) -> TowerScores:
    blocks, geo = _standard_blocks(tower), tower_geometry(tower)
    w, h, hd = geo.width, geo.heads, geo.head_dim
    heads, mlp = [], []
    read, write = torch.zeros(w), torch.zeros(w)
    for b in blocks:
        qkv = b.attn.in_proj_weight.view(3, h, hd, w)
        out = b.attn.out_proj.weight.view(w, h, hd)
        fc, proj = b.mlp.c_fc.weight, b.mlp.c_proj.weight
        heads.append(qkv[2].norm(dim=(1, 2)) * out.norm(dim=(0, 2)))
        mlp.append(fc.norm(dim=1) * proj.norm(dim=0))
        read += _gain(b.ln_1, w) * qkv.reshape(3 * h * hd, w).norm(dim=0) + _gain(b.ln_2, w) * fc.norm(dim=0)
        write += out.reshape(w, h * hd).norm(dim=1) + proj.norm(dim=1)
    final = _proj_matrix(tower)
    if final is not None:
        read += _gain(_final_norm(tower), w) * final.norm(dim=1)
    write += _embedding_write(tower)
    heads_t, mlp_t = torch.stack(heads), torch.stack(mlp)
    embed = final.norm(dim=0) if final is not None else torch.ones(w)
    return TowerScores(heads_t.sum(1) + mlp_t.sum(1), read * write, heads_t, mlp_t, embed)


def _rms(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.pow(2).mean(dim=dim).sqrt()


def _embedding_write(tower: Tower) -> torch.Tensor:
    """RMS per channel of what enters the residual stream before the first block."""
    m = tower.module
    if tower.kind == "visual":
        conv = m.conv1.weight.reshape(m.conv1.weight.shape[0], -1)
        return _rms(conv, 1) + m.class_embedding.abs() + _rms(m.positional_embedding, 0)
    return _rms(m.token_embedding.weight, 0) + _rms(m.positional_embedding, 0)


# --------------------------------------------------------------------------------------------------------------
# activation


class _ActivationStats:
    """Forward hooks on one tower's blocks that accumulate per-structure activation statistics."""

    def __init__(self, tower: Tower) -> None:
        self.blocks, geo = _standard_blocks(tower), tower_geometry(tower)
        n = len(self.blocks)
        self.sq = torch.zeros(geo.width)
        self.heads, self.mlp = torch.zeros(n, geo.heads), torch.zeros(n, geo.mlp_width)
        self.update, self.count = torch.zeros(n), 0
        self.embed = torch.zeros(geo.embed_dim)
        self.handles = []
        for i, b in enumerate(self.blocks):
            self.handles.append(b.register_forward_hook(self._block_hook(i), with_kwargs=True))
            self.handles.append(b.attn.register_forward_hook(self._attn_hook(i), with_kwargs=True))
            self.handles.append(b.mlp.c_proj.register_forward_pre_hook(self._mlp_hook(i)))
        self.handles.append(_final_norm(tower).register_forward_pre_hook(self._final_hook))

    def _block_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            x = args[0] if args else kwargs["q_x"]
            self.sq += x.float().pow(2).mean(dim=(0, 1)).cpu()
            self.update[i] += ((output - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)).mean().cpu()
            if i == 0:
                self.count += 1

        return hook

    def _attn_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> None:
            self.heads[i] += _head_contributions(module, args[0], kwargs.get("attn_mask")).cpu()

        return hook

    def _mlp_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Linear, args: tuple) -> None:
            self.mlp[i] += args[0].abs().mean(dim=(0, 1)).cpu() * module.weight.norm(dim=0).cpu()

        return hook

    def _final_hook(self, module: nn.Module, args: tuple) -> None:
        self.sq += args[0].float().pow(2).reshape(-1, args[0].shape[-1]).mean(dim=0).cpu()

    def scores(self) -> TowerScores:
        for handle in self.handles:
            handle.remove()
        n = max(self.count, 1)
        return TowerScores(self.update / n, self.sq.div(n).sqrt(), self.heads / n, self.mlp / n, self.embed / n)


def _head_outputs(attn: nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each head's output after the output projection (bias excluded): [batch, heads, tokens, width].

    Summed over heads plus the out_proj bias, this is exactly ``attn(x, x, x)`` (tested)."""
    if not attn.batch_first:
        raise InheritError("importance ranking expects batch-first attention (open_clip's default)")
    b, t, w = x.shape
    h = attn.num_heads
    hd = w // h
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
    if mask is not None:
        mask = mask.to(q.dtype)
        mask = mask.view(b, h, t, t) if mask.dim() == 3 else mask
    heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [b, h, t, hd]
    return torch.einsum("bhtd,whd->bhtw", heads, attn.out_proj.weight.view(w, h, hd))


def _head_contributions(attn: nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean norm, over samples and tokens, of each head's contribution to the residual stream: [heads]."""
    return _head_outputs(attn, x, mask).norm(dim=-1).mean(dim=(0, 2))


@torch.no_grad()
def _activation(model: nn.Module, batches: Iterable[Batch]) -> dict[str, TowerScores]:
    device = next(model.parameters()).device
    stats = {t.kind: _ActivationStats(t) for t, _ in tower_pairs(model, model)}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            images, texts = _as_batch(batch, device)
            stats["visual"].embed += model.encode_image(images).abs().mean(0).cpu()
            stats["text"].embed += model.encode_text(texts).abs().mean(0).cpu()
    finally:
        model.train(was_training)
        scores = {kind: s.scores() for kind, s in stats.items()}
    if stats["visual"].count == 0:
        raise InheritError("calib_batches: no batches given")
    return scores


# --------------------------------------------------------------------------------------------------------------
# gradient (Taylor)


def _contrastive_loss(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    image = model.encode_image(images, normalize=True)
    text = model.encode_text(texts, normalize=True)
    logits = model.logit_scale.exp() * image @ text.t()
    labels = torch.arange(len(images), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _param_axes(tower: Tower, names: Iterable[str]) -> Iterator[tuple[str, int | None, tuple]]:
    """(parameter name, block index or None, axis kinds) for the tower's parameters that have a rule."""
    rules = VISUAL_AXES if tower.kind == "visual" else TEXT_AXES
    for name in names:
        if not name.startswith(tower.prefix):
            continue
        local = name[len(tower.prefix) :]
        block = BLOCK_RE.fullmatch(local)
        if block is not None and block.group(2) in BLOCK_AXES:
            yield name, int(block.group(1)), BLOCK_AXES[block.group(2)]
        elif block is None and local in rules:
            yield name, None, rules[local]


def _fold(kind: str, values: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-index sums folded onto heads for the head-shaped axis kinds."""
    if kind == "head_ch":
        return values.view(heads, -1).sum(1)
    if kind == "qkv":
        return values.view(3, heads, -1).sum((0, 2))
    return values


def _taylor_batch(tower: Tower, products: dict[str, torch.Tensor]) -> TowerScores:
    """Signed sums of g*w per structure for one batch (the absolute value is taken per batch by the caller)."""
    geo = tower_geometry(tower)
    s = TowerScores(
        torch.zeros(geo.layers), torch.zeros(geo.width), torch.zeros(geo.layers, geo.heads),
        torch.zeros(geo.layers, geo.mlp_width), torch.zeros(geo.embed_dim),
    )  # fmt: skip
    for name, block, axes in _param_axes(tower, products):
        c = products[name]
        if block is not None:
            s.layers[block] += c.sum()
        for dim, kind in enumerate(axes):
            if kind is None:
                continue
            others = [d for d in range(c.dim()) if d != dim]
            per_index = c.sum(dim=others) if others else c  # sum(dim=[]) would reduce everything
            if kind in ("width", "embed"):
                getattr(s, kind).add_(per_index)
            elif kind == "mlp":
                s.mlp[block] += per_index
            else:  # heads, head_ch, qkv
                s.heads[block] += _fold(kind, per_index, geo.heads)
    return s


def _gradient(model: nn.Module, batches: Iterable[Batch]) -> dict[str, TowerScores]:
    device = next(model.parameters()).device
    towers = [t for t, _ in tower_pairs(model, model)]
    for t in towers:
        _standard_blocks(t)
    params = dict(model.named_parameters())
    totals: dict[str, TowerScores] = {}
    was_training, flags = model.training, {n: p.requires_grad for n, p in params.items()}
    model.eval().requires_grad_(True)
    try:
        for batch in batches:
            images, texts = _as_batch(batch, device)
            with torch.enable_grad():
                grads = torch.autograd.grad(_contrastive_loss(model, images, texts), list(params.values()))
            products = {n: (g * p).detach().float().cpu() for (n, p), g in zip(params.items(), grads, strict=True)}
            for t in towers:
                batch_scores = _taylor_batch(t, products)
                _accumulate(totals, t.kind, batch_scores)
    finally:
        model.train(was_training)
        for n, p in params.items():
            p.requires_grad_(flags[n])
    if not totals:
        raise InheritError("calib_batches: no batches given")
    return totals


def _accumulate(totals: dict[str, TowerScores], kind: str, batch: TowerScores) -> None:
    absolute = TowerScores(**{k: v.abs() for k, v in asdict(batch).items()})
    if kind not in totals:
        totals[kind] = absolute
        return
    for k, v in asdict(absolute).items():
        getattr(totals[kind], k).add_(v)


# --------------------------------------------------------------------------------------------------------------
# public API


def importance_scores(
    model: nn.Module, method: str = "magnitude", calib_batches: Iterable[Batch] | None = None
) -> dict[str, TowerScores]:
    """``{"visual": TowerScores, "text": TowerScores}`` for a (teacher) model; activation/gradient need batches
    (dicts with ``image`` and ``text`` tensors, or ``(images, tokens)`` tuples)."""
    if method not in METHODS:
        raise InheritError(f"importance method '{method}' unknown; choose one of {', '.join(METHODS)}")
    if method == "magnitude":
        return {t.kind: _magnitude_tower(t) for t, _ in tower_pairs(model, model)}
    if calib_batches is None:
        raise InheritError(f"calib_batches: required by importance method '{method}' (a few image-text batches)")
    return _activation(model, calib_batches) if method == "activation" else _gradient(model, calib_batches)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores in increasing index order; ties keep the lower index."""
    order = torch.argsort(-scores.double(), stable=True)[:k]
    return sorted(order.tolist())


def importance_selection(
    teacher: nn.Module, student: nn.Module, scores: dict[str, TowerScores], *, rank_layers: bool = True
) -> dict[str, TowerSelection]:
    """The student-shaped selection that keeps the highest-scoring teacher structures.

    ``rank_layers=False`` keeps the manual rule's interval layers and ranks only heads and channels.
    """
    pairs = tower_pairs(teacher, student)
    e_s = tower_geometry(pairs[0][1]).embed_dim
    embed = _top(scores["visual"].embed + scores["text"].embed, e_s)
    out = {}
    for t_tower, s_tower in pairs:
        t, s, sc = tower_geometry(t_tower), tower_geometry(s_tower), scores[t_tower.kind]
        layers = _top(sc.layers, s.layers) if rank_layers else interval_layers(t.layers, s.layers)
        out[t_tower.kind] = TowerSelection(
            layers=layers,
            width=_top(sc.width, s.width),
            heads=[_top(sc.heads[i], s.heads) for i in layers],
            mlp=[_top(sc.mlp[i], s.mlp_width) for i in layers],
            embed=embed,
        )
    return out


def inherit_importance(
    teacher: nn.Module,
    student: nn.Module,
    *,
    method: str = "magnitude",
    calib_batches: Iterable[Batch] | None = None,
    rank_layers: bool = True,
    copy_logit_scale: bool = True,
) -> dict:
    """Like :func:`~clipslim.inherit.inherit_manual` (same student shapes, same guarantees), but keeping the most
    important teacher layers, heads, FFN channels and residual channels; returns the manual report plus
    ``strategy`` and ``selection`` (the teacher indices kept, per tower)."""
    check_compatible(teacher, student)
    scores = importance_scores(teacher, method, calib_batches)
    selections = importance_selection(teacher, student, scores, rank_layers=rank_layers)
    report = inherit_selected(teacher, student, selections, copy_logit_scale=copy_logit_scale)
    report["strategy"] = f"importance:{method}"
    report["selection"] = {kind: asdict(sel) for kind, sel in selections.items()}
    return report


def calibration_batches(
    data: str | Path, bundle: Any, n_batches: int = 4, batch_size: int = 64
) -> list[dict[str, torch.Tensor]]:
    """The first ``n_batches`` batches of ``data`` (shards or CSV) in file order, preprocessed for ``bundle``."""
    from ..data.loader import make_loader  # lazy: data pulls in webdataset and PIL

    loader = make_loader(str(data), bundle.preprocess_val, bundle.tokenizer, batch_size, train=False)
    batches = []
    for batch in loader:
        batches.append({"image": batch["image"], "text": batch["text"]})
        if len(batches) >= n_batches:
            break
    if not batches:
        raise InheritError(f"calibration data {data} gave no batches")
    return batches
