"""Direct block pruning on tiny configs: identity blocks go first, the pruned export equals the skipped model."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from conftest import seeded_model

from clipslim.cli import main
from clipslim.export import export_open_clip
from clipslim.inherit import InheritError
from clipslim.inherit.blocks import ValidationSet, greedy_prune, pruned_model, skipping
from clipslim.models import load_model

DEPTH = 8  # tiny-teacher: 4 vision + 4 text blocks


def _inputs():
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, 49000, (3, 16), generator=g)
    text[:, 12] = 49407
    return torch.randn(3, 3, 32, 32, generator=g), text


@torch.no_grad()
def _embed(model):
    images, text = _inputs()
    return model.encode_image(images), model.encode_text(text)


@torch.no_grad()
def _make_identity(model, kind: str, index: int) -> None:
    blocks = model.visual.transformer.resblocks if kind == "visual" else model.transformer.resblocks
    for linear in (blocks[index].attn.out_proj, blocks[index].mlp.c_proj):
        linear.weight.zero_()
        linear.bias.zero_()


@pytest.fixture(scope="module")
def bundle():
    return seeded_model("tiny-teacher")


@pytest.fixture(scope="module")
def full_val(bundle, tiny_shapes):
    return ValidationSet.from_data(bundle, tiny_shapes, max_samples=96)


@pytest.fixture(scope="module")
def val(full_val):
    """One prompt per class (prompts are class-major), to keep the greedy searches quick."""
    prompts = full_val.prompts.view(64, -1, full_val.prompts.shape[-1])[:, 0]
    return ValidationSet(full_val.images, full_val.labels, prompts, 64)


def test_validation_set(full_val, tiny_shapes):
    templates = (tiny_shapes / "templates.txt").read_text().strip().splitlines()
    assert full_val.images.shape[0] == full_val.labels.shape[0] <= 96
    assert full_val.n_classes == 64 and full_val.prompts.shape[0] == 64 * len(templates)
    assert 0 <= int(full_val.labels.min()) and int(full_val.labels.max()) < 64


def test_skipping_equals_the_pruned_export_in_stock_open_clip(bundle, tmp_path):
    model = bundle.model
    before = _embed(model)
    with skipping(model, [("visual", 1), ("text", 0), ("text", 3)]):
        skipped = _embed(model)
    for got, want in zip(_embed(model), before, strict=True):  # restored
        assert torch.equal(got, want)
    small, cfg = pruned_model(model, bundle.model_cfg, {"visual": [0, 2, 3], "text": [1, 2]})
    assert cfg["vision_cfg"]["layers"] == 3 and cfg["text_cfg"]["layers"] == 2
    export_open_clip(small, cfg, tmp_path / "pruned")
    stock, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'pruned'}")
    assert len(stock.visual.transformer.resblocks) == 3
    for got, want in zip(_embed(stock.eval()), skipped, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_identity_blocks_are_removed_first(val):
    torch.manual_seed(0)
    model = load_model("tiny-teacher").model.eval()
    _make_identity(model, "text", 2)
    _make_identity(model, "visual", 1)
    # Labels = the full model's own predictions: its accuracy is 100%, so no real block can win by a chance gain
    # on a random model (it did on some data draws); only the harmless ones keep 100% at fidelity 1.
    with torch.no_grad():
        images = torch.nn.functional.normalize(model.encode_image(val.images), dim=-1)
        classes = torch.nn.functional.normalize(model.encode_text(val.prompts), dim=-1)
    val = ValidationSet(val.images, (images @ classes.t()).argmax(1), val.prompts, val.n_classes)
    result = greedy_prune(model, val, target_depth=DEPTH - 2, progress=False)
    assert result["removed"] == ["visual.1", "text.2"]  # both exactly harmless; ties keep visual-then-text order
    single = {r["block"]: r for r in result["single_block"]}
    for name in ("visual.1", "text.2"):
        assert single[name]["drop"] == 0 and single[name]["fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert min(r["fidelity"] for n, r in single.items() if n not in ("visual.1", "text.2")) < 0.999
    assert result["kept"] == {"visual": [0, 2, 3], "text": [0, 1, 3]}
    assert [h["depth"] for h in result["history"]] == [DEPTH, DEPTH - 1, DEPTH - 2]


def test_each_tower_keeps_a_block_and_targets_are_checked(bundle, val):
    result = greedy_prune(bundle.model, val, target_depth=2, progress=False)
    assert {k: len(v) for k, v in result["kept"].items()} == {"visual": 1, "text": 1}
    with pytest.raises(InheritError, match="target_depth"):
        greedy_prune(bundle.model, val, target_depth=1, progress=False)
    with pytest.raises(InheritError, match="exactly one"):
        greedy_prune(bundle.model, val, progress=False)


def test_latency_target_stops_when_reached(bundle, val):
    """A stand-in latency (1 ms per block left) makes the stopping rule checkable without timing anything."""
    result = greedy_prune(
        bundle.model, val, target_latency_ms=5.5, latency_ms=lambda removed: float(DEPTH - len(removed)),
        progress=False,
    )  # fmt: skip
    assert len(result["removed"]) == 3  # 8 -> 5 blocks: 5 ms <= 5.5 ms


def test_cli_prune_blocks(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = ["prune-blocks", "--model", "tiny-teacher", "--data", str(tiny_shapes), "--target-depth", "6"]
    recover = ["--recover-steps", "1", "--recover-batch-size", "8"]
    assert main([*args, "--out", str(out), "--val-samples", "32", *recover]) == 0
    result = json.loads((out / "blocks.json").read_text())
    assert len(result["removed"]) == 2 and (out / "blocks.png").stat().st_size > 0
    assert "| blocks removed |" in (out / "blocks.md").read_text()
    assert set(result["test"]) == {"full", "pruned", "recovered"}
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'model'}")
    assert len(model.visual.transformer.resblocks) + len(model.transformer.resblocks) == 6
    assert "removed" in capsys.readouterr().out
