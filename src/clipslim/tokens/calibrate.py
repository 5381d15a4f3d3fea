"""Fit a token pruner on calibration images: the predictor learns the golden ranking, the learnable tokens learn to
stand in for the dropped ones by distillation from the unpruned model (everything else frozen).

Both fits run on cached block-``k`` tokens, so a step costs only the blocks after ``k``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from tqdm.auto import tqdm

from .golden import finish, golden_scores, hidden_after
from .options import FitOptions
from .prune import RANKINGS, TokenPredictor, TokenPruner, keep_top, kept_count

log = logging.getLogger(__name__)


def calibration_images(bundle: Any, shards: str | Path, n: int, batch_size: int = 256) -> torch.Tensor:
    """The first ``n`` images of ``shards`` through the model's eval transform."""
    from ..data.loader import make_loader

    out, total = [], 0
    for batch in make_loader(str(shards), bundle.preprocess_val, bundle.tokenizer, batch_size, train=False):
        out.append(batch["image"])
        total += len(batch["image"])
        if total >= n:
            break
    if not out:
        raise FileNotFoundError(f"{shards}: no calibration images")
    return torch.cat(out)[:n]


@dataclass
class Cache:
    """Block-``k`` input/output tokens of calibration images and their unpruned embeddings (normalised)."""

    x_in: torch.Tensor
    x_out: torch.Tensor
    target: torch.Tensor


@torch.no_grad()
def cache_tokens(visual: VisionTransformer, images: torch.Tensor, k: int, batch_size: int = 256) -> Cache:
    parts = []
    for chunk in images.split(batch_size):
        x_in, x_out = hidden_after(visual, chunk, k)
        parts.append((x_in, x_out, F.normalize(finish(visual, x_out, k + 1), dim=-1)))
    return Cache(*(torch.cat(p) for p in zip(*parts, strict=True)))


def pairwise_rank_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """RankNet loss: mean over ordered pairs (i, j) with target_i > target_j of log(1 + exp(pred_j − pred_i))."""
    diff = pred.unsqueeze(2) - pred.unsqueeze(1)  # [B, N, N]: pred_i - pred_j
    mask = target.unsqueeze(2) > target.unsqueeze(1)
    return F.softplus(-diff)[mask].mean()


def fit_predictor(
    predictor: TokenPredictor, x: torch.Tensor, golden: torch.Tensor, steps: int = 300, lr: float = 3e-3,
    batch_size: int = 128, seed: int = 0, progress: bool = True,
) -> list[float]:  # fmt: skip
    """Train the MLP to order tokens as the golden ranking does; returns the loss curve."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=1e-4)
    losses = []
    predictor.train()
    for _ in tqdm(range(steps), desc="predictor", disable=not progress, leave=False):
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=g)
        loss = pairwise_rank_loss(predictor(x[idx]), golden[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    predictor.eval()
    return losses


def topk_agreement(scores: torch.Tensor, golden: torch.Tensor, keep: int) -> float:
    """Mean fraction of the golden top-``keep`` tokens that ``scores`` also keeps."""
    a = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(keep, 1).indices, True)
    b = torch.zeros_like(golden, dtype=torch.bool).scatter_(1, golden.topk(keep, 1).indices, True)
    return float((a & b).sum(1).float().mean() / keep)


@torch.no_grad()
def ranking_scores(pruner: TokenPruner, visual: VisionTransformer, cache: Cache) -> torch.Tensor:
    block = visual.transformer.resblocks[pruner.cfg.after_block]
    return RANKINGS[pruner.cfg.ranking](pruner, block, cache.x_in, cache.x_out)


def fit_extra_tokens(
    pruner: TokenPruner, visual: VisionTransformer, cache: Cache, steps: int = 300, lr: float = 1e-2,
    batch_size: int = 128, seed: int = 0, progress: bool = True,
) -> list[float]:  # fmt: skip
    """Distil: train only ``pruner.extra`` so the pruned embedding matches the unpruned one (1 − cosine)."""
    assert pruner.extra is not None
    torch.manual_seed(seed)
    keep = kept_count(cache.x_out.shape[1] - 1, pruner.cfg.keep_ratio)
    kept = keep_top(cache.x_out, ranking_scores(pruner, visual, cache), keep)
    with torch.no_grad():  # start at the mean patch token, jittered so the tokens can specialise
        mean, std = cache.x_out[:, 1:].mean((0, 1)), cache.x_out[:, 1:].std()
        pruner.extra.copy_(mean + 0.1 * std * torch.randn_like(pruner.extra))
    frozen = [p for p in visual.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam([pruner.extra], lr=lr)
    g, losses = torch.Generator().manual_seed(seed), []
    try:
        for _ in tqdm(range(steps), desc="extra tokens", disable=not progress, leave=False):
            idx = torch.randint(len(kept), (min(batch_size, len(kept)),), generator=g)
            x = torch.cat([kept[idx], pruner.extra.unsqueeze(0).expand(len(idx), -1, -1)], dim=1)
            emb = F.normalize(finish(visual, x, pruner.cfg.after_block + 1), dim=-1)
            loss = 1 - (emb * cache.target[idx]).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return losses


def fit_pruner(
    model: torch.nn.Module, cfg: Any, images: torch.Tensor, opts: FitOptions | None = None, *, seed: int = 0,
    progress: bool = True,
) -> tuple[TokenPruner, dict[str, Any]]:  # fmt: skip
    """A pruner for ``model`` fitted on calibration ``images`` (the model is left unpruned); plus a fit report.

    The predictor trains on the golden ranking of the first ``opts.golden_images`` images (80%; the rest measure how
    often it keeps the golden top tokens); the learnable tokens train on all of ``images``.
    """
    from .prune import vision_tower

    opts = opts or FitOptions()
    visual = vision_tower(model)
    model.eval()
    torch.manual_seed(seed)
    pruner = TokenPruner(cfg, visual.transformer.width)
    cache = cache_tokens(visual, images, cfg.after_block)
    report: dict[str, Any] = {"calib_images": len(images)}
    if cfg.ranking == "predictor":
        report.update(_fit_ranking(pruner, visual, images[: opts.golden_images], opts.predictor_steps, seed, progress))
    if pruner.extra is not None:
        losses = fit_extra_tokens(pruner, visual, cache, opts.token_steps, seed=seed, progress=progress)
        report["distill_loss"] = {"first": losses[0], "last": sum(losses[-20:]) / len(losses[-20:])}
    return pruner, report


def _fit_ranking(
    pruner: TokenPruner, visual: VisionTransformer, images: torch.Tensor, steps: int, seed: int, progress: bool
) -> dict[str, Any]:
    k = pruner.cfg.after_block
    golden = torch.cat([golden_scores(visual, c, k) for c in tqdm(images.split(64), "golden", disable=not progress)])
    x = cache_tokens(visual, images, k).x_out
    split = max(1, int(0.8 * len(x)))
    assert pruner.predictor is not None
    losses = fit_predictor(pruner.predictor, x[:split], golden[:split], steps, seed=seed, progress=progress)
    n = x.shape[1] - 1
    keep = kept_count(n, pruner.cfg.keep_ratio)
    held = (x[split:], golden[split:]) if split < len(x) else (x, golden)
    with torch.no_grad():
        scores = pruner.predictor(held[0])
    attn = cls_attention_scores(visual, images[split:] if split < len(x) else images, k)
    return {
        "golden_images": len(images),
        "predictor_loss": {"first": losses[0], "last": sum(losses[-20:]) / len(losses[-20:])},
        "heldout_topk_agreement": {
            "predictor": topk_agreement(scores, held[1], keep),
            "attention": topk_agreement(attn, held[1], keep),
            "random": keep / n,
        },
    }


@torch.no_grad()
def cls_attention_scores(visual: VisionTransformer, images: torch.Tensor, k: int) -> torch.Tensor:
    from .prune import cls_attention

    x_in, _ = hidden_after(visual, images, k)
    return cls_attention(visual.transformer.resblocks[k], x_in)
