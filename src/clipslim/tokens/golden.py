"""The greedy "golden" token ranking, searched on calibration images, and the helpers that run a ViT in two halves.

Golden ranking of one image: starting from all patch tokens after block ``k``, repeatedly remove the token whose
removal changes the final image embedding least (cosine to the unpruned embedding), running blocks ``k+1…`` on
every candidate sequence. A token's score is the step at which it was removed, so keeping the top ``r`` scores
keeps what greedy search kept at that budget. It costs ``N²/2`` partial forwards per image: fine as a training
target for the predictor and as an oracle, not at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from tqdm.auto import tqdm


def hidden_after(visual: VisionTransformer, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) tokens [B, 1 + N, D] of block ``k``, bypassing any hooks (batch-first open_clip ViT)."""
    x = visual._embeds(images)
    x_in = x
    for blk in visual.transformer.resblocks[: k + 1]:
        x_in, x = x, blk.forward(x)
    return x_in, x


def finish(visual: VisionTransformer, x: torch.Tensor, start: int) -> torch.Tensor:
    """Image embeddings (unnormalised) from tokens entering block ``start``."""
    for blk in visual.transformer.resblocks[start:]:
        x = blk.forward(x)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def _without_each(kept: torch.Tensor) -> torch.Tensor:
    """[B, M] kept indices -> [B, M, M-1]: row j drops the j-th kept token."""
    b, m = kept.shape
    off = ~torch.eye(m, dtype=torch.bool, device=kept.device)
    return kept.unsqueeze(1).expand(b, m, m)[:, off].view(b, m, m - 1)


@torch.no_grad()
def golden_scores(
    visual: VisionTransformer, images: torch.Tensor, k: int, chunk: int = 4096, progress: bool = False
) -> torch.Tensor:
    """[B, N] golden scores of each patch token after block ``k`` (higher = removed later = more important)."""
    _, x = hidden_after(visual, images, k)
    target = F.normalize(finish(visual, x, k + 1).float(), dim=-1)
    b, n1, d = x.shape
    n = n1 - 1
    patches, cls = x[:, 1:], x[:, :1]
    kept = torch.arange(n, device=x.device).expand(b, n).clone()
    scores = torch.full((b, n), float(n - 1), device=x.device)
    rows = torch.arange(b, device=x.device)
    for step in tqdm(range(n - 1), desc="golden", disable=not progress, leave=False):
        m = n - step
        cand = _without_each(kept)  # [B, M, M-1]
        seq = patches.gather(1, cand.reshape(b, -1, 1).expand(-1, -1, d)).view(b * m, m - 1, d)
        seq = torch.cat([cls.repeat_interleave(m, 0), seq], dim=1)
        emb = torch.cat([finish(visual, s, k + 1) for s in seq.split(chunk)])
        sim = (F.normalize(emb.float(), dim=-1).view(b, m, -1) * target.unsqueeze(1)).sum(-1)
        drop = sim.argmax(1)  # the removal that keeps the embedding closest
        scores[rows, kept[rows, drop]] = float(step)
        keep_mask = torch.ones_like(kept, dtype=torch.bool)
        keep_mask[rows, drop] = False
        kept = kept[keep_mask].view(b, m - 1)
    return scores
