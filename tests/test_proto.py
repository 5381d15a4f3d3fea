"""ProtoCLIP: PBT, prototype loss and k-means against hand-computed values; episodes in a real (tiny) training run."""

import math

import pytest
import torch
import torch.nn.functional as F

from clipslim.config import ConfigError
from clipslim.io import load_tensors
from clipslim.objectives import Dims, Outputs, get_objective, parse_config
from clipslim.proto import assemble, back_translate, cluster_episode, key_hash, kmeans, lookup
from clipslim.proto.external import build_cache, clip_text_encoder, iter_captions, load_cache

K, D = 3, 2


def _make(**options):
    cls = get_objective("proto")
    opts = {"hidden_dim": 16, "dim": 8, "k": K, **options}
    return cls(parse_config(cls, opts, "objectives.proto"), Dims(8), Dims(8))


# --- PBT and the loss, by hand -----------------------------------------------------------------------------------


def test_back_translation_hand_computed():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 2, -1])  # cluster 1 is empty; label -1 is ignored
    c = back_translate(z, labels, K)
    assert torch.equal(c, torch.tensor([[0.5, 0.5], [0.0, 0.0], [3.0, 3.0]]))


def test_prototype_loss_matches_direct_formula():
    from clipslim.objectives.proto import prototype_loss

    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(5, D, generator=g), dim=-1)
    c_s, c_t = torch.randn(K, D, generator=g), F.normalize(torch.randn(K, D, generator=g), dim=-1)
    y = torch.tensor([0, 2, -1, 1, 2])
    scale, tau = 7.0, 0.01
    total, n = 0.0, 0
    for i in range(5):
        if y[i] < 0:
            continue
        t = [math.exp(float(c_t[y[i]] @ c_t[j]) / tau) for j in range(K)]
        q = [v / sum(t) for v in t]
        s = [scale * float(z[i] @ c_s[j]) for j in range(K)]
        log_p = [v - math.log(sum(math.exp(w) for w in s)) for v in s]
        total -= sum(q[j] * log_p[j] for j in range(K))
        n += 1
    assert prototype_loss(z, c_s, c_t, y, scale, tau).item() == pytest.approx(total / n, rel=1e-5)
    hard = prototype_loss(z, c_s, c_t, y, scale, 0.0)  # the external teacher's hard labels
    keep = y >= 0
    assert hard.item() == pytest.approx(F.cross_entropy(scale * z[keep] @ c_s.T, y[keep]).item(), rel=1e-6)


def _episode(obj, pbt_features: bool = True) -> dict:
    g = torch.Generator().manual_seed(1)
    zi, zt = F.normalize(torch.randn(6, 8, generator=g), dim=-1), F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    y = torch.tensor([[0, 1, 2], [1, 1, 0], [2, 0, 1], [0, 2, 2], [1, 0, 0], [2, 2, 1]])
    ci, ct = F.normalize(torch.randn(K, 8, generator=g), dim=-1), F.normalize(torch.randn(K, 8, generator=g), dim=-1)
    ids = key_hash([f"s{i}" for i in range(6)])
    ep = assemble(ids, zi, zt, y, ci, ct, k=K, external=True)
    obj.set_episode(ep, episode=1)
    return ep


@pytest.mark.parametrize("pbt", [True, False])
def test_objective_forward_matches_formula(pbt):
    obj = _make(pbt=pbt, external="teacher", external_weight=0.5).eval()
    ep = _episode(obj)
    g = torch.Generator().manual_seed(2)
    out = Outputs(F.normalize(torch.randn(4, 8, generator=g), -1), F.normalize(torch.randn(4, 8, generator=g), -1), 1)
    keys = ["s3", "s0", "nope", "s5"]
    terms = obj(out, None, {"key": keys})
    zi, zt = obj.project(out.image, out.text)
    y = lookup(ep["key_hash"], ep["labels"], key_hash(keys))
    assert y[2].tolist() == [-1, -1, -1]
    s, keep = math.exp(math.log(1 / 0.07)), torch.tensor([0, 1, 3])
    yk = y[keep]

    def soft(z, c_s, c_t, lab):
        q = (c_t[lab] @ c_t.T / 0.01).softmax(1)
        return -(q * (s * z @ c_s.T).log_softmax(1)).sum(1).mean()

    img_t = ep["image_from_text"] if pbt else ep["text_centroids"]
    txt_t = ep["text_from_image"] if pbt else ep["image_centroids"]
    i2t = soft(zi[keep], img_t, ep["text_centroids"], yk[:, 1])
    t2i = soft(zt[keep], txt_t, ep["image_centroids"], yk[:, 0])
    ext = 0.5 * (
        F.cross_entropy(s * zi[keep] @ ep["image_from_external"].T, yk[:, 2])
        + F.cross_entropy(s * zt[keep] @ ep["text_from_external"].T, yk[:, 2])
    )
    expected = 0.5 * (i2t + t2i) + 0.5 * ext
    assert terms["proto_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["proto_matched"].item() == pytest.approx(0.75)


def test_warmup_gives_zero_and_no_episode():
    obj = _make()
    out = Outputs(F.normalize(torch.randn(4, 8), -1), F.normalize(torch.randn(4, 8), -1), 1)
    terms = obj(out, None, {"key": ["a", "b", "c", "d"]})
    assert terms["proto_loss"].item() == 0.0 and set(terms) == {"proto_loss"}


def test_episode_buffers_survive_a_checkpoint():
    obj = _make(external="teacher")
    _episode(obj)
    fresh = _make(external="teacher")
    fresh.load_state_dict(obj.state_dict(), strict=True)  # buffers are resized to the saved episode
    for name, buf in obj.named_buffers():
        assert torch.equal(buf, dict(fresh.named_buffers())[name]), name
    assert int(fresh.episode) == 1 and fresh.labels.shape == (6, 3)


# --- k-means ---------------------------------------------------------------------------------------------------


def test_kmeans_deterministic_and_finds_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    x = (centres[:, None, :] + 0.1 * torch.randn(3, 20, 2, generator=g)).reshape(60, 2)
    c1, y1 = kmeans(x, 3, seed=5, nredo=5)
    c2, y2 = kmeans(x, 3, seed=5, nredo=5)
    assert torch.equal(c1, c2) and torch.equal(y1, y2)
    blobs = y1.reshape(3, 20)
    assert all(len(set(row.tolist())) == 1 for row in blobs) and len(set(blobs[:, 0].tolist())) == 3


def test_fewer_points_than_clusters_and_empty_clusters_stay_finite():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [float("nan"), 1.0]])
    c, y = kmeans(x, 5, seed=0)
    assert c.shape == (5, 2) and torch.isfinite(c).all() and c[3:].abs().sum() == 0 and y.max() < 3
    obj = _make()
    zi, zt = F.normalize(torch.randn(3, 8), -1), F.normalize(torch.randn(3, 8), -1)
    ep = cluster_episode(key_hash(["a", "b", "c"]), zi, zt, None, k=K, seed=0)
    ep["labels"][:, :2] = 0  # every sample in cluster 0: clusters 1 and 2 are empty in both modalities
    ep["image_from_text"], ep["text_from_image"] = back_translate(zi, ep["labels"][:, 1], K), torch.zeros(K, 8)
    obj.set_episode(ep, episode=1)
    out = Outputs(zi.clone().requires_grad_(True), zt.clone().requires_grad_(True), 1)
    loss = obj(out, None, {"key": ["a", "b", "c"]})["proto_loss"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out.image.grad).all() and torch.isfinite(out.text.grad).all()


# --- config ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"external_pca": 0}, "external_pca"),
        ({"episode_steps": 0}, "episode_steps"),
        ({"external": "bert"}, "expected one of"),
        ({"external_cache": "x.safetensors"}, "external is 'none'"),
    ],
)
def test_bad_options_name_the_field(options, message):
    cls = get_objective("proto")
    with pytest.raises(ConfigError, match=message):
        parse_config(cls, options, "objectives.proto")


def test_teacher_external_needs_a_teacher_and_a_real_cache(tmp_path):
    cls = get_objective("proto")
    with pytest.raises(ConfigError, match="needs a recipe teacher"):
        cls(parse_config(cls, {"external": "teacher"}, "objectives.proto"), Dims(8), None)
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not tensors")
    with pytest.raises(ConfigError, match="external_cache"):
        _make(external="teacher", external_cache=str(bad))


# --- external teacher ------------------------------------------------------------------------------------------


def test_teacher_cache_has_every_caption(tiny_shapes, tmp_path):
    from conftest import seeded_model

    teacher = seeded_model("tiny-teacher")
    path = build_cache(
        tiny_shapes / "train", clip_text_encoder(teacher.model, teacher.tokenizer), tmp_path / "c.safetensors",
        name="teacher", batch_size=100, progress=False,
    )  # fmt: skip
    pairs = list(iter_captions(tiny_shapes / "train"))
    ids, feats = load_cache(path, pca_dim=None)
    assert len(pairs) == 256 and ids.numel() == 256 and torch.equal(ids, torch.sort(ids).values)
    key, caption = pairs[7]
    row = lookup(ids, torch.arange(256), key_hash([key]))
    with torch.no_grad():
        direct = teacher.model.encode_text(torch.as_tensor(teacher.tokenizer([caption])), normalize=True)
    assert torch.allclose(feats[row], direct, atol=2e-3)  # cached as fp16
    ids2, reduced = load_cache(path, pca_dim=4)
    assert reduced.shape == (256, 4) and torch.equal(ids, ids2)


def test_minilm_teacher_loads_offline_and_embeds_meaning(monkeypatch):
    from clipslim.proto.external import minilm_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    e = minilm_encoder("cpu")(["a red circle", "a photo of a red circle.", "a blue square"])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-4)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1


# --- a real run ------------------------------------------------------------------------------------------------


def test_training_run_builds_episodes_and_resume_keeps_them(tiny_recipe, tmp_path):
    """Warm-up episode, then episodes at steps 2 and 4; resuming mid-episode (step 3) ends bit-identical."""
    import json
    import shutil

    from clipslim.train.loop import Trainer

    proto = {"weight": 1.0, "episode_steps": 2, "warmup_episodes": 1, "k": 4, "hidden_dim": 16, "dim": 8}
    recipe = tiny_recipe(steps=6)
    recipe.objectives = {**recipe.objectives, "proto": {**proto, "external": "teacher"}}
    run = tmp_path / "run"
    trainer = Trainer(recipe, run, progress=False)
    trainer.run()
    rows = trainer.metrics.rows
    assert [float(r["proto_loss"]) for r in rows[:2]] == [0.0, 0.0]  # InfoNCE-only warm-up episode
    later = rows[2:]
    assert all(float(r["proto_loss"]) > 0 and float(r["proto_matched"]) == 1.0 for r in later)
    assert all(float(r["proto_external"]) > 0 for r in later)
    assert (run / "external_teacher.safetensors").is_file()
    assert len(trainer.built.distiller.objectives["proto"].builder.timings) == 2  # episodes at steps 2 and 4
    mid = load_tensors(run / "checkpoints" / "step_000003" / "model.safetensors")
    assert int(mid["objectives.proto.episode"]) == 1 and mid["objectives.proto.labels"].shape == (64, 3)

    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "checkpoints" / "step_000006")
    (again / "checkpoints" / "latest.json").write_text(json.dumps({"step": 3, "dir": "step_000003"}))
    Trainer(recipe, again, resume=True, progress=False).run()
    end, end_again = (load_tensors(d / "checkpoints" / "step_000006" / "model.safetensors") for d in (run, again))
    assert all(torch.equal(end[k], end_again[k]) for k in end)
