"""CLIP-KD / MobileCLIP loss terms against references: hand-written formulas, autograd and open_clip's losses.

Models are tiny open_clip CLIPs built in-process (a 32 px ViT with 4 px patches: 64 patch tokens), so MFD's masking
is observable; teacher outputs are random unit vectors, so student and teacher sizes can differ (32 vs 64).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from torch import nn

from clipslim.config import ConfigError
from clipslim.distiller import Distiller, HasStudentView
from clipslim.objectives import Dims, Outputs, get_objective, parse_config
from clipslim.objectives.affinity import soft_cross_entropy
from clipslim.objectives.clip import info_nce
from clipslim.objectives.gradient import info_nce_grads
from clipslim.objectives.masked_feature import mask_seed
from clipslim.recipe import ObjectiveSpec, recipe_from_dict

B, D_S, D_T, PATCHES = 6, 32, 64, 64


def _unit(g: torch.Generator, n: int, d: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _outputs(seed: int, n: int = B, d: int = D_S, scale: float = 14.0) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    return Outputs(image=_unit(g, n, d), text=_unit(g, n, d), logit_scale=torch.tensor(scale))


def _make(name: str, d_s: int = D_S, d_t: int = D_S, **options):
    cls = get_objective(name)
    return cls(parse_config(cls, options, f"objectives.{name}"), Dims(d_s), Dims(d_t))


def _spec(name: str, weight: float = 1.0, **options) -> ObjectiveSpec:
    return ObjectiveSpec(name, weight, parse_config(get_objective(name), options, f"objectives.{name}"))


def _tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    vision = {"image_size": 32, "patch_size": 4, "width": 32, "layers": 1, "head_width": 16}
    text = {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    return CLIP(D_S, vision, text)


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(B, 3, 32, 32, generator=g), "text": torch.randint(1, 100, (B, 8), generator=g)}


# --- affinity: several teachers -------------------------------------------------------------------------------------


def test_affinity_one_slice_equals_single_teacher():
    s, t = _outputs(1, scale=10.0), _outputs(2)
    single = _make("affinity", teacher_scale=50.0)(s, t, {})["affinity_loss"]
    one_slice = _make("affinity", teacher_slices=[D_S], teacher_scales=[50.0])(s, t, {})["affinity_loss"]
    torch.testing.assert_close(one_slice, single)


def test_affinity_two_teachers_average_after_softmax():
    g = torch.Generator().manual_seed(3)
    parts = [(_unit(g, B, 8), _unit(g, B, 8)), (_unit(g, B, 24), _unit(g, B, 24))]
    # What an ensemble encoder hands over: the concatenation, normalised as a whole (so each slice has norm < 1).
    t = Outputs(
        image=F.normalize(torch.cat([p[0] for p in parts], -1), dim=-1),
        text=F.normalize(torch.cat([p[1] for p in parts], -1), dim=-1),
        logit_scale=torch.tensor(1.0),
    )
    s = _outputs(4, scale=12.0)
    got = _make("affinity", d_t=32, teacher_slices=[8, 24], teacher_scales=[100.0, 60.0])(s, t, {})["affinity_loss"]
    p_i2t = 0.5 * ((100 * parts[0][0] @ parts[0][1].T).softmax(1) + (60 * parts[1][0] @ parts[1][1].T).softmax(1))
    p_t2i = 0.5 * ((100 * parts[0][1] @ parts[0][0].T).softmax(1) + (60 * parts[1][1] @ parts[1][0].T).softmax(1))
    logits = 12.0 * s.image @ s.text.T
    expected = -0.5 * ((p_i2t * logits.log_softmax(1)).sum(1).mean() + (p_t2i * logits.T.log_softmax(1)).sum(1).mean())
    torch.testing.assert_close(got, expected)
    # Averaging logits instead (the other MobileCLIP option) gives a different target.
    avg_logits = 0.5 * (100 * parts[0][0] @ parts[0][1].T + 60 * parts[1][0] @ parts[1][1].T)
    assert not torch.allclose(
        got, 0.5 * (soft_cross_entropy(avg_logits, logits) + soft_cross_entropy(avg_logits.T, logits.T))
    )


def test_affinity_slices_default_to_teacher_scale_for_each_teacher():
    s, t = _outputs(5), _outputs(6, d=16)
    both = _make("affinity", d_t=16, teacher_scale=30.0, teacher_slices=[8, 8])(s, t, {})["affinity_loss"]
    explicit = _make("affinity", d_t=16, teacher_slices=[8, 8], teacher_scales=[30.0, 30.0])(s, t, {})["affinity_loss"]
    torch.testing.assert_close(both, explicit)


def test_affinity_slices_validated():
    with pytest.raises(ConfigError, match=r"^objectives.affinity.teacher_slices: sizes \[8, 8\] sum to 16, not .* 32$"):
        _make("affinity", d_t=32, teacher_slices=[8, 8])
    with pytest.raises(ConfigError, match=r"objectives.affinity.teacher_scales: expected 2 scale"):
        _make("affinity", teacher_slices=[16, 16], teacher_scales=[50.0])
    with pytest.raises(ConfigError, match=r"objectives.affinity.teacher_slices: expected a non-empty"):
        _make("affinity", teacher_slices=[0, 32])


# --- feature (FD) ---------------------------------------------------------------------------------------------------


def test_feature_hand_computed_equal_dims():
    s, t = _outputs(1), _outputs(2)
    obj = _make("feature")
    assert not list(obj.parameters()), "no projector when sizes agree"
    expected = ((s.image - t.image) ** 2).mean() + ((s.text - t.text) ** 2).mean()
    torch.testing.assert_close(obj(s, t, {})["feature_loss"], expected)
    torch.testing.assert_close(
        _make("feature", text=False)(s, t, {})["feature_loss"], ((s.image - t.image) ** 2).mean()
    )


def test_feature_projects_and_renormalises_when_dims_differ():
    s, t = _outputs(1), _outputs(2, d=D_T)
    obj = _make("feature", d_t=D_T)
    img = F.normalize(s.image @ obj.image_proj.weight.T + obj.image_proj.bias, dim=-1)
    txt = F.normalize(s.text @ obj.text_proj.weight.T + obj.text_proj.bias, dim=-1)
    expected = ((img - t.image) ** 2).mean() + ((txt - t.text) ** 2).mean()
    torch.testing.assert_close(obj(s, t, {})["feature_loss"], expected)


# --- masked_feature (MFD) -------------------------------------------------------------------------------------------


def _seq_lengths(model: CLIP) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    seen: list[int] = []
    hook = model.visual.transformer.resblocks[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].shape[1])
    )
    return seen, hook


@pytest.mark.parametrize(("keep_ratio", "kept"), [(0.25, 16), (0.1, 6), (0.5, 32)])
def test_masked_feature_student_sees_kept_patches_plus_cls(keep_ratio, kept):
    model = _tiny_clip()
    distiller = Distiller(model, [_spec("masked_feature", keep_ratio=keep_ratio)], D_T)
    seen, hook = _seq_lengths(model)
    distiller(_batch(), _outputs(9, d=D_T))
    hook.remove()
    assert seen == [1 + PATCHES, 1 + kept]  # the shared unmasked forward, then this term's masked one
    assert isinstance(model.visual.patch_dropout, nn.Identity), "the student's own patch_dropout is restored"
    assert isinstance(distiller.objectives["masked_feature"], HasStudentView)


def _explicit_masked_image(model: CLIP, images: torch.Tensor, kept: int) -> torch.Tensor:
    """The ViT forward written out by hand, keeping CLS + `kept` patches chosen the way KeepPatches draws them."""
    v = model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    noise = torch.rand(x.shape[0], PATCHES, generator=torch.Generator().manual_seed(mask_seed(1)))
    idx = noise.topk(kept, dim=1).indices
    x = torch.cat([x[:, :1], torch.stack([row[i] for row, i in zip(x[:, 1:], idx, strict=True)])], dim=1)
    x = v.ln_post(v.transformer(v.ln_pre(x)))
    return F.normalize(x[:, 0] @ v.proj, dim=-1)


def test_masked_feature_loss_is_fd_on_the_masked_forward():
    model, batch, t = _tiny_clip(), _batch(), _outputs(9, d=D_T)
    distiller = Distiller(model, [_spec("masked_feature")], D_T)
    obj = distiller.objectives["masked_feature"]
    torch.manual_seed(123)
    got = distiller(batch, t)["masked_feature_loss"]
    torch.manual_seed(123)
    image = _explicit_masked_image(model, batch["image"], kept=16)
    text = model.encode_text(batch["text"], normalize=True)
    expected = F.mse_loss(F.normalize(obj.image_proj(image), dim=-1), t.image) + F.mse_loss(
        F.normalize(obj.text_proj(text), dim=-1), t.text
    )
    torch.testing.assert_close(got, expected)
    unmasked = Distiller(model, [_spec("masked_feature", keep_ratio=1.0)], D_T)
    unmasked.objectives.load_state_dict(distiller.objectives.state_dict())
    assert not torch.allclose(got, unmasked(batch, t)["masked_feature_loss"]), "masking changes what the loss sees"
    got.backward()
    assert model.visual.conv1.weight.grad is not None and model.visual.conv1.weight.grad.abs().sum() > 0


def test_masked_feature_keep_all_equals_fd():
    model, batch, t = _tiny_clip(), _batch(), _outputs(9)
    mfd = Distiller(model, [_spec("masked_feature", keep_ratio=1.0)], D_S)(batch, t)["masked_feature_loss"]
    fd = Distiller(model, [_spec("feature")], D_S)(batch, t)["feature_loss"]
    torch.testing.assert_close(mfd, fd)


def test_masked_feature_validates_and_needs_a_vit():
    with pytest.raises(ConfigError, match=r"objectives.masked_feature.keep_ratio: must be in \(0, 1\]"):
        _make("masked_feature", keep_ratio=0.0)
    not_vit = nn.Module()
    not_vit.visual = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="VisionTransformer"):
        _make("masked_feature").student_view(not_vit, _batch(), _outputs(0))


# --- icl ------------------------------------------------------------------------------------------------------------


def test_icl_hand_computed_with_exponentiated_scale():
    s, t = _outputs(1), _outputs(2)
    out = _make("icl")(s, t, {})
    assert out["icl_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)  # not the anchor's raw ln(1/0.07)
    labels = torch.arange(B)
    expected = 0.5 * (
        F.cross_entropy(s.image @ t.text.T / 0.07, labels) + F.cross_entropy(s.text @ t.image.T / 0.07, labels)
    )
    torch.testing.assert_close(out["icl_loss"], expected)


def test_icl_scale_is_clamped():
    obj = _make("icl")
    with torch.no_grad():
        obj.scale.log_scale.fill_(math.log(1000.0))
    assert obj(_outputs(1), _outputs(2), {})["icl_scale"].item() == pytest.approx(100.0)
    with pytest.raises(ConfigError, match=r"objectives.icl.scale_init"):
        _make("icl", scale_init=200.0)


# --- gradient (GD) --------------------------------------------------------------------------------------------------


def test_info_nce_grads_match_autograd():
    g = torch.Generator().manual_seed(0)
    p, k = _unit(g, B, 8).requires_grad_(), _unit(g, B, 8).requires_grad_()
    scale = torch.tensor(17.0)
    loss = F.cross_entropy(scale * p @ k.T, torch.arange(B))
    ref_p, ref_k = torch.autograd.grad(loss, (p, k))
    got_p, got_k = info_nce_grads(p, k, scale)
    torch.testing.assert_close(got_p, ref_p)
    torch.testing.assert_close(got_k, ref_k)
    # The two directions together are the gradient of the symmetric InfoNCE used as the task loss.
    ref_i, ref_t = torch.autograd.grad(info_nce(p, k, scale), (p, k))
    p_t2i, k_t2i = info_nce_grads(k, p, scale)
    torch.testing.assert_close(0.5 * (got_p + k_t2i), ref_i)
    torch.testing.assert_close(0.5 * (got_k + p_t2i), ref_t)


def _autograd_grads(o: Outputs) -> list[torch.Tensor]:
    image, text = o.image.clone().requires_grad_(), o.text.clone().requires_grad_()
    labels = torch.arange(B)
    i2t = torch.autograd.grad(F.cross_entropy(o.logit_scale * image @ text.T, labels), (image, text))
    t2i = torch.autograd.grad(F.cross_entropy(o.logit_scale * text @ image.T, labels), (text, image))
    return [*i2t, *t2i]


def test_gradient_loss_is_mse_of_true_infonce_gradients():
    s, t = _outputs(1, scale=14.0), _outputs(2, scale=50.0)
    got = _make("gradient")(s, t, {})["gradient_loss"]
    expected = sum(F.mse_loss(a, b) for a, b in zip(_autograd_grads(s), _autograd_grads(t), strict=True))
    torch.testing.assert_close(got, expected)
    assert got.item() > 1e-5, "true gradients, not the anchor's ~1e-7 (divided by the exp'd scale)"
    assert _make("gradient")(t, t, {})["gradient_loss"].item() == pytest.approx(0.0, abs=1e-12)


# --- fusion (AFD) ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d_t", [D_S, D_T])
def test_fusion_matches_open_clip_loss_on_fused_features(d_t):
    s, t = _outputs(1), _outputs(2, d=d_t)
    obj = _make("fusion", d_t=d_t)
    assert obj.image_fuse.weight.shape == (D_S, D_S + d_t)
    out = obj(s, t, {})
    f_i = F.normalize(obj.image_fuse(torch.cat([s.image, t.image], -1)), dim=-1)
    f_t = F.normalize(obj.text_fuse(torch.cat([s.text, t.text], -1)), dim=-1)
    torch.testing.assert_close(out["fusion_loss"], ClipLoss()(f_i, f_t, torch.tensor(1 / 0.07)))
    assert out["fusion_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


# --- the Distiller owns and trains every learnable extra ------------------------------------------------------------

EXTRAS = {
    "feature": ["image_proj.weight", "image_proj.bias", "text_proj.weight", "text_proj.bias"],
    "masked_feature": ["image_proj.weight", "text_proj.weight"],
    "icl": ["image_proj.weight", "text_proj.weight", "scale.log_scale"],
    "gradient": ["image_proj.weight", "text_proj.weight"],
    "fusion": ["image_fuse.weight", "text_fuse.weight", "scale.log_scale"],
}


@pytest.mark.parametrize("name", sorted(EXTRAS))
def test_learnable_extras_are_checkpointed_and_trained(name):
    model = _tiny_clip()
    distiller = Distiller(model, [_spec(name)], D_T)
    keys = distiller.state_dict().keys()
    for extra in EXTRAS[name]:
        assert f"objectives.{name}.{extra}" in keys
    out = distiller(_batch(), _outputs(9, d=D_T, scale=50.0))
    out["loss"].backward()
    for key, param in distiller.objectives[name].named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}.{key} got no gradient"
    assert model.visual.proj.grad is not None and model.text_projection.grad is not None


def test_zero_weight_term_is_not_built():
    recipe = recipe_from_dict(
        {
            "teacher": "tiny-teacher",
            "student": {"arch": "tiny-student"},
            "data": {"train": "x"},
            "objectives": {"clip": 1.0, "feature": 0.0, "icl": {"weight": 0, "scale_init": 10.0}, "fusion": 1.0},
        }
    )
    distiller = Distiller(_tiny_clip(), recipe.objective_specs(), D_T)
    assert list(distiller.objectives) == ["clip", "fusion"]
    assert not any(k.startswith(("objectives.feature", "objectives.icl")) for k in distiller.state_dict())
    out = distiller(_batch(), _outputs(9, d=D_T))
    assert "feature_loss" not in out and "icl_loss" not in out
    torch.testing.assert_close(out["loss"], out["clip_loss"] + out["fusion_loss"])
