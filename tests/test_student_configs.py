"""Shipped student configs (issue 22, part 2): they build in stock open_clip, TinyCLIP's shapes have the published
parameter counts, and half / quarter students inherit from their teacher."""

from __future__ import annotations

import open_clip
import pytest
import torch
from torch import nn

from clipslim.inherit.manual import check_compatible, inherit_manual
from clipslim.models import CONFIG_DIR, quiet_random_init

# name -> (teacher, published vision params M, published text params M without the token embedding)
TINYCLIP = {
    "TinyCLIP-ViT-61M-32-Text-29M": ("ViT-B-32", 61, 29),
    "TinyCLIP-ViT-40M-32-Text-19M": ("ViT-B-32", 40, 19),
    "TinyCLIP-ViT-39M-16-Text-19M": ("ViT-B-16", 39, 19),
    "TinyCLIP-ViT-8M-16-Text-3M": ("ViT-B-16", 8, 3),
}
FRACTIONS = {"half": 0.5, "quarter": 0.25}
TEACHERS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")


def _meta(name: str) -> nn.Module:
    with quiet_random_init(), torch.device("meta"):
        return open_clip.create_model(name, device="meta")


def _block_params(model: nn.Module) -> int:
    """Parameters of the transformer blocks of both towers (what half / quarter halve or quarter)."""
    blocks = [model.visual.transformer.resblocks, model.transformer.resblocks]
    return sum(p.numel() for b in blocks for p in b.parameters())


def test_every_shipped_student_is_a_file_open_clip_lists():
    names = {*TINYCLIP, *(f"{t}-{f}" for t in TEACHERS for f in FRACTIONS)}
    assert names <= {p.stem for p in CONFIG_DIR.glob("*.json")}
    assert names <= set(open_clip.list_models())


@pytest.mark.parametrize("name", sorted(TINYCLIP))
def test_tinyclip_shapes_have_the_published_param_counts(name):
    teacher, vision_m, text_m = TINYCLIP[name]
    model = _meta(name)
    vision = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for p in model.parameters()) - vision - model.token_embedding.weight.numel()
    assert (round(vision / 1e6), round(text / 1e6)) == (vision_m, text_m)
    check_compatible(_meta(teacher), model)


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("fraction", sorted(FRACTIONS))
def test_half_and_quarter_are_that_fraction_and_inheritable(teacher, fraction):
    t, s = _meta(teacher), _meta(f"{teacher}-{fraction}")
    assert _block_params(s) / _block_params(t) == pytest.approx(FRACTIONS[fraction], rel=0.02)
    check_compatible(t, s)


@pytest.mark.slow  # two real-size models: ~10 s on 2 CPU cores
def test_tinyclip_student_inherits_from_random_real_size_teacher():
    torch.manual_seed(0)
    with quiet_random_init():
        teacher = open_clip.create_model("ViT-B-32")
        student = open_clip.create_model("TinyCLIP-ViT-40M-32-Text-19M")
    report = inherit_manual(teacher, student)
    assert report["text_layers"] == [0, 2, 4, 6, 8, 10]
    s_blk, t_blk = student.transformer.resblocks[1], teacher.transformer.resblocks[2]
    assert torch.equal(s_blk.mlp.c_fc.weight, t_blk.mlp.c_fc.weight)
    assert torch.equal(student.visual.conv1.weight, teacher.visual.conv1.weight[:512])
    image = torch.randn(1, 3, 224, 224)
    assert student.encode_image(image).shape == (1, 512)
