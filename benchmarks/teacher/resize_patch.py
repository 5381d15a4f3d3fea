"""Warm-start a smaller-patch teacher from a trained one: the patch embedding is resampled with FlexiViT's
pseudo-inverse resize and the position embedding interpolated to the new grid (timm's helpers), every other weight
copied. Issue 16: a 4 x 4 grid of 16-px patches makes colour and shape one linear read-out per patch; an 8 x 8 grid
lets shape be an arrangement of tokens. Writes an open_clip folder that `init:` in a recipe accepts.

timm's resize, not clipslim.tokens.patch_scale (built to enlarge patches): for this 16 -> 8 shrink its bicubic
antialiased basis keeps a smooth patch's token within ~10%, the bilinear one ~26% (tested); the measured run used it.

    python benchmarks/teacher/resize_patch.py --model shapes-teacher:demo --patch 8 --out runs/teacher-p8-init
"""

from __future__ import annotations

import argparse
import copy

import open_clip
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from clipslim.export import export_open_clip
from clipslim.models import load_model, register_configs


def resized_state(state: dict[str, torch.Tensor], patch: int, grid: int) -> dict[str, torch.Tensor]:
    """``state`` with ``visual.conv1.weight`` resampled to ``patch`` px and the position embedding to ``grid`` x
    ``grid`` (+ the class token)."""
    out = dict(state)
    out["visual.conv1.weight"] = resample_patch_embed(state["visual.conv1.weight"].float(), [patch, patch])
    pos = state["visual.positional_embedding"].float()[None]
    out["visual.positional_embedding"] = resample_abs_pos_embed(pos, [grid, grid], num_prefix_tokens=1)[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-teacher:demo", help="the trained model to start from")
    parser.add_argument("--patch", type=int, default=8, help="new patch size in pixels")
    parser.add_argument("--out", required=True, help="output folder (open_clip config + safetensors)")
    args = parser.parse_args()
    register_configs()
    source = load_model(args.model)
    cfg = copy.deepcopy(source.model_cfg)
    cfg["vision_cfg"]["patch_size"] = args.patch
    grid = cfg["vision_cfg"]["image_size"] // args.patch
    model = open_clip.CLIP(**cfg)
    model.load_state_dict(resized_state(source.model.state_dict(), args.patch, grid))
    export_open_clip(model, cfg, args.out, preprocess_cfg=source.preprocess_cfg, arch=source.arch)
    print(f"wrote {args.out}: patch {args.patch}, {grid} x {grid} grid")


if __name__ == "__main__":
    main()
