"""Model specs: architecture, arch:tag, arch:local weights (.safetensors/.pt), hub folders; clear errors; no pickles."""

import pickle

import open_clip
import pytest
import torch

from clipslim.export import export_open_clip
from clipslim.io import save_tensors
from clipslim.models import ModelSpecError, count_params, load_model, resolve_spec


def _embed(model):
    model.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model.encode_image(torch.randn(2, 3, 32, 32, generator=g)), model.encode_text(
            torch.randint(1, 400, (2, 16), generator=g)
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny-student with non-default weights saved in every supported form."""
    torch.manual_seed(3)
    bundle = load_model("tiny-student")
    root = tmp_path_factory.mktemp("weights")
    sd = bundle.model.state_dict()
    save_tensors(root / "w.safetensors", sd)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, root / "w.pt")
    export_open_clip(bundle.model, bundle.model_cfg, root / "folder", arch="tiny-student")
    return bundle, root


def test_configs_registered_with_open_clip():
    assert {"shapes-teacher", "shapes-student-50", "shapes-student-25", "tiny-teacher"} <= set(open_clip.list_models())


@pytest.mark.parametrize("form", ["w.safetensors", "w.pt", "folder", "local-dir:folder"])
def test_every_local_form_loads_the_same_weights(trained, form):
    bundle, root = trained
    spec = f"local-dir:{root / 'folder'}" if form.startswith("local-dir") else str(root / form)
    if form.startswith("w."):
        spec = f"tiny-student:{spec}"
    loaded = load_model(spec)
    for a, b in zip(_embed(bundle.model), _embed(loaded.model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.arch == "tiny-student"


def test_tag_resolution_without_download():
    r = resolve_spec("ViT-B-32:laion2b_s34b_b79k")
    assert (r.model_name, r.pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert resolve_spec("ViT-B-32").pretrained is None
    assert resolve_spec("hf-hub:org/repo").model_name == "hf-hub:org/repo"


def test_shipped_teacher_tag_resolves_to_package_folder():
    r = resolve_spec("shapes-teacher:demo")
    assert r.model_name.startswith("local-dir:") and r.model_name.endswith("shapes-teacher")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-arch", "unknown architecture 'no-such-arch'"),
        ("ViT-B-32:no_such_tag", "neither a pretrained tag"),
        ("tiny-student:/nope/w.safetensors", "weights file not found: /nope/w.safetensors"),
        ("/nope/w.pt", "needs an architecture"),
        ("local-dir:/nope", "has no open_clip_config.json"),
        ("", "empty model spec"),
    ],
)
def test_bad_specs_fail_with_one_line(spec, message):
    with pytest.raises(ModelSpecError, match=message):
        load_model(spec)


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickled_code_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(ModelSpecError, match="could not load model"):
        load_model(f"tiny-student:{bad}")
    assert not (tmp_path / "PWNED").exists()


def test_param_count_separates_token_embedding():
    model = load_model("tiny-teacher").model
    counts = count_params(model)
    assert counts.total - counts.non_embedding == model.token_embedding.weight.numel() == 49408 * 64
