"""Importance-ranked inheritance on tiny configs: shapes, constructed rankings with known answers, exact formulas."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipslim.cli import main
from clipslim.config import ConfigError
from clipslim.inherit import (
    InheritError,
    importance_scores,
    importance_selection,
    inherit_importance,
    inherit_manual,
    manual_selection,
    tower_geometry,
)
from clipslim.inherit.importance import _head_outputs, calibration_batches
from clipslim.inherit.manual import tower_pairs
from clipslim.models import load_model

HD = 16
METHODS = ("magnitude", "activation", "gradient")
DEAD_HEAD, DEAD_FFN, DEAD_WIDTH, DEAD_BLOCK = (0, 1), (2, 5), 7, 3  # visual (layer, head); text (layer, ch); ...


def _batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = torch.randint(1, 49000, (8, 16), generator=g)
        text[:, 10] = 49407  # EOT
        out.append({"image": torch.randn(8, 3, 32, 32, generator=g), "text": text})
    return out


def _teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = load_model("tiny-teacher").model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@torch.no_grad()
def _construct(model: torch.nn.Module) -> torch.nn.Module:
    """Known answers: one dead head, one dead FFN channel, one dead residual channel, one identity block."""
    v = model.visual
    layer, head = DEAD_HEAD
    attn = v.transformer.resblocks[layer].attn
    rows = torch.cat([part * 64 + torch.arange(head * HD, (head + 1) * HD) for part in range(3)])
    attn.in_proj_weight[rows] = 0
    attn.in_proj_bias[rows] = 0
    attn.out_proj.weight[:, head * HD : (head + 1) * HD] = 0
    layer, ch = DEAD_FFN
    mlp = model.transformer.resblocks[layer].mlp
    mlp.c_fc.weight[ch] = 0
    mlp.c_fc.bias[ch] = 0
    mlp.c_proj.weight[:, ch] = 0
    c = DEAD_WIDTH  # every visual weight that reads or writes residual channel c
    v.conv1.weight[c] = 0
    v.class_embedding[c] = 0
    v.positional_embedding[:, c] = 0
    v.proj[c] = 0
    for ln in (v.ln_pre, v.ln_post):
        ln.weight[c] = 0
        ln.bias[c] = 0
    for b in v.transformer.resblocks:
        b.attn.in_proj_weight[:, c] = 0
        b.attn.out_proj.weight[c] = 0
        b.attn.out_proj.bias[c] = 0
        b.mlp.c_fc.weight[:, c] = 0
        b.mlp.c_proj.weight[c] = 0
        b.mlp.c_proj.bias[c] = 0
        for ln in (b.ln_1, b.ln_2):
            ln.weight[c] = 0
            ln.bias[c] = 0
    block = v.transformer.resblocks[DEAD_BLOCK]  # writes nothing: the block is the identity
    for linear in (block.attn.out_proj, block.mlp.c_proj):
        linear.weight.zero_()
        linear.bias.zero_()
    return model


@pytest.fixture(scope="module")
def constructed():
    model = _construct(_teacher())
    return model, {m: importance_scores(model, m, _batches()) for m in METHODS}


# --- constructed cases: the right answer is known ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_dead_structures_rank_last(constructed, method):
    _, scores = constructed
    vis, txt = scores[method]["visual"], scores[method]["text"]
    layer, head = DEAD_HEAD
    assert vis.heads[layer].argmin().item() == head and vis.heads[layer, head] == 0
    layer, ch = DEAD_FFN
    assert txt.mlp[layer].argmin().item() == ch and txt.mlp[layer, ch] == 0
    assert vis.width.argmin().item() == DEAD_WIDTH and vis.width[DEAD_WIDTH] == 0
    assert vis.layers.argmin().item() == DEAD_BLOCK and vis.layers[DEAD_BLOCK] == 0
    assert (vis.heads[DEAD_HEAD[0]] > 0).sum() == 3  # nothing else is dead


@pytest.mark.parametrize("method", METHODS)
def test_selection_drops_the_dead_structures(constructed, method):
    teacher, scores = constructed
    student = load_model("tiny-student").model
    sel = importance_selection(teacher, student, scores[method])
    assert DEAD_BLOCK not in sel["visual"].layers and len(sel["visual"].layers) == 2
    assert DEAD_WIDTH not in sel["visual"].width and len(sel["visual"].width) == 32
    if DEAD_HEAD[0] in sel["visual"].layers:
        assert DEAD_HEAD[1] not in sel["visual"].heads[sel["visual"].layers.index(DEAD_HEAD[0])]
    if DEAD_FFN[0] in sel["text"].layers:
        assert DEAD_FFN[1] not in sel["text"].mlp[sel["text"].layers.index(DEAD_FFN[0])]
    assert sel["visual"].layers == sorted(sel["visual"].layers)


# --- same shapes as the manual rule; uniform scores reproduce it ------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_same_shapes_as_manual_and_weights_are_teacher_slices(method):
    teacher = _teacher()
    manual, ranked = load_model("tiny-student").model, load_model("tiny-student").model
    inherit_manual(teacher, manual)
    report = inherit_importance(teacher, ranked, method=method, calib_batches=_batches(1))
    assert report["strategy"] == f"importance:{method}"
    assert {k: v.shape for k, v in ranked.state_dict().items()} == {k: v.shape for k, v in manual.state_dict().items()}
    sel = report["selection"]["visual"]
    block = sel["layers"][1]
    rows = torch.tensor([p * 64 + h * HD + j for p in range(3) for h in sel["heads"][1] for j in range(HD)])
    expected = teacher.visual.transformer.resblocks[block].attn.in_proj_weight[rows][:, sel["width"]]
    assert torch.equal(ranked.visual.transformer.resblocks[1].attn.in_proj_weight, expected)
    fc = teacher.visual.transformer.resblocks[block].mlp.c_fc.weight[sel["mlp"][1]][:, sel["width"]]
    assert torch.equal(ranked.visual.transformer.resblocks[1].mlp.c_fc.weight, fc)


def test_uniform_scores_reproduce_the_manual_rule():
    teacher = _teacher()
    student = load_model("tiny-student").model
    scores = importance_scores(teacher, "magnitude")
    for s in scores.values():
        for name in ("width", "heads", "mlp", "embed", "layers"):
            getattr(s, name).fill_(1.0)
    sel = importance_selection(teacher, student, scores, rank_layers=False)
    for t_tower, s_tower in tower_pairs(teacher, student):
        assert sel[t_tower.kind] == manual_selection(tower_geometry(t_tower), tower_geometry(s_tower))


# --- exact formulas ---------------------------------------------------------------------------------------------------


def test_magnitude_head_score_by_hand():
    teacher = _teacher()
    s = importance_scores(teacher, "magnitude")["visual"]
    attn = teacher.visual.transformer.resblocks[2].attn
    h = 3
    v_rows = attn.in_proj_weight[2 * 64 + h * HD : 2 * 64 + (h + 1) * HD]
    expected = v_rows.norm() * attn.out_proj.weight[:, h * HD : (h + 1) * HD].norm()
    assert s.heads[2, h].item() == pytest.approx(expected.item(), rel=1e-5)
    assert s.layers[2].item() == pytest.approx((s.heads[2].sum() + s.mlp[2].sum()).item(), rel=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_head_outputs_add_up_to_multihead_attention(causal):
    """The per-head recomputation used by the activation method matches nn.MultiheadAttention exactly."""
    teacher = _teacher()
    block = teacher.transformer.resblocks[1] if causal else teacher.visual.transformer.resblocks[1]
    x = torch.randn(2, 16, 64)
    mask = teacher.attn_mask if causal else None
    with torch.no_grad():
        ref = block.attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        heads = _head_outputs(block.attn, x, mask)
    torch.testing.assert_close(heads.sum(1) + block.attn.out_proj.bias, ref, atol=1e-5, rtol=1e-5)


def test_gradient_score_is_the_taylor_sum():
    teacher = _teacher()
    batch = _batches(1)[0]
    s = importance_scores(teacher, "gradient", [batch])["text"]
    mlp = teacher.transformer.resblocks[1].mlp
    params = [mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight]
    image = teacher.encode_image(batch["image"], normalize=True)
    text = teacher.encode_text(batch["text"], normalize=True)
    logits = teacher.logit_scale.exp() * image @ text.t()
    labels = torch.arange(8)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    g_fc, g_b, g_proj = torch.autograd.grad(loss, params)
    m = 9
    expected = (g_fc[m] * params[0][m]).sum() + g_b[m] * params[1][m] + (g_proj[:, m] * params[2][:, m]).sum()
    assert s.mlp[1, m].item() == pytest.approx(abs(expected.item()), rel=1e-4, abs=1e-9)


# --- errors, recipes, CLI -----------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    teacher, student = _teacher(), load_model("tiny-student").model
    with pytest.raises(InheritError, match="calib_batches"):
        inherit_importance(teacher, student, method="activation")
    with pytest.raises(InheritError, match="unknown"):
        inherit_importance(teacher, student, method="entropy")
    with pytest.raises(InheritError, match="visual.width"):
        inherit_importance(student, teacher)


def test_recipe_init_importance(tiny_recipe):
    from clipslim.config import to_dict
    from clipslim.recipe import recipe_from_dict
    from clipslim.train.setup import build_student

    data = to_dict(tiny_recipe())
    with pytest.raises(ConfigError, match=r"student\.init: unknown importance method 'taylor'"):
        recipe_from_dict({**data, "student": {"arch": "tiny-student", "init": "importance:taylor"}})
    recipe = recipe_from_dict(
        {**data, "student": {"arch": "tiny-student", "init": "importance:activation", "calib_batches": 1}}
    )
    torch.manual_seed(0)
    student, report = build_student(recipe, load_model("tiny-teacher"))
    assert report["strategy"] == "importance:activation"
    assert len(report["selection"]["text"]["layers"]) == 2 and student.model.visual.transformer.width == 32


def test_calibration_batches_are_first_batches_in_file_order(tiny_shapes):
    bundle = load_model("tiny-teacher")
    a = calibration_batches(tiny_shapes / "train", bundle, n_batches=2, batch_size=16)
    b = calibration_batches(tiny_shapes / "train", bundle, n_batches=1, batch_size=16)
    assert len(a) == 2 and a[0]["image"].shape == (16, 3, 32, 32)
    assert torch.equal(a[0]["image"], b[0]["image"]) and torch.equal(a[0]["text"], b[0]["text"])


def test_cli_inherit_writes_a_stock_open_clip_folder(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "student"
    code = main(
        ["inherit", "--teacher", "tiny-teacher", "--student", "tiny-student", "--strategy", "importance:activation",
         "--data", str(tiny_shapes), "--calib-batches", "1", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "inherit.json").read_text())
    assert report["strategy"] == "importance:activation" and "zeroshot_heldout" in report["eval"]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert model.visual.transformer.width == 32
    assert main(["inherit", "--teacher", "tiny-teacher", "--student", "tiny-student", "--strategy", "best",
                 "--out", str(out)]) == 2  # fmt: skip
    assert "--strategy" in capsys.readouterr().err
