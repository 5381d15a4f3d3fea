"""Inference token pruning: after block ``k`` of the image tower keep the top ``keep_ratio`` of the patch tokens,
then append a few learnable tokens that stand in for what was dropped.

:func:`apply_token_pruning` installs a :class:`TokenPruner` on a stock open_clip ViT as a forward hook on block
``k`` (the pruner is registered as ``visual.token_pruner`` so it moves with the model); :func:`remove_token_pruning`
undoes it. A pruned model is saved as an ordinary open_clip folder (the unpruned weights, loadable anywhere) plus
``token_pruning.json`` / ``token_pruning.safetensors``, which :func:`clipslim.models.load_model` re-applies.

Rankings (registered by name in :data:`RANKINGS`): ``attention`` (the CLS query's attention to each patch in
block ``k``, averaged over heads: EViT's baseline), ``predictor`` (a small MLP on token features trained to
reproduce the greedy golden ranking of :mod:`clipslim.tokens.golden`), ``random`` (a floor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from ..config import ConfigError
from ..io import atomic_write_json, load_tensors, read_mapping, save_tensors

CONFIG_FILE = "token_pruning.json"
WEIGHTS_FILE = "token_pruning.safetensors"


@dataclass
class PruneConfig:
    after_block: int = 1
    """Prune the output of this block (0-based) of the image tower; blocks after it see fewer tokens."""
    keep_ratio: float = 0.6
    """Fraction of patch tokens kept (exactly round(keep_ratio·N), at least 1); CLS is always kept."""
    ranking: str = "predictor"
    extra_tokens: int = 0
    """Learnable tokens appended after pruning (trained by distillation from the unpruned model)."""
    hidden: int = 64
    """Hidden width of the predictor MLP."""

    def validate(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio: must be in (0, 1], got {self.keep_ratio}")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking: unknown '{self.ranking}' (one of {', '.join(RANKINGS)})")
        if self.extra_tokens < 0 or self.after_block < 0:
            raise ValueError("extra_tokens/after_block: must be >= 0")


def kept_count(num_patches: int, keep_ratio: float) -> int:
    return max(1, min(num_patches, round(keep_ratio * num_patches)))


class TokenPredictor(nn.Module):
    """Scores each patch token from its own features and the CLS token's (both layer-normed): a 2-layer MLP."""

    def __init__(self, width: int, hidden: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(2 * width, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, 1 + N, D] tokens (CLS first) -> [B, N] scores."""
        x = self.norm(x)
        cls, patches = x[:, :1].expand(-1, x.shape[1] - 1, -1), x[:, 1:]
        return self.mlp(torch.cat([patches, cls], dim=-1)).squeeze(-1)


def cls_attention(block: nn.Module, x_in: torch.Tensor) -> torch.Tensor:
    """[B, N]: attention of the CLS query to each patch in ``block`` (open_clip ResidualAttentionBlock), head mean."""
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
        raise ValueError("ranking 'attention' needs open_clip's default ResidualAttentionBlock (nn.MultiheadAttention)")
    h = block.ln_1(x_in)
    d, heads = h.shape[-1], attn.num_heads
    w_q, w_k, _ = attn.in_proj_weight.chunk(3)
    b_q, b_k, _ = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
    q = F.linear(h[:, :1], w_q, b_q).view(h.shape[0], 1, heads, d // heads).transpose(1, 2)
    k = F.linear(h, w_k, b_k).view(h.shape[0], -1, heads, d // heads).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / (d // heads) ** 0.5).softmax(-1)  # [B, heads, 1, 1 + N]
    return probs[:, :, 0, 1:].mean(1)


Score = Callable[["TokenPruner", nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
RANKINGS: dict[str, Score] = {
    "attention": lambda pruner, block, x_in, x_out: cls_attention(block, x_in),
    "predictor": lambda pruner, block, x_in, x_out: pruner.predictor(x_out),
    "random": lambda pruner, block, x_in, x_out: torch.rand(x_out.shape[0], x_out.shape[1] - 1, device=x_out.device),
}


def keep_top(x: torch.Tensor, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """CLS plus the ``keep`` highest-scoring patch tokens of each sample, in their original order."""
    if keep >= x.shape[1] - 1:
        return x
    idx = scores.topk(keep, dim=1).indices.sort(dim=1).values + 1
    patches = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :1], patches], dim=1)


class TokenPruner(nn.Module):
    """What runs after block ``k``: score, keep the top tokens, append the learnable ones."""

    def __init__(self, cfg: PruneConfig, width: int) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.predictor = TokenPredictor(width, cfg.hidden) if cfg.ranking == "predictor" else None
        self.extra = nn.Parameter(torch.zeros(cfg.extra_tokens, width)) if cfg.extra_tokens else None
        self.scores_override: torch.Tensor | None = None
        """Externally computed [B, N] scores (e.g. the golden oracle) used instead of the ranking for one batch."""
        self.enabled = True
        """False passes every token through (timing the unpruned model without reinstalling)."""

    @property
    def active(self) -> bool:
        return self.enabled and (self.cfg.keep_ratio < 1.0 or self.extra is not None)

    def forward(self, block: nn.Module, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x_out
        n = x_out.shape[1] - 1
        if self.scores_override is not None:
            scores = self.scores_override.to(x_out.device)
        else:
            scores = RANKINGS[self.cfg.ranking](self, block, x_in, x_out)
        x = keep_top(x_out, scores, kept_count(n, self.cfg.keep_ratio))
        if self.extra is not None:
            x = torch.cat([x, self.extra.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        return x


def vision_tower(model: nn.Module) -> VisionTransformer:
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"token pruning needs an open_clip VisionTransformer, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise ValueError("token pruning needs a ViT that pools its CLS token (pool_type 'tok', no attentional pool)")
    return visual


def apply_token_pruning(model: nn.Module, cfg: PruneConfig, pruner: TokenPruner | None = None) -> TokenPruner:
    """Install pruning on ``model``'s image tower (replacing any earlier one); returns the pruner."""
    visual = vision_tower(model)
    blocks = visual.transformer.resblocks
    if cfg.after_block >= len(blocks) - 1:
        raise ValueError(f"after_block: must be < {len(blocks) - 1} (the tower has {len(blocks)} blocks)")
    remove_token_pruning(model)
    p = visual.conv1.weight
    pruner = (pruner or TokenPruner(cfg, visual.transformer.width)).to(device=p.device, dtype=p.dtype)
    visual.token_pruner = pruner
    block = blocks[cfg.after_block]
    handle = block.register_forward_hook(lambda mod, args, out: pruner(mod, args[0], out))
    visual._token_pruning_handle = handle
    return pruner


def remove_token_pruning(model: nn.Module) -> None:
    visual = getattr(model, "visual", model)
    handle = visual.__dict__.pop("_token_pruning_handle", None)
    if handle is not None:
        handle.remove()
    if "token_pruner" in visual._modules:
        del visual._modules["token_pruner"]


def pruner_of(model: nn.Module) -> TokenPruner | None:
    return getattr(model, "visual", model)._modules.get("token_pruner")


def save_token_pruning(model: nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the pruner (config + weights) next to an open_clip export of the unpruned weights."""
    pruner = pruner_of(model)
    if pruner is None:
        raise ValueError("model has no token pruning installed")
    folder = Path(folder)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in pruner.state_dict().items()}
    if tensors:
        save_tensors(folder / WEIGHTS_FILE, tensors)
    atomic_write_json(folder / CONFIG_FILE, {"config": asdict(pruner.cfg), **(extra or {})})


def load_token_pruning(model: nn.Module, folder: str | Path) -> TokenPruner | None:
    """Re-apply the pruning saved in ``folder`` (None when the folder holds a plain model)."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        return None
    path = folder / CONFIG_FILE
    cfg = read_prune_config(path)
    weights = folder / WEIGHTS_FILE
    try:
        pruner = apply_token_pruning(model, cfg)
        if weights.is_file():
            pruner.load_state_dict(load_tensors(weights))
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"{path}: does not fit this model ({str(err).splitlines()[0]})") from err
    if not weights.is_file() and any(True for _ in pruner.parameters()):
        raise FileNotFoundError(f"{folder / WEIGHTS_FILE}: missing (the pruning config needs trained weights)")
    return pruner


def read_prune_config(path: Path) -> PruneConfig:
    """``token_pruning.json``'s ``config``, every key checked; errors are one line naming the file and key."""
    raw = read_mapping(path).get("config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config: required mapping missing")
    known = [f.name for f in fields(PruneConfig)]
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise ConfigError(f"{path}: config.{unknown[0]}: unknown key (known: {', '.join(known)})")
    try:
        cfg = PruneConfig(**raw)
        cfg.validate()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: config.{err}") from err
    return cfg
