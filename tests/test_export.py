"""Exported folders must load in stock open_clip, in a process that never imports clipslim."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from clipslim.export import CONFIG_NAME, WEIGHTS_NAME, export_open_clip, jsonable
from clipslim.io import load_tensors, save_tensors
from clipslim.models import load_model

MEAN, STD = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)

# Runs in a fresh interpreter: loads each exported folder with stock open_clip only and saves its embeddings.
LOADER = textwrap.dedent(
    """
    import json, sys
    import open_clip, torch
    from safetensors.torch import load_file, save_file

    inputs, out_path, folders = load_file(sys.argv[1]), sys.argv[2], sys.argv[3:]
    outs, cfgs = {}, {}
    for i, folder in enumerate(folders):
        model = open_clip.create_model("local-dir:" + folder).eval()
        with torch.no_grad():
            outs[f"{i}.image"] = model.encode_image(inputs["image"])
            outs[f"{i}.text"] = model.encode_text(open_clip.get_tokenizer("local-dir:" + folder)(["a red circle"]))
        _, _, val = open_clip.create_model_and_transforms("local-dir:" + folder)
        cfgs[folder] = {**model.visual.preprocess_cfg, "val_transform": repr(val)}
    save_file(outs, out_path)
    assert "clipslim" not in sys.modules, "the stock loader must not need clipslim"
    print(json.dumps(cfgs))
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny student, exported in fp32 (custom mean/std) and fp16, plus stock-open_clip embeddings."""
    torch.manual_seed(0)
    bundle = load_model("tiny-student")
    root = tmp_path_factory.mktemp("export")
    pre = {**bundle.preprocess_cfg, "mean": MEAN, "std": STD}
    fp32 = export_open_clip(bundle.model, bundle.model_cfg, root / "fp32", preprocess_cfg=pre, arch=bundle.arch)
    fp16 = export_open_clip(bundle.model, bundle.model_cfg, root / "fp16", dtype=torch.float16, extra={"step": 7})
    inputs = {"image": torch.randn(2, 3, 32, 32)}
    save_tensors(root / "inputs.safetensors", inputs)
    cmd = [sys.executable, "-c", LOADER, str(root / "inputs.safetensors"), str(root / "out.safetensors")]
    proc = subprocess.run([*cmd, str(fp32), str(fp16)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = load_tensors(root / "out.safetensors")
    return bundle, inputs, fp32, fp16, stock, json.loads(proc.stdout.strip().splitlines()[-1])


def _reference(bundle, inputs):
    bundle.model.eval()
    with torch.no_grad():
        return bundle.model.encode_image(inputs["image"]), bundle.model.encode_text(bundle.tokenizer(["a red circle"]))


def test_stock_open_clip_loads_fp32_identically(exported):
    bundle, inputs, _, _, stock, _ = exported
    image, text = _reference(bundle, inputs)
    assert torch.equal(stock["0.image"], image)
    assert torch.equal(stock["0.text"], text)


def test_stock_open_clip_loads_fp16_closely(exported):
    bundle, inputs, _, fp16, stock, _ = exported
    image, text = _reference(bundle, inputs)
    torch.testing.assert_close(stock["1.image"], image, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(stock["1.text"], text, rtol=1e-2, atol=1e-2)
    weights = load_tensors(fp16 / WEIGHTS_NAME)
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert next(bundle.model.parameters()).dtype == torch.float32  # the exported model itself is untouched


def test_preprocess_cfg_round_trips(exported):
    bundle, _, fp32, fp16, _, cfgs = exported
    cfg = cfgs[str(fp32)]
    assert tuple(cfg["mean"]) == MEAN and tuple(cfg["std"]) == STD
    assert tuple(cfg["size"]) == (32, 32)
    assert "Normalize(mean=[0.5, 0.25, 0.125], std=[0.2, 0.3, 0.4])" in cfg["val_transform"]
    # no preprocess_cfg given: the model's own (open_clip's defaults here) is exported
    default = cfgs[str(fp16)]
    assert tuple(default["mean"]) == tuple(bundle.preprocess_cfg["mean"])


def test_config_file_layout(exported):
    bundle, _, fp32, fp16, _, _ = exported
    cfg = json.loads((fp32 / CONFIG_NAME).read_text())
    assert set(cfg) == {"model_cfg", "preprocess_cfg", "arch", "clipslim"}
    assert cfg["model_cfg"] == bundle.model_cfg and cfg["arch"] == "tiny-student"
    assert cfg["preprocess_cfg"]["size"] == [32, 32]  # tuples written as lists
    assert json.loads((fp16 / CONFIG_NAME).read_text())["clipslim"] == {"step": 7}


def test_clipslim_load_model_reads_plain_folder(exported):
    bundle, inputs, fp32, _, _, _ = exported
    loaded = load_model(str(fp32))
    loaded.model.eval()  # open_clip hands models back in train mode
    assert loaded.arch == "tiny-student" and loaded.model_cfg == bundle.model_cfg
    assert tuple(loaded.preprocess_cfg["mean"]) == MEAN
    image, text = _reference(bundle, inputs)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(inputs["image"]), image)
        assert torch.equal(loaded.model.encode_text(loaded.tokenizer(["a red circle"])), text)


def test_folder_without_arch_falls_back_to_folder_name(tmp_path):
    bundle = load_model("tiny-student")
    out = export_open_clip(bundle.model, bundle.model_cfg, tmp_path / "my-student")
    assert "arch" not in json.loads((out / CONFIG_NAME).read_text())
    assert load_model(str(out)).arch == "my-student"


def test_rejects_a_whole_open_clip_config(tmp_path):
    bundle = load_model("tiny-student")
    with pytest.raises(ValueError, match="model_cfg lacks"):
        export_open_clip(bundle.model, {"model_cfg": bundle.model_cfg}, tmp_path)
    assert not (Path(tmp_path) / WEIGHTS_NAME).exists()


def test_jsonable_turns_tuples_into_lists():
    assert jsonable({"a": (1, (2, 3)), "b": [(4,)], 5: "x"}) == {"a": [1, [2, 3]], "b": [[4]], "5": "x"}
