"""Slimmable CLIP (Scala): slicing equality with stock open_clip, width bookkeeping, isolation, the objective."""

import random

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import seeded_model

from clipslim.config import ConfigError
from clipslim.export import export_open_clip
from clipslim.models import count_params
from clipslim.objectives.base import Dims, Outputs
from clipslim.objectives.slimmable import SlimmableConfig, SlimmableObjective, sample_widths, width_distill_loss
from clipslim.slimmable import SlimmableCLIP, layout_of

WIDTHS = [0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def teacher():
    return seeded_model("tiny-teacher")  # 4 heads of 16 in both towers: whole heads at every quarter


def _inputs(bundle):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    texts = bundle.tokenizer(["a red circle", "a blue star on the left", "two shapes"])
    return images, texts


@pytest.mark.parametrize("width", WIDTHS)
def test_sliced_model_in_stock_open_clip_equals_slimmable(teacher, tmp_path, width):
    slim = SlimmableCLIP(teacher.model, WIDTHS, towers=("visual", "text"))
    small, cfg = slim.extract(width, teacher.model_cfg)
    export_open_clip(small, cfg, tmp_path / "m")
    stock = open_clip.create_model(f"local-dir:{tmp_path / 'm'}").eval()  # stock open_clip, no clipslim code
    images, texts = _inputs(teacher)
    with torch.no_grad():
        assert torch.allclose(stock.encode_image(images, normalize=True), slim.encode_image(images, width), atol=1e-6)
        assert torch.allclose(stock.encode_text(texts, normalize=True), slim.encode_text(texts, width), atol=1e-6)
        if width < 1:  # a real sub-network, not the full model again
            full = slim.encode_image(images, 1.0)
            assert (full - slim.encode_image(images, width)).abs().max() > 1e-3


def test_slice_command_reads_layout_from_run_recipe(teacher, tmp_path):
    from clipslim.cli import main

    run = tmp_path / "run"
    export_open_clip(teacher.model, teacher.model_cfg, run / "student")
    (run / "recipe.yaml").write_text(
        "teacher: tiny-teacher\nstudent: {arch: tiny-teacher}\ndata: {train: x}\n"
        "objectives: {slimmable: {widths: [0.25, 0.5, 1.0], isolated: true, text: true}}\n"
    )
    assert main(["slice", "--model", str(run / "student"), "--width", "0.5", "--out", str(tmp_path / "s")]) == 0
    stock = open_clip.create_model(f"local-dir:{tmp_path / 's'}").eval()
    slim = SlimmableCLIP(teacher.model, [0.25, 0.5, 1.0], towers=("visual", "text"))
    assert slim.layout(0.5) == "trailing"  # 0.5 is intermediate in this run's widths
    images, texts = _inputs(teacher)
    with torch.no_grad():
        assert torch.allclose(stock.encode_image(images, normalize=True), slim.encode_image(images, 0.5), atol=1e-6)
        assert torch.allclose(stock.encode_text(texts, normalize=True), slim.encode_text(texts, 0.5), atol=1e-6)


def test_width_bookkeeping(teacher):
    slim = SlimmableCLIP(teacher.model, WIDTHS, towers=("visual",))
    full = count_params(teacher.model).total
    w, layers = 64, 4  # tiny-teacher visual tower
    for r in WIDTHS:
        small, cfg = slim.extract(r, teacher.model_cfg)
        assert slim.param_count(r) == count_params(small).total
        ws = int(w * r)
        assert cfg["vision_cfg"]["width"] == ws and small.visual.transformer.resblocks[0].attn.num_heads == int(4 * r)
        # per block: qkv 3w^2+3w, out w^2+w, fc 4w^2+4w, proj 4w^2+w, two LayerNorms 4w -> 12w^2 + 13w
        shrink = layers * ((12 * w * w + 13 * w) - (12 * ws * ws + 13 * ws))
        # outside the blocks: conv1 (3*16*16 per channel), class emb, 5 patch positions, ln_pre/ln_post, proj rows
        shrink += (w - ws) * (3 * 16 * 16 + 1 + 5 + 4 + 32)
        assert slim.param_count(r) == full - shrink
    assert [layout_of(r, WIDTHS, True) for r in WIDTHS] == ["leading", "trailing", "trailing", "leading"]
    assert {layout_of(r, WIDTHS, False) for r in WIDTHS} == {"leading"}


def test_isolated_activation_keeps_intermediate_gradients_off_the_smallest(teacher):
    model = seeded_model("tiny-teacher").model.train()
    slim = SlimmableCLIP(model, WIDTHS, towers=("visual",))
    images, _ = _inputs(teacher)
    for r in (0.5, 0.75):
        model.zero_grad()
        slim.encode_image(images, r).sum().backward()
        fc = model.visual.transformer.resblocks[1].mlp.c_fc.weight.grad  # [256, 64]
        small = slim.selections(0.25)["visual"]
        assert fc[small.mlp[0]].abs().max() == 0 and fc[:, small.width].abs().max() == 0
        assert fc.abs().sum() > 0
    model.zero_grad()
    slim.encode_image(images, 0.25).sum().backward()
    fc = model.visual.transformer.resblocks[1].mlp.c_fc.weight.grad
    assert fc[:64, :16].abs().sum() > 0 and fc[64:].abs().max() == 0  # leading quarter only


def test_bad_widths_name_the_field():
    model = seeded_model("tiny-student").model  # 2 visual heads: 0.25 would be half a head
    obj = SlimmableObjective(SlimmableConfig(widths=[0.25, 1.0]), Dims(32), None)
    with pytest.raises(ConfigError, match="objectives.slimmable.*visual.heads"):
        obj.attach(model)
    with pytest.raises(ConfigError, match="transfer"):
        SlimmableConfig(transfer="sideways").validate("objectives.slimmable")


def test_width_distill_loss_matches_formula():
    torch.manual_seed(0)
    img_s, img_t, txt = (F.normalize(torch.randn(5, 8), dim=-1) for _ in range(3))
    scale = torch.tensor(20.0)
    got = width_distill_loss(Outputs(img_s, txt, scale), Outputs(img_t, txt, scale))
    total = 0.0
    for s, t in ((img_s @ txt.T, img_t @ txt.T), (txt @ img_s.T, txt @ img_t.T)):
        for i in range(5):
            p = [torch.exp(scale * t[i, j]) for j in range(5)]
            z = sum(p)
            log_q = [scale * s[i, j] - torch.logsumexp(scale * s[i], 0) for j in range(5)]
            total += -sum(p[j] / z * log_q[j] for j in range(5)) / 5
    assert torch.allclose(got, total / 2, atol=1e-5)


def test_stable_sampling_and_progressive_targets():
    rng = random.Random(0)
    widths = [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    for _ in range(50):
        active = sample_widths(widths, 2, rng)
        assert active[0] == 1.0 and active[-1] == 0.25 and len(active) == 4
        assert active[1] in (0.625, 0.75, 0.875) and active[2] in (0.375, 0.5)  # Scala: [mid, 1) and (0.25, mid)
    assert sample_widths(WIDTHS, 2, rng) == [1.0, 0.75, 0.5, 0.25]
    assert sample_widths(WIDTHS, 0, rng) == [1.0, 0.25]


def test_objective_loss_is_sum_over_active_widths(teacher):
    model = seeded_model("tiny-teacher").model
    obj = SlimmableObjective(SlimmableConfig(widths=WIDTHS, n_random=2, ce_weight=0.5), Dims(32), None)
    obj.attach(model)
    images, texts = _inputs(teacher)
    image, text = F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(texts), dim=-1)
    student = Outputs(image, text, model.logit_scale.exp())
    out = obj(student, None, {"image": images, "text": texts})
    assert obj.last_widths == [1.0, 0.75, 0.5, 0.25]
    # by hand: each width distils from the next larger one (progressive), plus half its own CLIP loss
    from clipslim.objectives.clip import info_nce

    slim, scale = obj.slim, student.logit_scale.detach()
    target, kd, ce = Outputs(image.detach(), text.detach(), scale), 0.0, 0.0
    for r in (0.75, 0.5, 0.25):
        sub = Outputs(slim.encode_image(images, r), text.detach(), scale)
        kd = kd + width_distill_loss(sub, target)
        ce = ce + info_nce(sub.image, sub.text, scale)
        target = Outputs(sub.image.detach(), text.detach(), scale)
    assert torch.allclose(out["slimmable_loss"], kd + 0.5 * ce, atol=1e-5)
    out["slimmable_loss"].backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0


def test_recipe_trains_a_slimmable_student(tiny_recipe, tmp_path):
    from clipslim.recipe import recipe_from_dict
    from clipslim.train.loop import train

    base = tiny_recipe(steps=2, save_every=2)
    data = {
        "name": "slim",
        "teacher": "tiny-teacher",
        "student": {"arch": "tiny-student", "init": "inherit"},
        "data": {"train": base.data.train, "eval": base.data.eval, "num_workers": 0},
        "objectives": {"affinity": 1.0, "slimmable": {"widths": [0.5, 1.0], "n_random": 1}},
        "train": {"steps": 2, "batch_size": 16, "warmup": 1, "log_every": 1, "save_every": 2},
    }
    results = train(recipe_from_dict(data), tmp_path / "run", progress=False)
    assert results["steps"] == 2
    log = (tmp_path / "run" / "metrics.csv").read_text()
    assert "slimmable_loss" in log.splitlines()[0]


def test_width_draws_resume_from_the_checkpointed_counter(teacher):
    images, texts = _inputs(teacher)
    model = seeded_model("tiny-teacher").model
    image, text = F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(texts), dim=-1)
    student, batch = Outputs(image, text, model.logit_scale.exp()), {"image": images, "text": texts}

    def make():
        obj = SlimmableObjective(SlimmableConfig(widths=WIDTHS, n_random=1, ce_weight=0.0), Dims(32), None)
        obj.attach(model)
        return obj

    first = make()
    draws, states = [], []
    for _ in range(6):
        states.append({k: v.clone() for k, v in first.state_dict().items()})
        with torch.no_grad():
            first(student, None, batch)
        draws.append(first.last_widths)
    assert {w for d in draws for w in d[1:-1]} == {0.5, 0.75}  # both intermediates get drawn
    resumed = make()
    resumed.load_state_dict(states[3])  # as a checkpoint taken after 3 steps restores it
    with torch.no_grad():
        resumed(student, None, batch)
    assert resumed.last_widths == draws[3] != draws[0]  # a fresh counter would have drawn draws[0]
