"""open_clip's self-attention computed batch-first, with the same parameters and the same maths (issue 20).

``nn.MultiheadAttention`` turns a batch-first input into ``[tokens, batch, width]`` and projects q/k/v with a batched
matmul over the tokens (the weight expanded per token), then repacks them; it leaves that path for its fused
kernel only in inference with an even head count and no float mask, which open_clip's towers rarely meet (the
shapes teacher has 5 heads; every text tower has a float causal mask). :func:`fast_attention` projects the
``[batch * tokens, width]`` view with one GEMM and calls ``scaled_dot_product_attention`` directly (measured alone
in ``benchmarks/peer_open_clip_train.py``, docs/LOG.md issue 20).

It is bound per block instance (``block.attention``): parameters, their names and the saved weights are untouched,
so a student still loads in stock open_clip. A block whose attention module carries hooks or parametrisations of
its own kind (importance calibration hooks, slimmable widths, cross-attention) takes open_clip's own path.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn


def _plain(attn: nn.Module) -> bool:
    return (
        type(attn) is nn.MultiheadAttention
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and not attn.add_zero_attn
        and not attn._forward_hooks
        and not attn._forward_pre_hooks
    )


def fast_attention(
    self: ResidualAttentionBlock,
    q_x: torch.Tensor,
    k_x: torch.Tensor | None = None,
    v_x: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ResidualAttentionBlock.attention`` for self-attention; anything else goes to open_clip's own method."""
    attn = self.attn
    if k_x is not None or v_x is not None or not _plain(attn) or q_x.ndim != 3:
        return ResidualAttentionBlock.attention(self, q_x, k_x, v_x, attn_mask)
    batch, tokens, width = q_x.shape
    heads = attn.num_heads
    qkv = F.linear(q_x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q_x.dtype)  # as open_clip does: the mask is additive
        if attn_mask.ndim == 3:  # [batch * heads, tokens, tokens], nn.MultiheadAttention's layout
            attn_mask = attn_mask.view(batch, heads, tokens, tokens)
    dropout = attn.dropout if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


def use_fast_attention(model: nn.Module) -> int:
    """Bind :func:`fast_attention` to every plain open_clip block of ``model``; returns how many were bound."""
    count = 0
    for module in model.modules():
        if type(module) is ResidualAttentionBlock and not hasattr(module, "ln_1_kv"):
            module.attention = types.MethodType(fast_attention, module)
            count += 1
    return count
