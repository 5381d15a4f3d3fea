"""ONNX export + ONNX Runtime parity, int8 quantisation, torch.compile wrapper, `clipslim deploy`. No timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import seeded_model

from clipslim.cli import main
from clipslim.deploy import REPORT_FILE, OrtClip, parity
from clipslim.deploy.compiled import check_compiler, compile_clip
from clipslim.deploy.onnx import CONFIG_FILE, example_inputs


@pytest.fixture(scope="module")
def tiny():
    return seeded_model("tiny-student")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tiny_shapes, tiny) -> Path:
    """`clipslim deploy --int8 --data` of tiny-student, with the weights of the `tiny` fixture."""
    folder = tmp_path_factory.mktemp("deploy")
    weights = folder / "w.pt"
    torch.save(tiny.model.state_dict(), weights)
    out = folder / "onnx"
    argv = ["deploy", "--model", f"tiny-student:{weights}", "--out", str(out), "--int8", "--repeats", "3"]
    assert main([*argv, "--data", str(tiny_shapes)]) == 0
    return out


def test_onnx_matches_pytorch_at_several_batch_sizes(deployed, tiny):
    onnx_model = OrtClip.from_folder(deployed)
    for batch in (1, 5):  # exported with batch 2: the batch axis is dynamic
        images, tokens = example_inputs(tiny, batch, seed=batch)
        diffs = parity(tiny.model, onnx_model, images, tokens)
        assert diffs["image_max_abs_diff"] < 1e-5 and diffs["text_max_abs_diff"] < 1e-5, diffs
        assert onnx_model.encode_image(images).shape == (batch, 32)


def test_config_and_report(deployed, tiny):
    import onnx

    config = json.loads((deployed / CONFIG_FILE).read_text())
    assert config["image_input"]["shape"] == ["batch", 3, 32, 32] and config["text_input"]["shape"] == ["batch", 16]
    assert config["preprocess_cfg"]["mean"] == list(tiny.preprocess_cfg["mean"])
    assert config["files"]["image_int8"] == "image_encoder.int8.onnx"
    graph = onnx.load(str(deployed / "image_encoder.onnx"))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in graph.graph.input] == ["image"] and [o.name for o in graph.graph.output] == ["image_embeds"]
    report = json.loads((deployed / REPORT_FILE).read_text())
    assert report["parity_ok"] and set(report["parity"]) == {"onnx", "onnx_int8"}
    for encoder in ("image", "text"):
        speed = report["speed_batch1"][encoder]
        assert set(speed) == {"eager", "onnx", "onnx_int8"} and speed["eager"]["ratio_to_eager"] == 1.0
        assert speed["onnx"]["ratio_to_eager"] == pytest.approx(
            speed["onnx"]["latency_ms_p50"] / speed["eager"]["latency_ms_p50"]
        )
    # fp32 ONNX scores exactly what eager scores; int8 is measured, not assumed
    acc = report["accuracy"]
    assert acc["onnx"]["acc1"] == acc["eager"]["acc1"] and acc["onnx"]["n"] == acc["eager"]["n"] > 0
    assert 0 <= acc["onnx_int8"]["acc1"] <= 1


def test_int8_is_quantised_smaller_and_close(deployed, tiny):
    import onnx

    ops = {n.op_type for n in onnx.load(str(deployed / "image_encoder.int8.onnx")).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    assert (deployed / "text_encoder.int8.onnx").stat().st_size < 0.5 * (deployed / "text_encoder.onnx").stat().st_size
    images, tokens = example_inputs(tiny, 4)
    diffs = parity(tiny.model, OrtClip.from_folder(deployed, int8=True), images, tokens)
    assert diffs["image_min_cosine"] > 0.98 and diffs["text_min_cosine"] > 0.98, diffs
    assert diffs["image_max_abs_diff"] > 1e-6  # really a different (quantised) graph


def test_missing_int8_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image_encoder\.int8\.onnx .*--int8"):
        OrtClip.from_folder(tmp_path, int8=True)


def test_compiled_wrapper_matches_eager(tiny):
    compiled = compile_clip(tiny.model, backend="aot_eager")  # inductor's C++ build is for the benchmark
    images, tokens = example_inputs(tiny, 2)
    with torch.no_grad():
        torch.testing.assert_close(compiled.encode_image(images), tiny.model.encode_image(images))
        torch.testing.assert_close(compiled.encode_text(tokens), tiny.model.encode_text(tokens))


def test_compile_without_a_compiler_fails_early(monkeypatch):
    monkeypatch.setattr("clipslim.deploy.compiled.shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        check_compiler("inductor", "cpu")
    check_compiler("aot_eager", "cpu")  # other backends build nothing


def test_cli_deploy_bad_data_is_one_line(tmp_path, capsys):
    assert main(["deploy", "--model", "tiny-student", "--out", str(tmp_path / "o"), "--data", "/no/such"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "/no/such" in err and not (tmp_path / "o").exists()
