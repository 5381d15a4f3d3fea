"""An export-only rewrite of open_clip's transformer blocks that ONNX Runtime runs faster: same weights, same maths.

``nn.MultiheadAttention`` exports (through its fused native kernel's decomposition) as ~25 Reshape / Transpose /
Slice / Gather nodes per block, and every linear layer of a ``[batch, tokens, width]`` tensor becomes MatMul + a
separate bias Add. ``OrtBlock`` computes the same block on a ``[batch * tokens, width]`` view, so each linear layer
exports as one Gemm (bias fused), with q / k / v as three Gemms on pre-split weights and attention as two MatMuls
and a Softmax. Measured in ``benchmarks/deploy_speed.py`` (``graph`` section); parity is tested to 1e-5.
"""

from __future__ import annotations

import copy

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn


class OrtBlock(nn.Module):
    """A ``ResidualAttentionBlock`` (pre-norm, batch first) recomputed with 2-D GEMMs and explicit attention."""

    def __init__(self, block: ResidualAttentionBlock):
        super().__init__()
        attn = block.attn
        self.heads, width = attn.num_heads, attn.embed_dim
        self.ln_1, self.ln_2, self.ls_1, self.ls_2, self.mlp = block.ln_1, block.ln_2, block.ls_1, block.ls_2, block.mlp
        self.out_proj = attn.out_proj
        bias = attn.in_proj_bias if attn.in_proj_bias is not None else torch.zeros(3 * width)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        for lin, w, b in zip((self.q, self.k, self.v), attn.in_proj_weight.chunk(3), bias.chunk(3), strict=True):
            lin.weight.data.copy_(w.detach())
            lin.bias.data.copy_(b.detach())
        self.to(attn.in_proj_weight.device, attn.in_proj_weight.dtype)

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer asks its first block for the cast dtype
        return self.q.weight.dtype

    def _heads(self, x: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
        return x.reshape(batch, tokens, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, width = x.shape
        flat = x.reshape(batch * tokens, width)
        y = self.ln_1(flat)
        q, k, v = (self._heads(lin(y), batch, tokens) for lin in (self.q, self.k, self.v))
        scores = torch.matmul(q * (width // self.heads) ** -0.5, k.transpose(-1, -2))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask, float("-inf"))
            scores = scores + (
                attn_mask.reshape(batch, self.heads, tokens, tokens) if attn_mask.ndim == 3 else attn_mask
            )
        out = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(batch * tokens, width)
        flat = flat + self.ls_1(self.out_proj(out))
        flat = flat + self.ls_2(self.mlp(self.ln_2(flat)))
        return flat.reshape(batch, tokens, width)


def _swappable(block: nn.Module) -> bool:
    """Plain open_clip blocks only; a hooked block (token pruning) keeps its own forward so the hook still runs."""
    if type(block) is not ResidualAttentionBlock or block._forward_hooks or block._forward_pre_hooks:
        return False
    attn = block.attn
    return attn._qkv_same_embed_dim and attn.batch_first and attn.bias_k is None and not hasattr(block, "ln_1_kv")


def onnx_ready(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose plain transformer blocks are ``OrtBlock``s (others are left as they are)."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        blocks = getattr(module, "resblocks", None)
        if isinstance(blocks, nn.ModuleList) and getattr(module, "batch_first", True):
            for i, block in enumerate(blocks):
                if _swappable(block):
                    blocks[i] = OrtBlock(block)
    return model
