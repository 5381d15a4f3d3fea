"""TinyCLIP manual inheritance on stock open_clip models (tiny configs, CPU, a few seconds)."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CustomTextCLIP

from clipslim.inherit import InheritError, check_compatible, inherit_manual, interval_layers
from clipslim.models import load_model

HD = 16  # head dim of the tiny configs (vision head_width 16; text 64/4 and 32/2)


def _cfg(name: str = "tiny-teacher", *, vision: dict | None = None, text: dict | None = None, **top) -> dict:
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    cfg.update(top)
    return cfg


def _build(cfg: dict, cls: type = CLIP, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(**cfg).eval()


@pytest.fixture(scope="module")
def pair():
    """tiny-teacher -> tiny-student, inherited once; returns (teacher, student, student_init, report)."""
    torch.manual_seed(0)
    teacher = load_model("tiny-teacher").model.eval()
    student = load_model("tiny-student").model.eval()
    init = {k: v.clone() for k, v in student.state_dict().items()}
    report = inherit_manual(teacher, student)
    return teacher, student, init, report


def _inputs(seed: int = 1, context: int = 16):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g)
    text = torch.randint(1, 49000, (3, context), generator=g)
    text[:, -1] = 49407  # EOT (argmax pooling)
    text[0, 5:] = 0
    text[0, 4] = 49407
    return images, text


# --- interval_layers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_t", "n_s", "expected"),
    [
        (12, 6, [0, 2, 4, 6, 8, 10]),
        (12, 9, list(range(9))),
        (12, 10, list(range(10))),
        (9, 6, list(range(6))),
        (6, 5, [0, 1, 2, 3, 4]),
        (4, 2, [0, 2]),
        (11, 3, [0, 3, 6]),
        (12, 12, list(range(12))),
        (12, 1, [0]),
    ],
)
def test_interval_layers_examples(n_t, n_s, expected):
    assert interval_layers(n_t, n_s) == expected


def test_interval_layers_properties():
    for n_t in range(1, 40):
        for n_s in range(1, n_t + 1):
            idx = interval_layers(n_t, n_s)
            assert len(idx) == n_s
            assert idx[0] == 0
            assert all(a < b for a, b in zip(idx, idx[1:], strict=False))
            assert idx[-1] < n_t
            step = n_t // n_s
            assert all(b - a == step for a, b in zip(idx, idx[1:], strict=False))


@pytest.mark.parametrize(("n_t", "n_s"), [(4, 5), (4, 0)])
def test_interval_layers_rejects_bad_depths(n_t, n_s):
    with pytest.raises(InheritError):
        interval_layers(n_t, n_s)


# --- hand-computed slices --------------------------------------------------------------------------------------


def test_report(pair):
    _, _, _, report = pair
    assert report["visual_layers"] == [0, 2]
    assert report["text_layers"] == [0, 2]
    assert report["logit_scale_copied"] is True
    assert report["kept_init"] == []
    assert report["copied"] == len(pair[1].state_dict())  # tiny CLIP has no persistent buffers
    assert report["visual"]["student"]["heads"] == 2 and report["visual"]["teacher"]["heads"] == 4


def _check_block(t_block, s_block):
    w_t, w_s = t_block.attn.embed_dim, s_block.attn.embed_dim
    h_s = s_block.attn.num_heads
    m_s = s_block.mlp.c_fc.out_features
    tw, sw = t_block.attn.in_proj_weight, s_block.attn.in_proj_weight
    tb, sb = t_block.attn.in_proj_bias, s_block.attn.in_proj_bias
    for part in range(3):  # q, k, v
        for h in range(h_s):
            t_rows = slice(part * w_t + h * HD, part * w_t + (h + 1) * HD)
            s_rows = slice(part * w_s + h * HD, part * w_s + (h + 1) * HD)
            assert torch.equal(sw[s_rows], tw[t_rows, :w_s]), (part, h)
            assert torch.equal(sb[s_rows], tb[t_rows]), (part, h)
    # out_proj: leading output rows; input columns of the kept heads (heads 0..h_s-1 = columns 0..h_s*HD-1)
    kept_cols = torch.cat([torch.arange(h * HD, (h + 1) * HD) for h in range(h_s)])
    assert torch.equal(s_block.attn.out_proj.weight, t_block.attn.out_proj.weight[:w_s][:, kept_cols])
    assert torch.equal(s_block.attn.out_proj.bias, t_block.attn.out_proj.bias[:w_s])
    assert torch.equal(s_block.mlp.c_fc.weight, t_block.mlp.c_fc.weight[:m_s, :w_s])
    assert torch.equal(s_block.mlp.c_fc.bias, t_block.mlp.c_fc.bias[:m_s])
    assert torch.equal(s_block.mlp.c_proj.weight, t_block.mlp.c_proj.weight[:w_s, :m_s])
    assert torch.equal(s_block.mlp.c_proj.bias, t_block.mlp.c_proj.bias[:w_s])
    for ln in ("ln_1", "ln_2"):
        assert torch.equal(getattr(s_block, ln).weight, getattr(t_block, ln).weight[:w_s])
        assert torch.equal(getattr(s_block, ln).bias, getattr(t_block, ln).bias[:w_s])


def test_blocks_match_hand_slices(pair):
    teacher, student, _, _ = pair
    for i, j in enumerate([0, 2]):
        _check_block(teacher.visual.transformer.resblocks[j], student.visual.transformer.resblocks[i])
        _check_block(teacher.transformer.resblocks[j], student.transformer.resblocks[i])


def test_wrong_layer_would_be_caught(pair):
    """Random init makes teacher blocks differ, so a block-index mistake cannot pass the slice check."""
    teacher, student, _, _ = pair
    s_q = student.visual.transformer.resblocks[1].attn.in_proj_weight[:HD]
    for j in (1, 3):
        assert not torch.equal(s_q, teacher.visual.transformer.resblocks[j].attn.in_proj_weight[:HD, :32])
    with pytest.raises(AssertionError):
        _check_block(teacher.transformer.resblocks[1], student.transformer.resblocks[1])


def test_towers_match_hand_slices(pair):
    teacher, student, _, _ = pair
    tv, sv = teacher.visual, student.visual
    assert torch.equal(sv.conv1.weight, tv.conv1.weight[:32])
    assert torch.equal(sv.class_embedding, tv.class_embedding[:32])
    assert torch.equal(sv.positional_embedding, tv.positional_embedding[:, :32])
    for ln in ("ln_pre", "ln_post"):
        assert torch.equal(getattr(sv, ln).weight, getattr(tv, ln).weight[:32])
        assert torch.equal(getattr(sv, ln).bias, getattr(tv, ln).bias[:32])
    assert torch.equal(sv.proj, tv.proj[:32, :32])

    assert torch.equal(student.token_embedding.weight, teacher.token_embedding.weight[:, :32])
    assert torch.equal(student.positional_embedding, teacher.positional_embedding[:16, :32])
    assert torch.equal(student.ln_final.weight, teacher.ln_final.weight[:32])
    assert torch.equal(student.ln_final.bias, teacher.ln_final.bias[:32])
    assert torch.equal(student.text_projection, teacher.text_projection[:32, :32])
    assert torch.equal(student.logit_scale, teacher.logit_scale)


# --- functional checks -----------------------------------------------------------------------------------------


def _assert_same_embeddings(teacher, student, context: int = 16, atol: float = 0.0):
    images, text = _inputs(context=context)
    with torch.no_grad():
        ti, si = teacher.encode_image(images), student.encode_image(images)
        tt, st = teacher.encode_text(text), student.encode_text(text)
    torch.testing.assert_close(si, ti, rtol=0, atol=atol)
    torch.testing.assert_close(st, tt, rtol=0, atol=atol)


def _perturb(model: torch.nn.Module, seed: int = 7) -> None:
    """Make every parameter non-trivial (LayerNorms at 1/0 and zero biases would hide missed copies)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    ("cfg", "cls"),
    [
        (_cfg(), CLIP),
        (_cfg(text={"proj_bias": True}), CLIP),  # text_projection is an nn.Linear
        (_cfg(), CustomTextCLIP),
        (  # custom (NormFormer-style) blocks with layer scale
            _cfg(
                vision={"qk_norm": True, "scale_heads": True, "scale_attn_inner": True, "scale_fc": True},
                text={"scale_attn": True, "scale_heads": True, "ls_init_value": 0.1},
            ),
            CLIP,
        ),
    ],
    ids=["clip", "linear-text-proj", "custom-text-clip", "custom-blocks"],
)
def test_same_config_gives_identical_embeddings(cfg, cls):
    teacher = _build(cfg, cls, seed=0)
    _perturb(teacher)
    student = _build(cfg, cls, seed=1)
    report = inherit_manual(teacher, student)
    assert report["visual_layers"] == list(range(4))
    _assert_same_embeddings(teacher, student)
    for (name, t), (_, s) in zip(teacher.state_dict().items(), student.state_dict().items(), strict=True):
        assert torch.equal(t, s), name


def test_registered_tiny_teacher_pair_identical():
    torch.manual_seed(0)
    teacher = load_model("tiny-teacher").model.eval()
    student = load_model("tiny-teacher").model.eval()
    inherit_manual(teacher, student)
    _assert_same_embeddings(teacher, student)


def test_clip_teacher_to_custom_text_clip_student():
    teacher = _build(_cfg(), CLIP)
    _perturb(teacher)
    student = _build(_cfg(), CustomTextCLIP, seed=1)
    inherit_manual(teacher, student)
    _assert_same_embeddings(teacher, student)


def test_depth_only_student_equals_teacher_with_blocks_dropped():
    teacher = _build(_cfg())
    _perturb(teacher)
    student = _build(_cfg(vision={"layers": 2}, text={"layers": 2}), seed=1)
    report = inherit_manual(teacher, student)
    assert report["visual_layers"] == report["text_layers"] == [0, 2]
    # Same widths: every tensor is copied whole; block i is teacher block 2*i.
    t_sd = teacher.state_dict()
    for name, value in student.state_dict().items():
        t_name = name
        for i, j in ((1, 2), (0, 0)):
            t_name = t_name.replace(f"resblocks.{i}.", f"resblocks.{j}.")
        assert torch.equal(value, t_sd[t_name]), name
    # Functionally, the student is the teacher with blocks 1 and 3 removed.
    pruned = copy.deepcopy(teacher)
    pruned.visual.transformer.resblocks = torch.nn.ModuleList([pruned.visual.transformer.resblocks[j] for j in (0, 2)])
    pruned.transformer.resblocks = torch.nn.ModuleList([pruned.transformer.resblocks[j] for j in (0, 2)])
    _assert_same_embeddings(pruned, student)


def test_shorter_text_context_is_sliced():
    teacher = _build(_cfg())
    student = _build(_cfg(text={"context_length": 8}), seed=1)
    inherit_manual(teacher, student)
    assert torch.equal(student.positional_embedding, teacher.positional_embedding[:8])
    images, text = _inputs(context=8)
    with torch.no_grad():  # causal attention: the first 8 positions see the same inputs in both models
        torch.testing.assert_close(student.encode_text(text), teacher.encode_text(torch.cat([text, text], 1)[:, :16]))


# --- nothing left random; logit scale; dtype ---------------------------------------------------------------------


def test_every_student_parameter_is_written():
    torch.manual_seed(0)
    teacher = load_model("tiny-teacher").model
    _perturb(teacher)
    student = load_model("tiny-student").model
    init = {k: v.clone() for k, v in student.state_dict().items()}
    report = inherit_manual(teacher, student)
    unchanged = [k for k, v in student.state_dict().items() if torch.equal(v, init[k])]
    assert unchanged == []
    assert report["copied"] == len(init)


def test_logit_scale_kept_like_tinyclip():
    teacher = _build(_cfg(), seed=0)
    with torch.no_grad():
        teacher.logit_scale.fill_(3.9)
    student = _build(_cfg("tiny-student"), seed=1)
    before = student.logit_scale.detach().clone()
    report = inherit_manual(teacher, student, copy_logit_scale=False)
    assert report["kept_init"] == ["logit_scale"] and report["logit_scale_copied"] is False
    assert torch.equal(student.logit_scale, before)
    inherit_manual(teacher, student)
    assert student.logit_scale.item() == pytest.approx(3.9)


def test_logit_bias_copied():
    teacher = _build(_cfg(init_logit_bias=-10.0))
    with torch.no_grad():
        teacher.logit_bias.fill_(-7.5)
    student = _build(_cfg("tiny-student", init_logit_bias=-10.0), seed=1)
    inherit_manual(teacher, student)
    assert student.logit_bias.item() == -7.5


def test_student_dtype_preserved():
    teacher = _build(_cfg())
    student = _build(_cfg("tiny-student"), seed=1).double()
    inherit_manual(teacher, student)
    assert all(p.dtype == torch.float64 for p in student.parameters())
    assert torch.equal(student.visual.proj, teacher.visual.proj[:32, :32].double())


@pytest.fixture(scope="module")
def plain_teacher():
    """A tiny-teacher built from its config; the error tests never write to it."""
    return _build(_cfg())


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("student_cfg", "field"),
    [
        (_cfg(vision={"width": 128}), "visual.width"),
        (_cfg(vision={"layers": 5}), "visual.layers"),
        (_cfg(text={"width": 128, "heads": 8}), "text.width"),
        (_cfg(text={"layers": 6}), "text.layers"),
        (_cfg(vision={"mlp_ratio": 8.0}), "visual.mlp_width"),
        (_cfg(embed_dim=64), "visual.embed_dim"),
        (_cfg(text={"context_length": 32}), "text.context_length"),
        (_cfg(vision={"head_width": 8}), "visual.head_dim"),
        (_cfg(text={"width": 32, "heads": 4}), "text.head_dim"),
        (_cfg(vision={"patch_size": 8, "image_size": 16}), "visual.patch_size"),
        (_cfg(vision={"image_size": 48}), "visual.positional_embedding"),
        (_cfg(text={"vocab_size": 1000}), "text.vocab_size"),
        (_cfg(text={"proj_bias": True}), "text.text_projection"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_incompatible_students_are_rejected_untouched(plain_teacher, student_cfg, field):
    teacher = plain_teacher
    student = _build(student_cfg, seed=1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(InheritError, match=field.replace(".", r"\.")):
        inherit_manual(teacher, student)
    with pytest.raises(InheritError):
        check_compatible(teacher, student)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_error_message_names_both_sizes(plain_teacher):
    teacher = plain_teacher
    student = _build(_cfg(vision={"width": 128}), seed=1)
    with pytest.raises(InheritError, match=r"student visual\.width 128 > teacher 64"):
        check_compatible(teacher, student)
    student = _build(_cfg(vision={"head_width": 8}), seed=1)
    with pytest.raises(InheritError, match=r"student 8, teacher 16"):
        check_compatible(teacher, student)


def test_unsupported_towers_are_rejected():
    teacher = _build(_cfg())
    resnet = _build(_cfg(vision={"layers": [1, 1, 1, 1], "width": 8}), seed=1)
    with pytest.raises(InheritError, match="ModifiedResNet"):
        check_compatible(teacher, resnet)
    attn_pool = _build(_cfg(vision={"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}))
    with pytest.raises(InheritError, match="attn_pool"):
        check_compatible(attn_pool, teacher)


def test_unknown_student_parameter_is_reported():
    teacher = _build(_cfg())
    student = _build(_cfg("tiny-student"), seed=1)
    student.visual.extra_adapter = torch.nn.Parameter(torch.zeros(3))
    before = student.visual.proj.detach().clone()
    with pytest.raises(InheritError, match="visual.extra_adapter"):
        inherit_manual(teacher, student)
    assert torch.equal(student.visual.proj, before)  # nothing written


def test_layers_from_explicit_indices_not_key_order():
    """TinyCLIP quirk 8: its layer selection walks state-dict keys, which goes wrong for 11+ layers once keys are
    sorted ('resblocks.10' < 'resblocks.2'). Blocks are indexed explicitly here: 12 -> 6 must give 0, 2, ..., 10."""
    cfg_t = _cfg(vision={"layers": 12, "width": 32}, text={"layers": 12, "width": 32, "heads": 2})
    cfg_s = _cfg(vision={"layers": 6, "width": 32}, text={"layers": 6, "width": 32, "heads": 2})
    teacher = _build(cfg_t)
    student = _build(cfg_s, seed=1)
    report = inherit_manual(teacher, student)
    assert report["visual_layers"] == [0, 2, 4, 6, 8, 10]
    for i, j in enumerate(report["visual_layers"]):
        assert torch.equal(
            student.visual.transformer.resblocks[i].attn.in_proj_weight,
            teacher.visual.transformer.resblocks[j].attn.in_proj_weight,
        )
