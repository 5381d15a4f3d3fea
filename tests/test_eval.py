"""Evaluation metrics against hand-computed cases and CLIP_benchmark's reference formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from clipslim.eval import (
    Features,
    build_classifier,
    encode_batches,
    evaluate_features,
    mean_per_class_recall,
    retrieval_metrics,
    write_results,
    zeroshot_metrics,
)
from clipslim.eval.run import split_model_spec
from clipslim.eval.zeroshot import fill_template
from clipslim.models import load_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("tiny-student")


# --- zero-shot classification ------------------------------------------------------------------------------------


def _rank_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """6 classes, W = I, so each row's logits rank classes by the raw vector below."""
    rows = [
        [6, 5, 4, 3, 2, 1],  # label 0: top1 hit
        [6, 5, 4, 3, 2, 1],  # label 5: ranked last -> miss at 1 and 5
        [1, 6, 2, 3, 4, 5],  # label 2: top1 is 1 (miss), top5 = {1,5,4,3,2} (hit)
        [1, 2, 3, 4, 5, 6],  # label 5: top1 hit
        [1, 2, 3, 4, 5, 6],  # label 0: ranked last -> miss
    ]
    feats = F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)
    return feats, torch.tensor([0, 5, 2, 5, 0]), torch.eye(6)


def test_zeroshot_metrics_hand_computed():
    feats, labels, w = _rank_case()
    m = zeroshot_metrics(feats, labels, w)
    assert m["n"] == 5
    assert m["acc1"] == pytest.approx(2 / 5)
    assert m["acc5"] == pytest.approx(3 / 5)
    # per-class recall: class 0 -> 1/2, class 5 -> 1/2, class 2 -> 0; classes 1, 3, 4 absent from labels
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_zeroshot_metrics_mask_selects_rows():
    feats, labels, w = _rank_case()
    m = zeroshot_metrics(feats, labels, w, mask=torch.tensor([True, True, True, True, False]))
    assert m["n"] == 4
    assert m["acc1"] == pytest.approx(2 / 4)
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    empty = zeroshot_metrics(feats, labels, w, mask=torch.zeros(5, dtype=torch.bool))
    assert empty["n"] == 0 and math.isnan(empty["acc1"])


def test_acc5_is_nan_below_five_classes():
    feats = F.normalize(torch.randn(8, 4), dim=-1)
    m = zeroshot_metrics(feats, torch.randint(0, 4, (8,)), torch.eye(4))
    assert math.isnan(m["acc5"]) and 0.0 <= m["acc1"] <= 1.0


def test_mean_per_class_recall_is_balanced_accuracy():
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 3])  # class 3 only predicted: not counted
    assert mean_per_class_recall(pred, labels) == pytest.approx((3 / 4 + 1 / 1 + 0 / 2) / 3)


def test_zeroshot_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels"):
        zeroshot_metrics(torch.randn(2, 3), torch.tensor([0, -1]), torch.eye(3))


def test_fill_template_accepts_both_styles():
    assert fill_template("a {c}.", "cat") == "a cat."
    assert fill_template("a {}.", "cat") == "a cat."
    assert fill_template(lambda c: f"{c}!", "cat") == "cat!"


def test_build_classifier_matches_manual(tiny):
    classnames, templates = ["red circle", "blue square"], ["a {c}.", "a photo of a {c}."]
    w = build_classifier(tiny.model, tiny.tokenizer, classnames, templates)
    assert w.shape == (32, 2)
    with torch.no_grad():
        for i, name in enumerate(classnames):
            emb = tiny.model.encode_text(tiny.tokenizer([t.format(c=name) for t in templates]))
            expected = F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0)
            torch.testing.assert_close(w[:, i], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(2))


# --- retrieval ---------------------------------------------------------------------------------------------------


def _retrieval_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.eye(3)
    texts = F.normalize(torch.tensor([[1, 0.5, 0], [0, 1, 0.5], [0.2, 0.1, 1], [0, 0, 1.0]]), dim=-1)
    return images, texts, torch.tensor([0, 0, 1, 2])  # image 0 has two captions


def test_retrieval_hand_computed():
    images, texts, t2i = _retrieval_case()
    m = retrieval_metrics(images, texts, t2i, ks=(1, 2, 3))
    # text->image ranks of the own image: t0 1st, t1 3rd, t2 3rd, t3 1st
    assert [m[f"image_retrieval_recall@{k}"] for k in (1, 2, 3)] == pytest.approx([0.5, 0.5, 1.0])
    # image->text: img0 ranks t0 first (its caption); img1 ranks t1, t0, t2 (own caption 3rd); img2 ranks t3 first
    assert [m[f"text_retrieval_recall@{k}"] for k in (1, 2, 3)] == pytest.approx([2 / 3, 2 / 3, 1.0])


def test_retrieval_k_beyond_pool_counts_whole_pool():
    images, texts, t2i = _retrieval_case()
    m = retrieval_metrics(images, texts, t2i, ks=(10,))
    assert m["image_retrieval_recall@10"] == 1.0 and m["text_retrieval_recall@10"] == 1.0


def _clip_benchmark_recall(images, texts, t2i, k):
    """CLIP_benchmark's recall_at_k on the full score matrix (metrics/zeroshot_retrieval.py).

    Scores are formed as retrieval_metrics forms them (fp64 rounded to fp32) so exact ties stay exact; the test
    checks the ranking and hit rules, not BLAS rounding.
    """
    scores = (texts.double() @ images.double().t()).float()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), t2i] = True

    def recall(s, pos):
        top = torch.topk(s, k, dim=1)[1]
        onehot = F.one_hot(top, num_classes=s.shape[1])
        return (onehot * pos.view(s.shape[0], 1, s.shape[1])).sum(dim=(1, 2)) / pos.sum(dim=1)

    return (recall(scores, positive) > 0).float().mean().item(), (
        recall(scores.t(), positive.t()) > 0
    ).float().mean().item()


def test_retrieval_matches_clip_benchmark_with_ties():
    torch.manual_seed(1)
    # few distinct vectors -> many exactly tied scores; ties must break as torch.topk breaks them
    basis = F.normalize(torch.randn(4, 8), dim=-1)
    images = basis[torch.randint(0, 4, (20,))]
    t2i = torch.cat([torch.arange(20), torch.randint(0, 20, (15,))])
    texts = basis[torch.randint(0, 4, (35,))]
    ks = (1, 3, 5)
    for chunk in (1, 4, 1024):
        m = retrieval_metrics(images, texts, t2i, ks=ks, chunk=chunk)
        for k in ks:
            img_r, txt_r = _clip_benchmark_recall(images, texts, t2i, k)
            assert m[f"image_retrieval_recall@{k}"] == pytest.approx(img_r)
            assert m[f"text_retrieval_recall@{k}"] == pytest.approx(txt_r)


def test_retrieval_chunked_equals_unchunked():
    torch.manual_seed(2)
    images = F.normalize(torch.randn(50, 16), dim=-1)
    t2i = torch.cat([torch.arange(50), torch.randint(0, 50, (70,))])[torch.randperm(120)]
    texts = F.normalize(images[t2i] + 0.8 * torch.randn(120, 16), dim=-1)
    full = retrieval_metrics(images, texts, t2i, chunk=10_000)
    assert 0.0 < full["image_retrieval_recall@1"] < 1.0
    for chunk in (1, 7, 50, 119):
        assert retrieval_metrics(images, texts, t2i, chunk=chunk) == full


def test_retrieval_validates_mapping():
    with pytest.raises(ValueError, match="one entry per text"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="lie in"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))


# --- encoding and the shapes evaluation -------------------------------------------------------------------------


def test_encode_batches_normalises_and_collects(tiny):
    torch.manual_seed(3)
    texts = ["a red circle", "a blue square", "a green star"]
    batches = [
        {
            "image": torch.randn(len(texts), 3, 32, 32),
            "text": tiny.tokenizer(texts),
            "key": [f"{b}-{i}" for i in range(len(texts))],
            "meta": [{"cls": i} for i in range(len(texts))],
            "skipped": {"decode": b},
        }
        for b in range(2)
    ]
    tiny.model.train()
    feats = encode_batches(tiny.model, batches, progress=False)
    assert tiny.model.training  # mode restored
    assert feats.image.shape == (6, 32) and feats.text.shape == (6, 32)
    torch.testing.assert_close(feats.image.norm(dim=-1), torch.ones(6))
    assert feats.key == ["0-0", "0-1", "0-2", "1-0", "1-1", "1-2"]
    assert [m["cls"] for m in feats.meta] == [0, 1, 2, 0, 1, 2]
    assert feats.skipped == {"decode": 1}
    tiny.model.eval()
    with torch.no_grad():
        expected = F.normalize(tiny.model.encode_image(batches[1]["image"]), dim=-1)
    torch.testing.assert_close(feats.image[3:], expected)


def test_encode_batches_empty():
    feats = encode_batches(torch.nn.Linear(1, 1), [], progress=False)
    assert feats.image.shape[0] == 0 and feats.meta == []


def _meta(cls: int, heldout: bool, n_objects: int = 1, ood: bool = False) -> dict:
    return {"cls": cls, "heldout": heldout, "n_objects": n_objects, "ood": ood}


def test_evaluate_features_splits_heldout_and_seen():
    w = torch.eye(8)
    # (true class, predicted class, meta); image feature = one-hot of the predicted class
    rows = [
        (0, 0, _meta(0, False)),
        (1, 2, _meta(1, False)),
        (2, 2, _meta(2, False)),
        (6, 6, _meta(6, True)),
        (7, 3, _meta(7, True)),
        (3, 3, _meta(3, False, n_objects=2)),  # multi-object: no classification
        (-1, 4, _meta(-1, False, n_objects=0)),  # no class: no classification
        (5, 5, _meta(5, False, ood=True)),  # ood style: its own group, not in all / seen / retrieval
        (6, 1, _meta(6, True, ood=True)),
        (4, 4, _meta(4, False, ood=True)),
    ]
    image = F.one_hot(torch.tensor([p for _, p, _ in rows]), 8).float()
    feats = Features(image, image.clone(), [m for _, _, m in rows], skipped={"bad": 2})
    res = evaluate_features(feats, w)
    assert set(res) == {"zeroshot_heldout", "zeroshot_seen", "zeroshot_all", "zeroshot_ood", "retrieval", "skipped"}
    assert res["zeroshot_ood"]["n"] == 3 and res["zeroshot_ood"]["acc1"] == pytest.approx(2 / 3)
    assert res["zeroshot_seen"]["n"] == 3 and res["zeroshot_seen"]["acc1"] == pytest.approx(2 / 3)
    assert res["zeroshot_heldout"]["n"] == 2 and res["zeroshot_heldout"]["acc1"] == pytest.approx(1 / 2)
    assert res["zeroshot_all"]["n"] == 5 and res["zeroshot_all"]["acc1"] == pytest.approx(3 / 5)
    assert res["zeroshot_all"]["mean_per_class_recall"] == pytest.approx(3 / 5)  # one row per class
    assert res["retrieval"]["n"] == 7 and res["skipped"] == {"bad": 2}


def test_perfect_features_score_one(tiny):
    classnames = ["red circle", "blue square", "green star", "red star", "blue circle", "green square"]
    w = build_classifier(tiny.model, tiny.tokenizer, classnames, ["a {c}.", "a drawing of a {c}."])
    feats = w.t().clone()  # image i == text i == class i's embedding
    metas = [_meta(i, heldout=i % 2 == 1) for i in range(len(classnames))]
    res = evaluate_features(Features(feats, feats.clone(), metas), w)
    for split in ("zeroshot_all", "zeroshot_seen", "zeroshot_heldout"):
        assert res[split]["acc1"] == 1.0 and res[split]["mean_per_class_recall"] == 1.0
    assert res["zeroshot_all"]["acc5"] == 1.0
    assert res["retrieval"]["image_retrieval_recall@1"] == 1.0
    assert res["retrieval"]["text_retrieval_recall@1"] == 1.0
    assert res["retrieval"]["image_retrieval_class_recall@1"] == 1.0


def test_write_results_is_clip_benchmark_shaped(tmp_path):
    feats, labels, w = _rank_case()
    results = {"zeroshot_all": zeroshot_metrics(feats[:, :4], labels.clamp(max=3), torch.eye(4)), "skipped": {}}
    out = tmp_path / "res" / "shapes.json"
    write_results(out, results, "shapes-teacher:demo", "shapes", extra={"params": 123})
    doc = json.loads(out.read_text())  # strict JSON: NaN acc5 written as null
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(doc)
    assert (doc["dataset"], doc["model"], doc["pretrained"]) == ("shapes", "shapes-teacher", "demo")
    assert doc["metrics"]["zeroshot_all"]["acc5"] is None and doc["params"] == 123
    assert "skipped" not in doc["metrics"]


def test_split_model_spec():
    assert split_model_spec("ViT-B-32:laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert split_model_spec("tiny-student") == ("tiny-student", "")
    assert split_model_spec("hf-hub:org/repo") == ("hf-hub:org/repo", "")
    assert split_model_spec("/x/run/export") == ("/x/run/export", "")


def test_evaluate_shapes_integration(tmp_path, tiny):
    pytest.importorskip("clipslim.data.loader")
    shapes = pytest.importorskip("clipslim.data.shapes")
    from clipslim.eval import evaluate_shapes

    data = tmp_path / "shapes"
    shapes.write_shapes(data, n_train=64, n_eval=128, shard_size=64, image_size=32, workers=0, progress=False)
    assert len(list((data / "eval").glob("*.tar"))) == 2
    res = evaluate_shapes(tiny, data, batch_size=32, progress=False)
    assert set(res) == {"zeroshot_heldout", "zeroshot_seen", "zeroshot_all", "zeroshot_ood", "retrieval", "skipped"}
    assert res["retrieval"]["n"] == 128 and res["zeroshot_ood"]["n"] == 64  # ood/ holds n_eval / 2 images
    assert res["zeroshot_heldout"]["n"] == 64 == res["zeroshot_seen"]["n"]
    assert res["zeroshot_all"]["n"] == res["zeroshot_seen"]["n"] + res["zeroshot_heldout"]["n"] > 0
    for split in ("zeroshot_all", "zeroshot_seen", "zeroshot_ood"):
        for name in ("acc1", "acc5", "mean_per_class_recall"):
            assert 0.0 <= res[split][name] <= 1.0
    for name, value in res["retrieval"].items():
        assert name == "n" or 0.0 <= value <= 1.0
