"""Token compression: schedule, patch dropout, patch scaling (training) and token pruning (inference)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded_model

from clipslim.cli import main
from clipslim.config import ConfigError
from clipslim.recipe import recipe_from_dict
from clipslim.tokens import TokenCompression, TokenPhase, TokenSection, token_hook
from clipslim.tokens.calibrate import cache_tokens, fit_extra_tokens, pairwise_rank_loss, topk_agreement
from clipslim.tokens.dropout import ScheduledPatchDropout
from clipslim.tokens.golden import finish, golden_scores, hidden_after
from clipslim.tokens.patch_scale import resample_positions, resize_kernel, resize_matrix
from clipslim.tokens.prune import (
    PruneConfig,
    apply_token_pruning,
    cls_attention,
    keep_top,
    kept_count,
    pruner_of,
    remove_token_pruning,
)
from clipslim.workflows.token_search import search_schedule, steps_for

SCHEDULE = [
    {"until": 0.5, "patch_dropout": 0.75, "patch_scale": 2},
    {"until": 0.8, "patch_dropout": 0.25},
    {"until": 1.0},
]


def _tokens(section: dict) -> TokenSection:
    base = {"student": {"arch": "tiny-student"}, "data": {"train": "x"}, "objectives": {"clip": 1.0}}
    return recipe_from_dict({**base, "tokens": section}).tokens


# ---------------------------------------------------------------- schedule


def test_schedule_values_by_step():
    section = _tokens({"schedule": SCHEDULE})
    got = [(p.patch_dropout, p.patch_scale) for p in (section.at(s, 10) for s in range(10))]
    assert got == [(0.75, 2)] * 5 + [(0.25, 1)] * 3 + [(0.0, 1)] * 2
    assert section.at(10, 10) == TokenPhase(1.0, 0.0, 1)  # past the end: the last phase
    cost = {(0.75, 2): 0.2, (0.25, 1): 0.8, (0.0, 1): 1.0}
    assert section.mean_cost(cost) == pytest.approx(0.5 * 0.2 + 0.3 * 0.8 + 0.2 * 1.0)
    assert steps_for(section, cost, 100) == int(100 / 0.54)
    assert _tokens({"patch_dropout": 0.5}).at(3, 10) == TokenPhase(1.0, 0.5, 1)


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"schedule": [{"until": 0.5}, {"until": 0.4}, {"until": 1.0}]}, "tokens.schedule"),
        ({"schedule": [{"until": 0.5}]}, "tokens.schedule[0].until"),
        ({"schedule": [{"until": 1.0, "patch_dropout": 1.0}]}, "tokens.schedule[0].patch_dropout"),
        ({"schedule": [{"until": 1.0, "patch_scale": 0}]}, "tokens.schedule[0].patch_scale"),
        ({"kernel_resize": "nearest"}, "tokens.kernel_resize"),
    ],
)
def test_bad_schedules_name_the_field(section, field):
    from clipslim.config import build

    with pytest.raises(ConfigError, match="^" + field.replace("[", r"\[").replace("]", r"\]") + ":"):
        build(TokenSection, section, "tokens")
    with pytest.raises(ConfigError, match="recipe.tokens"):  # through a recipe (the Optional hides the detail)
        _tokens(section)


def test_patch_scale_must_tile_the_image():
    model = seeded_model("tiny-student").model  # 32 px, 16 px patches: 3x does not tile
    with pytest.raises(ConfigError, match=r"tokens.schedule\[0\].patch_scale"):
        token_hook(TokenSection(schedule=[TokenPhase(1.0, 0.0, 3)]), model)


# ---------------------------------------------------------------- patch dropout


def test_patch_dropout_keeps_cls_and_an_exact_random_subset():
    torch.manual_seed(0)
    x = torch.randn(3, 1 + 16, 8)
    drop = ScheduledPatchDropout(0.75).train()
    y = drop(x)
    assert y.shape == (3, 1 + 4, 8) and torch.equal(y[:, 0], x[:, 0])
    for b in range(3):  # every kept row is one of this sample's patch rows, none repeated
        match = (y[b, 1:, None] == x[b, None, 1:]).all(-1)
        assert match.sum(1).eq(1).all() and match.any(0).sum() == 4
    assert torch.equal(drop.eval()(x), x)  # eval sees every token


# ---------------------------------------------------------------- patch scaling


def test_pinv_kernel_reproduces_native_tokens_on_upsampled_patches():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    patch = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    up = (resize_matrix(4, 8) @ patch.reshape(6, 16).t()).t().reshape(2, 3, 8, 8)
    assert torch.allclose(up, F.interpolate(patch, size=(8, 8), mode="bilinear", align_corners=False))
    native = F.conv2d(patch, w, stride=4)
    assert torch.allclose(F.conv2d(up, resize_kernel(w, 8), stride=8), native, atol=1e-10)
    # a constant image keeps its token under the area-normalised bilinear resize too
    const = torch.ones(1, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(F.conv2d(const, resize_kernel(w, 8, "bilinear"), stride=8), w.sum((1, 2, 3)).view(1, 5, 1, 1))


def test_patch_scaled_embedding_close_on_smooth_images():
    """A whole smooth image at 2x resolution through the 2x kernel ~ the native kernel on the image (per patch)."""
    torch.manual_seed(0)
    w = torch.randn(16, 3, 8, 8)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    img = torch.stack([torch.sin(2 * yy + c) + torch.cos(3 * xx - c) for c in range(3)]).unsqueeze(0)
    big = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False)
    native, scaled = F.conv2d(img, w, stride=8), F.conv2d(big, resize_kernel(w, 16), stride=16)
    rel = (scaled - native).norm() / native.norm()
    assert rel < 0.02
    naive = F.conv2d(big, F.interpolate(w, size=(16, 16), mode="bilinear", align_corners=False), stride=16)
    assert (naive - native).norm() / native.norm() > 1.0  # plain upsampling without area factor is far off


def test_positions_resampled_by_2x2_means():
    pos = torch.randn(1 + 16, 6)
    out = resample_positions(pos, (4, 4), (2, 2))
    grid = pos[1:].view(4, 4, 6)
    assert torch.equal(out[0], pos[0])
    assert torch.allclose(out[1], grid[:2, :2].mean((0, 1)), atol=1e-6)
    assert torch.allclose(out[4], grid[2:, 2:].mean((0, 1)), atol=1e-6)


def test_compressed_training_view_and_native_eval():
    stock = seeded_model("tiny-teacher").model
    model = seeded_model("tiny-teacher").model
    tc = TokenCompression(model.visual)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    tc.set(0.5, 2)
    seen = []
    hook = model.visual.transformer.resblocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    model.encode_image(x).sum().backward()
    hook.remove()
    assert seen == [1 + 1]  # 2x patches of a 2x2 grid: 1 patch (+ CLS); half of 1 keeps max(1, .) = 1
    assert model.visual.conv1.weight.grad.abs().sum() > 0 and model.visual.positional_embedding.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), stock.encode_image(x))  # eval: the native model, bit for bit
    assert set(model.state_dict()) == set(stock.state_dict())


def test_training_with_a_token_schedule(tiny_recipe, tmp_path):
    from clipslim.train import Trainer

    recipe = tiny_recipe(steps=4, save_every=4)
    recipe.tokens = _tokens({"schedule": [{"until": 0.5, "patch_dropout": 0.5, "patch_scale": 2}, {"until": 1.0}]})
    trainer = Trainer(recipe, tmp_path / "run", progress=False)
    hook = trainer.built.hooks[-1]
    settings = []
    train_step = trainer.train_step
    trainer.train_step = lambda *args: (settings.append(hook.compression.setting), train_step(*args))[1]
    results = trainer.run()
    assert settings == [(0.5, 2), (0.5, 2), (0.0, 1), (0.0, 1)]
    assert results["steps"] == 4 and results["eval"]["zeroshot_seen"]["n"] > 0
    assert (tmp_path / "run" / "student" / "open_clip_model.safetensors").is_file()


def test_schedule_search_picks_and_writes_a_recipe(tiny_recipe, tmp_path):
    recipe = tiny_recipe(steps=4)
    schedules = {"none": TokenSection(), "drop50": TokenSection(schedule=[TokenPhase(1.0, 0.5)])}
    result = search_schedule(
        recipe, tmp_path / "s", budget=1.0, trial_fraction=0.5, schedules=schedules, progress=False
    )
    assert result["best"] in schedules and {t["name"] for t in result["trials"]} == set(schedules)
    assert result["costs"]["0.0@1x"] == 1.0
    none = next(t for t in result["trials"] if t["name"] == "none")
    assert none["steps"] == 2  # half of a 4-step budget at full cost
    from clipslim.recipe import load_recipe

    chosen = load_recipe(tmp_path / "s" / "recipe.yaml")
    assert chosen.tokens == schedules[result["best"]] and chosen.train.steps == result["best_steps"]


# ---------------------------------------------------------------- inference pruning


def _entering(model, block):
    seen = []
    h = model.visual.transformer.resblocks[block].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    return seen, h


def test_kept_count_is_exact():
    assert [kept_count(196, r) for r in (1.0, 0.8, 0.6, 0.4, 0.001)] == [196, 157, 118, 78, 1]


def test_pruning_keeps_cls_and_exact_count():
    model = seeded_model("tiny-teacher").model  # 2x2 grid, 4 blocks
    x = torch.randn(3, 3, 32, 32)
    cfg = PruneConfig(after_block=1, keep_ratio=0.5, ranking="attention", extra_tokens=2)
    apply_token_pruning(model, cfg)
    seen, h = _entering(model, 2)
    with torch.no_grad():
        model.encode_image(x)
        _, x_out = hidden_after(model.visual, x, 1)  # same (no-grad) attention path as the hooked run
    h.remove()
    assert seen[0].shape == (3, 1 + 2 + 2, 64)
    assert torch.equal(seen[0][:, 0], x_out[:, 0])  # CLS first, untouched
    patches = seen[0][:, 1:3]
    assert all((patches[b, :, None] == x_out[b, None, 1:]).all(-1).any(1).all() for b in range(3))


def test_keep_ratio_one_is_bit_exact():
    stock = seeded_model("tiny-teacher").model
    model = seeded_model("tiny-teacher").model
    apply_token_pruning(model, PruneConfig(after_block=0, keep_ratio=1.0, ranking="attention"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), stock.encode_image(x))


def test_hook_matches_manual_pipeline_and_removes_cleanly():
    model = seeded_model("tiny-teacher").model
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = model.encode_image(x)
        pruner = apply_token_pruning(model, PruneConfig(after_block=1, keep_ratio=0.5, ranking="predictor"))
        x_in, x_out = hidden_after(model.visual, x, 1)
        manual = finish(model.visual, keep_top(x_out, pruner.predictor(x_out), 2), 2)
        assert torch.allclose(model.encode_image(x), manual, atol=1e-6)
        remove_token_pruning(model)
        assert pruner_of(model) is None and torch.equal(model.encode_image(x), full)


def test_cls_attention_matches_multihead_attention_weights():
    model = seeded_model("tiny-teacher").model
    block = model.visual.transformer.resblocks[0]
    x = torch.randn(2, 5, 64)
    h = block.ln_1(x)
    _, weights = block.attn(h, h, h, need_weights=True, average_attn_weights=True)
    assert torch.allclose(cls_attention(block, x), weights[:, 0, 1:], atol=1e-6)


def test_golden_scores_remove_the_least_harmful_token_first():
    model = seeded_model("tiny-teacher").model
    x = torch.randn(3, 3, 32, 32)
    scores = golden_scores(model.visual, x, 0)
    assert torch.equal(scores.sort(1).values, torch.arange(4.0).expand(3, 4))  # a full ranking per image
    with torch.no_grad():
        _, x_out = hidden_after(model.visual, x, 0)
        target = F.normalize(finish(model.visual, x_out, 1), dim=-1)
        sims = []
        for j in range(4):  # brute force: drop each single token
            keep = [0] + [1 + i for i in range(4) if i != j]
            sims.append((F.normalize(finish(model.visual, x_out[:, keep], 1), dim=-1) * target).sum(-1))
    assert torch.equal(scores.argmin(1), torch.stack(sims, 1).argmax(1))


def test_pairwise_rank_loss_and_agreement():
    pred, target = torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[2.0, 0.0, 1.0]])
    # pairs (i > j in target): (0,1), (0,2), (2,1): diffs 2, 1, 1
    want = (F.softplus(torch.tensor(-2.0)) + 2 * F.softplus(torch.tensor(-1.0))) / 3
    assert torch.allclose(pairwise_rank_loss(pred, target), want)
    assert topk_agreement(pred, target, 1) == 1.0 and topk_agreement(-pred, target, 1) == 0.0


def test_extra_tokens_learn_and_rest_stays_frozen():
    model = seeded_model("tiny-teacher").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = PruneConfig(after_block=0, keep_ratio=0.5, ranking="attention", extra_tokens=2)
    pruner = apply_token_pruning(model, cfg)
    remove_token_pruning(model)
    torch.manual_seed(0)
    cache = cache_tokens(model.visual, torch.randn(64, 3, 32, 32), 0)
    losses = fit_extra_tokens(pruner, model.visual, cache, steps=40, lr=3e-2, batch_size=64, progress=False)
    assert sum(losses[-5:]) / 5 < losses[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_prune_tokens_folder_reloads_pruned(tiny_shapes, tmp_path):
    from clipslim.models import load_model

    out = tmp_path / "pruned"
    rc = main(
        ["prune-tokens", "--model", "tiny-teacher", "--data", str(tiny_shapes), "--out", str(out), "--keep", "0.5",
         "--extra-tokens", "1", "--calib-images", "64", "--golden-images", "32", "--predictor-steps", "10",
         "--token-steps", "5", "--quiet"]
    )  # fmt: skip
    assert rc == 0 and (out / "prune_tokens.json").is_file()
    bundle = load_model(str(out))
    pruner = pruner_of(bundle.model)
    assert pruner is not None and pruner.cfg.keep_ratio == 0.5 and pruner.extra.shape == (1, 64)
    import open_clip

    stock = open_clip.create_model(f"local-dir:{out}")  # stock open_clip loads the unpruned weights
    x = torch.randn(2, 3, 32, 32)
    seen, h = _entering(bundle.model, 2)
    with torch.no_grad():
        pruned, full = bundle.model.eval().encode_image(x), stock.eval().encode_image(x)
    h.remove()
    assert seen[0].shape[1] == 1 + 2 + 1 and not torch.equal(pruned, full)


def test_prune_tokens_bad_input_is_one_line(tiny_shapes, tmp_path, capsys):
    rc = main(["prune-tokens", "--model", "tiny-teacher", "--data", str(tiny_shapes), "--out", str(tmp_path / "o"),
               "--keep", "1.5"])  # fmt: skip
    assert rc == 2 and "keep_ratio" in capsys.readouterr().err
