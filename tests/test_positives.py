"""Multi-positive mining (caption matches + CPR cascade) on a batch with known duplicates, and the multi-positive
clip / affinity / cross_kd losses against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from clipslim.config import ConfigError
from clipslim.objectives import Dims, Outputs, get_objective, parse_config
from clipslim.objectives.clip import info_nce
from clipslim.objectives.positives import PositivesConfig, mine, mining_metrics, spread
from clipslim.recipe import recipe_from_dict

E = torch.eye(4)


def _unit(*rows: torch.Tensor) -> torch.Tensor:
    return F.normalize(torch.stack(rows), dim=-1)


def _batch() -> tuple[dict, Outputs]:
    """Six pairs. Captions of 0 and 3 are identical. Teacher images: 0 = 1 (cos 1), 2 near both (0.894), 3 far from
    0/1 (0 and 0.447 to 2), 4 ~ 5 (0.995). Teacher texts: 0, 2 and 3 equal, the rest orthogonal.
    Classes: 0-3 are class 7, 4-5 class 9 (sample 5 has two objects, so it is unlabelled)."""
    tokens = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 7, 2], [1, 5, 2], [1, 8, 2], [1, 9, 2]])
    image = _unit(E[0], E[0], E[0] + 0.5 * E[1], E[1], E[2], E[2] + 0.1 * E[3])
    text = _unit(E[0], E[1], E[0], E[0], E[2], E[3])
    meta = [{"cls": 7}, {"cls": 7}, {"cls": 7}, {"cls": 7}, {"cls": 9}, {"cls": 9, "n_objects": 2}]
    return {"text": tokens, "meta": meta}, Outputs(image, text, torch.tensor(50.0))


def _cfg(**options) -> PositivesConfig:
    from clipslim.config import build

    return build(PositivesConfig, options, "positives")


def _sets(mask: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


CASCADE = [{"view": "image", "top_k": 2, "threshold": 0.3}, {"view": "text", "threshold": 0.9}]


def test_cascade_stages_return_the_expected_positive_sets():
    batch, teacher = _batch()
    mined = mine(_cfg(cascade=CASCADE), batch["text"], teacher, rows=None)
    assert _sets(mined.stages["captions"]) == [{3}, set(), set(), {0}, set(), set()]
    assert _sets(mined.stages["1_image"]) == [{1, 2}, {0, 2}, {0, 1}, {2}, {5}, {4}]
    assert _sets(mined.stages["2_text"]) == [{2}, set(), {0}, {2}, set(), set()]
    # Sample 3 is found for 0 through its caption although its image is far: the union of both routes.
    assert _sets(mined.positives) == [{0, 2, 3}, {1}, {0, 2}, {0, 2, 3}, {4}, {5}]


def test_single_stages_top_k_threshold_and_caption():
    batch, teacher = _batch()
    top1 = mine(_cfg(captions=False, cascade=[{"view": "image", "top_k": 1}]), batch["text"], teacher, None)
    assert _sets(top1.stages["1_image"])[0] == {1} and _sets(top1.stages["1_image"])[4] == {5}
    text = [{"view": "text", "threshold": 0.9}, {"view": "caption"}]
    mined = mine(_cfg(captions=False, cascade=text), batch["text"], teacher, None)
    assert _sets(mined.stages["1_text"]) == [{2, 3}, set(), {0, 3}, {0, 2}, set(), set()]
    assert _sets(mined.stages["2_caption"]) == [{3}, set(), set(), {0}, set(), set()]
    captions_only = mine(_cfg(), batch["text"], None, None)
    assert _sets(captions_only.positives) == [{0, 3}, {1}, {2}, {0, 3}, {4}, {5}]


def test_local_loss_rows_mine_the_same_sets():
    batch, teacher = _batch()
    full = mine(_cfg(cascade=CASCADE), batch["text"], teacher, None)
    part = mine(_cfg(cascade=CASCADE), batch["text"], teacher, slice(3, 6))
    assert torch.equal(part.positives, full.positives[3:])
    assert all(torch.equal(part.stages[k], v[3:]) for k, v in full.stages.items())


def test_mining_recall_and_precision_against_class_labels():
    batch, teacher = _batch()
    mined = mine(_cfg(cascade=CASCADE), batch["text"], teacher, None)
    labels = torch.tensor([7, 7, 7, 7, 9, -1])
    m = mining_metrics("clip", mined, labels, None)
    # Same-class ordered pairs: the 12 among samples 0-3 (sample 5 is unlabelled).
    assert m["clip_mine_recall_captions"].item() == pytest.approx(2 / 12)
    assert m["clip_mine_recall_1_image"].item() == pytest.approx(7 / 12)  # 0:{1,2} 1:{0,2} 2:{0,1} 3:{2}
    assert m["clip_mine_recall_2_text"].item() == pytest.approx(3 / 12)
    assert m["clip_mine_recall_all"].item() == pytest.approx(5 / 12)
    assert m["clip_mine_precision_all"].item() == 1.0
    assert m["clip_positives"].item() == pytest.approx((2 + 0 + 1 + 2 + 0 + 0) / 6)
    wrong = mining_metrics("clip", mined, torch.tensor([7, 8, 8, 7, 9, 9]), None)
    assert wrong["clip_mine_precision_1_image"].item() == pytest.approx(4 / 9)  # right: (1,2) (2,1) (4,5) (5,4)
    assert "clip_mine_recall_all" not in mining_metrics("clip", mined, torch.full((6,), -1), None)
    only_two = mining_metrics("clip", mined, torch.tensor([-1, -1, -1, -1, 9, 9]), None)
    assert only_two["clip_mine_recall_1_image"].item() == 1.0 and "clip_mine_precision_2_text" not in only_two


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"positives.cascade\[0\]: a image stage needs top_k"):
        _cfg(cascade=[{"view": "image"}])
    with pytest.raises(ConfigError, match=r"positives.cascade\[0\]: a caption stage"):
        _cfg(cascade=[{"view": "caption", "top_k": 3}])
    with pytest.raises(ConfigError, match=r"positives: mines nothing"):
        _cfg(captions=False)


def _make(name: str, **options):
    cls = get_objective(name)
    return cls(parse_config(cls, options, f"objectives.{name}"), Dims(4), Dims(4))


def test_clip_multi_positive_hand_computed():
    # Three pairs, captions 0 and 1 identical: targets (½, ½, 0) for queries 0 and 1, one-hot for 2.
    batch = {"text": torch.tensor([[1, 2], [1, 2], [1, 3]])}
    emb = E[:3, :3]
    s = Outputs(image=emb, text=emb, logit_scale=torch.tensor(2.0))
    got = _make("clip", positives={"captions": True})(s, None, batch)
    log_z = math.log(math.exp(2) + 2)  # each row: one logit 2, two logits 0
    row01 = -0.5 * ((2 - log_z) + (0 - log_z))
    expected = (2 * row01 + (log_z - 2)) / 3  # both directions are the same matrix here
    assert got["clip_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert got["clip_positives"].item() == pytest.approx(2 / 3)


def test_clip_multi_positive_without_duplicates_is_info_nce():
    g = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(5, 4, generator=g), dim=-1) for _ in range(2))
    s = Outputs(image, text, torch.tensor(10.0))
    batch = {"text": torch.arange(10).view(5, 2)}
    got = _make("clip", positives={})(s, None, batch)["clip_loss"]
    torch.testing.assert_close(got, info_nce(s.image, s.text, s.logit_scale))


def test_spread_shares_the_teachers_positive_mass_evenly():
    p = torch.tensor([[0.6, 0.1, 0.3], [0.2, 0.5, 0.3]])
    pos = torch.tensor([[True, False, True], [False, True, False]])
    torch.testing.assert_close(spread(p, pos), torch.tensor([[0.45, 0.1, 0.45], [0.2, 0.5, 0.3]]))


def test_affinity_multi_positive_hand_computed():
    batch = {"text": torch.tensor([[1, 2], [1, 2]])}  # one repeated caption: each pair is the other's positive
    s = Outputs(image=E[:2, :2], text=E[:2, :2], logit_scale=torch.tensor(1.0))
    got = _make("affinity", teacher_scale=2.0, positives={})(s, s, batch)["affinity_loss"].item()
    # Teacher rows softmax([2, 0]) pooled over both positives: (½, ½); student log-probs log_softmax([1, 0]).
    log_q = torch.log_softmax(torch.tensor([1.0, 0.0]), 0)
    assert got == pytest.approx(-(0.5 * log_q).sum().item(), rel=1e-6)
    plain = _make("affinity", teacher_scale=2.0)(s, s, batch)["affinity_loss"].item()
    assert got != pytest.approx(plain)


def test_teacher_mined_positives_need_a_teacher():
    base = {"student": {"arch": "tiny-student"}, "data": {"train": "x"}}
    cascade = {"clip": {"weight": 1.0, "positives": {"cascade": [{"view": "image", "top_k": 4}]}}}
    with pytest.raises(ConfigError, match="teacher: required by objective"):
        recipe_from_dict({**base, "objectives": cascade})
    recipe_from_dict({**base, "objectives": {"clip": {"weight": 1.0, "positives": {}}}})  # captions only: no teacher
    spec = recipe_from_dict({**base, "teacher": "tiny-teacher", "objectives": cascade}).objective_specs()[0]
    assert get_objective("clip").reads_teacher(spec.cfg)


def test_cross_kd_hand_computed():
    # Two pairs, student = teacher = identity in 2-d, teacher scale 2, cross scale 1 (scale_init 1):
    # every row: target softmax([2, 0]), student softmax([1, 0]); KL identical for all four rows.
    e = E[:2, :2]
    t = Outputs(image=e, text=e, logit_scale=torch.tensor(2.0))
    s = Outputs(image=e, text=e, logit_scale=torch.tensor(9.0))
    got = _make("cross_kd", scale_init=1.0)(s, t, {})
    p, q = torch.softmax(torch.tensor([2.0, 0.0]), 0), torch.softmax(torch.tensor([1.0, 0.0]), 0)
    assert got["cross_kd_loss"].item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-6)


def test_cross_kd_matches_clip_kd_formula():
    # CLIP-KD KDClipLoss: (DistillKL(τ_c Î_s T_tᵀ, τ_t I_t T_tᵀ) + DistillKL(τ_c T̂_s I_tᵀ, τ_t T_t I_tᵀ)) / 2.
    g = torch.Generator().manual_seed(3)
    unit = lambda: F.normalize(torch.randn(5, 4, generator=g), dim=-1)  # noqa: E731
    s, t = Outputs(unit(), unit(), torch.tensor(10.0)), Outputs(unit(), unit(), torch.tensor(30.0))
    got = _make("cross_kd")(s, t, {})["cross_kd_loss"]

    def distill_kl(y_s, y_t):
        return F.kl_div(F.log_softmax(y_s, 1), F.softmax(y_t, 1), reduction="batchmean")

    tau_c = 1 / 0.07
    ref = 0.5 * (distill_kl(tau_c * s.image @ t.text.T, 30 * t.image @ t.text.T)
                 + distill_kl(tau_c * s.text @ t.image.T, 30 * t.text @ t.image.T))  # fmt: skip
    torch.testing.assert_close(got, ref)
    fixed = _make("cross_kd", teacher_scale=50.0)(s, t, {})["cross_kd_loss"]
    assert fixed.item() != pytest.approx(got.item())
