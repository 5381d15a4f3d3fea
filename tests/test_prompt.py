"""CoOp prompt tuning: prompt shapes, context injection, frozen towers, exact label noise, pseudo-labels, save/load."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded_model

from clipslim.prompt import (
    PromptLearner,
    TuneConfig,
    load_prompts,
    pseudo_labels,
    save_prompts,
    symmetric_noise,
    tune_prompts,
)

CLASSES = ["red circle", "blue star", "green hexagon"]


@pytest.fixture(scope="module")
def bundle():
    return seeded_model("tiny-teacher")


def test_prompt_shapes_and_injection_matches_plain_text(bundle):
    learner = PromptLearner(bundle.model, bundle.tokenizer, CLASSES, n_ctx=4, init="a photo of a")
    assert learner.ctx.shape == (4, 64)  # text width of tiny-teacher
    assert learner.tokens.shape == (3, 16)
    assert set(learner.state_dict()) == {"ctx"}  # the model is a reference, not part of the learner's state
    with torch.no_grad():
        feats = learner.text_features()
        # context initialised from "a photo of a": the prompts are exactly the plain text "a photo of a {c}."
        plain = F.normalize(bundle.model.encode_text(bundle.tokenizer([f"a photo of a {c}." for c in CLASSES])), dim=-1)
        assert feats.shape == (3, 32)
        assert torch.allclose(feats, plain, atol=1e-6)
        logits = learner(torch.randn(5, 32))
    assert logits.shape == (5, 3)
    with torch.no_grad():
        learner.ctx.add_(torch.randn_like(learner.ctx))  # (a constant shift would vanish in the LayerNorms)
        assert (learner.text_features() - plain).abs().max() > 1e-3  # the context really drives the prompts


def test_towers_stay_frozen_and_only_context_learns(bundle):
    model = bundle.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = PromptLearner(model, bundle.tokenizer, CLASSES, n_ctx=2, init=None)
    ctx0 = learner.ctx.detach().clone()
    torch.manual_seed(0)
    feats, labels = torch.randn(12, 32), torch.arange(12) % 3
    losses = tune_prompts(learner, feats, labels, TuneConfig(n_ctx=2, init=None, steps=5, lr=1e-2, batch_size=6))
    assert len(losses) == 5
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (learner.ctx - ctx0).abs().max() > 0


def test_symmetric_noise_rate_is_exact():
    labels = torch.arange(200) % 10
    for rate in (0.0, 0.25, 0.5, 0.333):
        noisy, flipped = symmetric_noise(labels, rate, seed=3)
        n = int(round(rate * 200))
        assert int((noisy != labels).sum()) == n == int(flipped.sum())
        assert torch.equal(noisy != labels, flipped)  # every flip goes to a different class
        assert set(noisy.tolist()) <= set(range(10))
    a, _ = symmetric_noise(labels, 0.5, seed=1)
    b, _ = symmetric_noise(labels, 0.5, seed=1)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="noise rate"):
        symmetric_noise(labels, 1.5)


def test_pseudo_labels_are_confident_and_class_balanced():
    # rows 0-3 predict class 0 with falling confidence, rows 4-5 class 1, row 6 class 2 (low confidence)
    logits = torch.tensor(
        [[9.0, 0, 0], [8, 0, 0], [7, 0, 0], [6, 0, 0], [0, 5, 0], [0, 9, 0], [0.1, 0, 0.2]], dtype=torch.float
    )
    rows, labels = pseudo_labels(logits, k=2)
    assert rows.tolist() == [0, 1, 4, 5, 6] and labels.tolist() == [0, 0, 1, 1, 2]
    rows, labels = pseudo_labels(logits, k=2, min_confidence=0.5)
    assert rows.tolist() == [0, 1, 4, 5]  # row 6's top probability is ~0.36


def test_saved_prompts_reload_to_identical_logits(bundle, tmp_path):
    learner = PromptLearner(bundle.model, bundle.tokenizer, CLASSES, n_ctx=3, init=None)
    with torch.no_grad():
        learner.ctx.normal_()
    path = save_prompts(learner, tmp_path / "p.safetensors", extra={"note": "x"})
    again = load_prompts(path, bundle.model, bundle.tokenizer)
    assert again.classnames == CLASSES
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(learner(x), again(x))
    with pytest.raises(ValueError, match="context length"):
        PromptLearner(bundle.model, bundle.tokenizer, ["a b c d e f g h i j k l m"], n_ctx=4)


def test_prompt_tune_command(tiny_shapes, tmp_path):
    from clipslim.cli import main

    out, res = tmp_path / "p.safetensors", tmp_path / "r.json"
    args = ["prompt-tune", "--model", "tiny-teacher", "--data", str(tiny_shapes), "--out", str(out)]
    args += ["--results", str(res), "--shots", "1", "--noise", "0.5", "--steps", "3", "--linear-probe", "--quiet"]
    assert main(args) == 0
    result = json.loads(res.read_text())
    assert result["setup"]["flipped"] == round(0.5 * result["setup"]["n_train"])
    assert {"zeroshot", "prompt", "linear_probe"} <= set(result)
    assert 0 <= result["prompt"]["acc1"] <= 1 and result["prompt"]["n"] > 0
    bundle = seeded_model("tiny-teacher")
    assert len(load_prompts(out, bundle.model, bundle.tokenizer).classnames) == 64
    assert main(["prompt-tune", "--model", "tiny-teacher", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2


def _write_images(root, names, colours):
    from PIL import Image

    rows = []
    for name, colour in zip(names, colours, strict=True):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new("RGB", (32, 32), tuple(min(255, c + 10 * i) for c in colour)).save(root / name / f"{i}.png")
            rows.append(f"{name}/{i}.png,{name.replace('_', ' ')}")
    return rows


def test_imagefolder_and_csv_data(tmp_path):
    from clipslim.cli import main
    from clipslim.prompt import labelled_features

    names, colours = ["red_square", "blue_circle"], [(200, 20, 20), (20, 20, 200)]
    for split in ("train", "test"):
        _write_images(tmp_path / "folder" / split, names, colours)
    rows = _write_images(tmp_path / "csv", names, colours)
    (tmp_path / "csv" / "train.csv").write_text("filepath,label\n" + "\n".join(rows) + "\n")
    bundle = seeded_model("tiny-teacher")
    feats = labelled_features(bundle, tmp_path / "csv" / "train.csv", "train")
    assert feats.classnames == ["blue circle", "red square"] and feats.features.shape == (6, 32)
    assert feats.labels.tolist() == [1, 1, 1, 0, 0, 0]
    out = tmp_path / "p.safetensors"
    args = ["prompt-tune", "--model", "tiny-teacher", "--data", str(tmp_path / "folder"), "--out", str(out)]
    assert main([*args, "--shots", "2", "--steps", "2", "--quiet"]) == 0
    csv_args = ["--data", str(tmp_path / "csv" / "train.csv"), "--test", str(tmp_path / "csv" / "train.csv")]
    assert main([*args[:3], *csv_args, "--out", str(out), "--shots", "2", "--steps", "2", "--quiet"]) == 0
    assert load_prompts(out, bundle.model, bundle.tokenizer).classnames == ["blue circle", "red square"]
