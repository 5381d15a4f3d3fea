"""Auto inheritance: L0 masks gate the stock open_clip forward, fusing is exact, parameter targets are met."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CustomTextCLIP

from clipslim.export import export_open_clip
from clipslim.inherit import InheritError, L0Sparsity, build_clip, fuse_l0
from clipslim.inherit.l0 import _tower_count, hard_concrete_keep_prob
from clipslim.inherit.manual import tower_pairs
from clipslim.models import count_params
from clipslim.objectives import Dims
from clipslim.recipe import L0Section


def _cfg(vision: dict | None = None, text: dict | None = None, **top) -> dict:
    cfg = copy.deepcopy(open_clip.get_model_config("tiny-teacher"))
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    cfg.update(top)
    return cfg


def _model(cfg: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_clip(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial LayerNorms / biases, so a wrong gate or slice shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _masks(model: torch.nn.Module, seed: int = 2, scale: float = 3.0, **cfg) -> L0Sparsity:
    obj = L0Sparsity(L0Section(**cfg), Dims(32), None)
    obj.attach(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in obj.logits.values():
            p.copy_(scale * torch.randn(p.shape, generator=g) / obj.cfg.mask_lr_scale)
    return obj


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g)
    text = torch.randint(1, 49000, (3, 16), generator=g)
    text[:, 12] = 49407
    return images, text


@torch.no_grad()
def _embed(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    images, text = _inputs()
    return model.encode_image(images), model.encode_text(text)


VARIANTS = {
    "clip": (_cfg(), False),
    "custom-text-clip": (_cfg(), True),
    "layer-scale": (_cfg(vision={"ls_init_value": 0.5}, text={"ls_init_value": 0.5}), False),
    "linear-text-proj": (_cfg(text={"proj_bias": True}), False),
}


def _build(variant: str) -> tuple[torch.nn.Module, dict]:
    cfg, custom = VARIANTS[variant]
    cfg = {**cfg, "custom_text": True} if custom else cfg
    model = _model(cfg)
    assert isinstance(model, CustomTextCLIP if custom else CLIP)
    return model, cfg


# --- exactness of fusing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_model_equals_masked_model(variant, tmp_path):
    model, cfg = _build(variant)
    masks = _masks(model, target_sparsity=0.5)
    masked = _embed(model)  # eval mode: the deterministic masks
    fused, fused_cfg, report = fuse_l0(model, masks, cfg)
    assert report["visual"]["width"] < 64 or report["text"]["width"] < 64 or report["visual"]["mlp_width"] < 256
    for got, want in zip(_embed(fused), masked, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # ... and stock open_clip loads the exported folder to the same function
    export_open_clip(fused, fused_cfg, tmp_path / "fused")
    stock, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'fused'}")
    for got, want in zip(_embed(stock.eval()), masked, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_masks_change_the_function_and_detach_restores_it():
    model, _ = _build("clip")
    plain = _embed(model)
    masks = _masks(model, target_sparsity=0.5)
    masked = _embed(model)
    assert not torch.allclose(masked[0], plain[0], atol=1e-3)
    masks.detach()
    for got, want in zip(_embed(model), plain, strict=True):
        assert torch.equal(got, want)
    assert "parametrizations" not in "".join(model.state_dict())


@pytest.mark.parametrize("target", [0.25, 0.5, 0.75])
def test_fused_parameter_count_within_2_percent_of_target(target):
    model, cfg = _build("clip")
    masks = _masks(model, target_sparsity=target)
    fused, _, report = fuse_l0(model, masks, cfg)
    want = (1 - target) * count_params(model).non_embedding
    got = count_params(fused).non_embedding
    assert got == report["params_non_embedding"]
    assert abs(got - want) / want < 0.02, (got, want)
    assert got <= want  # the realisation fills the budget from below


def test_fusion_keeps_the_highest_logit_heads_and_channels():
    model, cfg = _build("clip")
    masks = _masks(model, target_sparsity=0.5, scale=0.1)
    with torch.no_grad():  # visual head 1 is the least wanted everywhere; channels 0..15 the most wanted width
        masks.logits["visual_heads"].view(4, 4)[:, 1] = -4 / masks.cfg.mask_lr_scale
        masks.logits["visual_width"][:16] = 4 / masks.cfg.mask_lr_scale
    structure = masks.realize()
    assert all(1 not in heads for heads in structure["visual"].heads)
    assert structure["visual"].width[:16] == list(range(16))


# --- counting and the penalty -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_formula_matches_count_params(variant):
    model, cfg = _build(variant)
    masks = _masks(model)  # attach checks the formula at full size
    assert masks.full_params == count_params(model).non_embedding
    small_cfg = _cfg(vision={"width": 48, "mlp_ratio": 100 / 48}, text={"width": 32, "heads": 2, "mlp_ratio": 2.0})
    small = build_clip(small_cfg)
    counts = {t.kind: _tower_count(model, t) for t, _ in tower_pairs(model, model)}
    if variant in ("clip", "layer-scale"):  # same tower types as small_cfg except layer scale
        per_block_ls = 2 * 48 * 4 + 2 * 32 * 4 if variant == "layer-scale" else 0
        formula = counts["visual"].params(48, [3] * 4, [100] * 4) + counts["text"].params(32, [2] * 4, [64] * 4) + 1
        assert formula == count_params(small).non_embedding + per_block_ls


def test_expected_sparsity_by_hand():
    model, _ = _build("clip")
    masks = _masks(model)
    with torch.no_grad():
        for p in masks.logits.values():
            p.fill_(50.0)
    assert masks.expected_sparsity().item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        masks.logits["visual_mlp"].fill_(-50.0)  # every visual FFN channel off
    visual_ffn = 4 * (2 * 64 + 1) * 256  # 4 blocks x (c_fc row + bias + c_proj column) x 256 channels
    assert masks.expected_sparsity().item() == pytest.approx(visual_ffn / count_params(model).non_embedding, rel=1e-6)


def test_keep_probability_matches_sampling():
    """P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta)): 0.8318 at log_alpha 0; checked by sampling."""
    from clipslim.inherit.l0 import _sample

    assert hard_concrete_keep_prob(torch.tensor(0.0)).item() == pytest.approx(0.83182, abs=1e-5)
    torch.manual_seed(0)
    for log_alpha in (-2.0, 0.0, 1.5):
        draws = _sample(torch.full((200_000,), log_alpha))
        assert draws.min() >= 0 and draws.max() <= 1
        want = hard_concrete_keep_prob(torch.tensor(log_alpha)).item()
        assert (draws > 0).double().mean().item() == pytest.approx(want, abs=0.005)


def test_target_ramps_linearly():
    model, _ = _build("clip")
    masks = _masks(model, start_sparsity=0.1, target_sparsity=0.5, ramp_steps=8)
    for step, want in ((0, 0.1), (2, 0.2), (4, 0.3), (8, 0.5), (20, 0.5)):
        masks.step.fill_(step)
        assert masks.target() == pytest.approx(want)


def test_training_samples_gate_the_forward_and_lambdas_ascend():
    model, _ = _build("clip")
    masks = _masks(model, scale=0.5, target_sparsity=0.5, lambda_init=1.0).train()
    model.train()
    opt = torch.optim.SGD([masks.lambdas, *masks.logits.values()], lr=0.1)
    image, text = model.encode_image(_inputs()[0]), model.encode_text(_inputs()[1])
    assert masks.tower_masks("visual", True) is masks.tower_masks("visual", True)  # one sample per step
    out = masks(None, None, {})
    gap = out["l0_target"] - out["l0_expected_sparsity"]
    (image.pow(2).mean() + text.pow(2).mean() + out["l0_sparsity_loss"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in masks.logits.values())
    assert masks.lambdas.grad[0].item() == pytest.approx(-gap.item(), rel=1e-5)  # d/d lambda1 = gap, reversed
    before = masks.lambdas.detach().clone()
    opt.step()
    assert (masks.lambdas[0] > before[0]) == (gap > 0)  # gradient *ascent* on the penalty
    assert masks.lambdas[1] > before[1]  # (t - s)^2 >= 0 always raises lambda2
    assert masks.step.item() == 1 and masks._sampled is None  # next step draws new gates


def test_unsupported_models_are_rejected():
    model = _model(_cfg(vision={"qk_norm": True}))  # custom residual blocks
    with pytest.raises(InheritError, match="ResidualAttentionBlock"):
        _masks(model)
