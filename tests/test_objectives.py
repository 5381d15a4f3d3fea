"""Each loss against a reference: open_clip's own losses and hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, DistillClipLoss

from clipslim.config import ConfigError
from clipslim.objectives import Dims, Outputs, get_objective, parse_config


def _outputs(seed: int, n: int = 6, d: int = 8, scale: float = 14.0) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return Outputs(image=image, text=text, logit_scale=torch.tensor(scale))


def _make(name: str, **options):
    cls = get_objective(name)
    return cls(parse_config(cls, options, f"objectives.{name}"), Dims(8), Dims(8))


def test_clip_matches_open_clip_cliploss():
    s = _outputs(0)
    ours = _make("clip")(s, None, {})["clip_loss"]
    ref = ClipLoss()(s.image, s.text, s.logit_scale)
    torch.testing.assert_close(ours, ref)


def test_clip_hand_computed_two_pairs():
    # Orthogonal embeddings: logits = scale * I; CE of a 2-way softmax with margin `scale`.
    e = torch.eye(2)
    s = Outputs(image=e, text=e, logit_scale=torch.tensor(2.0))
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert _make("clip")(s, None, {})["clip_loss"].item() == pytest.approx(expected, rel=1e-6)


def test_affinity_matches_open_clip_distill_loss_at_teacher_scale():
    s, t = _outputs(1, scale=10.0), _outputs(2, scale=33.0)
    ours = _make("affinity", teacher_scale=None)(s, t, {})["affinity_loss"]
    _, ref = DistillClipLoss()(s.image, s.text, s.logit_scale, t.image, t.text, t.logit_scale)
    torch.testing.assert_close(ours, ref)


def test_affinity_uses_fixed_teacher_scale_not_the_teachers_own():
    s, t = _outputs(1, scale=10.0), _outputs(2, scale=33.0)
    fixed = _make("affinity", teacher_scale=50.0)(s, t, {})["affinity_loss"]
    t50 = Outputs(image=t.image, text=t.text, logit_scale=torch.tensor(50.0))
    _, ref = DistillClipLoss()(s.image, s.text, s.logit_scale, t50.image, t50.text, t50.logit_scale)
    torch.testing.assert_close(fixed, ref)


def test_affinity_hand_computed():
    # One image, two texts: teacher targets p, student log-probs log q; loss = -sum p log q, averaged over directions.
    s = Outputs(image=torch.eye(2), text=torch.eye(2), logit_scale=torch.tensor(1.0))
    t = Outputs(image=torch.eye(2), text=torch.eye(2), logit_scale=torch.tensor(1.0))
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)  # teacher scale 2
    log_q = torch.log_softmax(torch.tensor([1.0, 0.0]), 0)
    expected = -(p * log_q).sum().item()
    got = _make("affinity", teacher_scale=2.0)(s, t, {})["affinity_loss"].item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_affinity_is_minimised_when_student_copies_teacher():
    t = _outputs(3, scale=50.0)
    obj = _make("affinity", teacher_scale=50.0)
    same = obj(Outputs(t.image, t.text, torch.tensor(50.0)), t, {})["affinity_loss"]
    other = obj(_outputs(4, scale=50.0), t, {})["affinity_loss"]
    assert same < other


def test_unknown_option_names_the_field():
    cls = get_objective("affinity")
    with pytest.raises(ConfigError, match=r"objectives.affinity.teacher_scael: unknown key"):
        parse_config(cls, {"teacher_scael": 3}, "objectives.affinity")
    with pytest.raises(ConfigError, match=r"objectives.affinity.teacher_scale: expected"):
        parse_config(cls, {"teacher_scale": "hot"}, "objectives.affinity")


def test_unknown_objective():
    with pytest.raises(KeyError, match="unknown objective 'nope'"):
        get_objective("nope")
