"""python -m bundle export: TorchScript and ONNX files that reproduce the PyTorch network on a real chest X-ray."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import BUNDLE_ROOT, SHARED_DATA, tokenize_reports

from bundle.__main__ import main
from bundle.export import ONNX_REQUIREMENTS, TOLERANCE, example_inputs, export, export_onnx, load_network

CASE = "covid_0001"
IMAGE = SHARED_DATA / "qata" / "images" / f"{CASE}.png"
OTHER_REPORT = "unilateral pulmonary infection, one infected area, lower left lung."
ONNX_MISSING = [p for p in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(p) is None]


@pytest.fixture(scope="module")
def case():
    """The shipped network and a real QaTa-COV19 image with its report, rows: with report, without (mask zero)."""
    if not IMAGE.is_file():
        pytest.skip(f"shared QaTa data not found at {IMAGE}")
    report = (SHARED_DATA / "qata" / "reports" / f"{CASE}.txt").read_text().strip()
    net, parser = load_network(BUNDLE_ROOT)
    inputs = example_inputs(parser, IMAGE, report)
    with torch.no_grad():
        reference = net(*inputs)
    # the report reaches the logits: otherwise "with" and "without report" would check the same thing twice
    assert (reference[0] - reference[1]).abs().max() > 0.1
    return net, inputs, reference


def _other_report(inputs):
    """The same image with another report (and its own length), batch 1: nothing of the example is baked in."""
    ids, mask = tokenize_reports([OTHER_REPORT])
    return inputs[0][:1], ids, mask


def test_torchscript_export_reproduces_pytorch(case, tmp_path, capsys):
    from monai.data import load_net_with_metadata

    net, inputs, reference = case
    out = tmp_path / "model.ts"
    report = (SHARED_DATA / "qata" / "reports" / f"{CASE}.txt").read_text().strip()
    args = ["export", "--format", "torchscript", "--out", str(out), "--image", str(IMAGE), "--report", report]
    assert main(args) == 0
    assert "with report: max |Δlogit|" in capsys.readouterr().out
    # what ckpt_export stores: the metadata and the inference config as JSON
    ts, meta, extra = load_net_with_metadata(str(out), more_extra_files=["inference.json"])
    assert meta["version"] == json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())["version"]
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "scripts.networks.TMCA"
    with torch.no_grad():
        assert (ts(*inputs) - reference).abs().max() <= TOLERANCE  # with and without report
        other = _other_report(inputs)
        assert (ts(*other) - net(*other)).abs().max() <= TOLERANCE


@pytest.mark.slow
@pytest.mark.skipif(bool(ONNX_MISSING), reason=f"optional {ONNX_MISSING} missing: pip install {ONNX_REQUIREMENTS}")
def test_onnx_export_reproduces_pytorch_in_onnxruntime(case, tmp_path):
    import onnx
    import onnxruntime

    net, inputs, reference = case
    result = export_onnx(net, inputs, tmp_path / "model.onnx", BUNDLE_ROOT)
    # checked on the real image, with and without its report
    assert set(result.max_abs_diff) == {"with report", "without report"}
    assert max(result.max_abs_diff.values()) <= TOLERANCE
    assert min(result.mask_agreement.values()) >= 0.999
    # one file: the frozen MiniLM is in the graph (its ~90 MB of weights) and no external data file is left beside it
    assert result.path.stat().st_size > 90e6 and list(tmp_path.iterdir()) == [result.path]
    model = onnx.load(str(result.path), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["image", "text_ids", "text_mask"]
    assert json.loads({p.key: p.value for p in model.metadata_props}["metadata.json"])["name"]

    # a dynamic batch axis and a report the export never saw
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    other = _other_report(inputs)
    pred = session.run(None, {k: t.numpy() for k, t in zip(("image", "text_ids", "text_mask"), other)})[0]
    with torch.no_grad():
        assert pred.shape == (1, 1, 224, 224)
        assert (torch.from_numpy(pred) - net(*other)).abs().max() <= TOLERANCE


def test_export_names_what_is_missing(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="onnx"):
        export("tensorrt")
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match="pip install onnx=="):
        export_onnx(torch.nn.Identity(), (), tmp_path / "x.onnx")


def test_export_refuses_weights_of_another_network_naming_the_file(tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save({"model": torch.nn.Linear(2, 2).state_dict()}, ckpt)
    with pytest.raises(RuntimeError, match="does not fit TMCA") as raised:
        load_network(BUNDLE_ROOT, ckpt)
    assert str(ckpt) in str(raised.value)


@pytest.mark.slow
def test_the_zoo_ckpt_export_trace_reproduces_pytorch(tmp_path):
    """`monai.bundle ckpt_export` as the zoo's full verification runs it (traced: HF ConvNeXt cannot be scripted,
    docs/README.md): it must pass the trace check (a cached sin-cos table once made the two traced invocations
    differ) and the exported network must give the PyTorch network's output (the image-only path it traces)."""
    import subprocess
    import sys

    ts = tmp_path / "model.ts"
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "--net_id", "network_def", "--filepath", str(ts),
         "--ckpt_file", str(BUNDLE_ROOT / "models" / "model.pt"), "--meta_file", "configs/metadata.json",
         "--config_file", "configs/inference.yaml", "--bundle_root", ".", "--use_trace", "True",
         "--input_shape", "[1,1,224,224]"],
        cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    net, _ = load_network(BUNDLE_ROOT)
    x = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(x)
        exported = torch.jit.load(str(ts))(x)
    assert exported.shape == expected.shape == (2, 1, 224, 224)
    torch.testing.assert_close(exported, expected, atol=TOLERANCE, rtol=TOLERANCE)
