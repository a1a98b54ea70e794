"""``python -m bundle export``: the inference network as ONNX or TorchScript, checked against PyTorch.

Both formats take the network's three inputs, ``image`` (B×1×224×224 float32, intensities in [0, 1]),
``text_ids`` and ``text_mask`` (B×24 int64, the report's tokens as ``TokenizeReportd`` gives them; an all-zero
``text_mask`` row means "no report") and return ``pred``, B×1×224×224 logits. The frozen MiniLM text encoder is part
of the exported graph, so a caller only tokenizes. ``docs/export.md`` says what works, what does not and why.

Why not ``python -m monai.bundle ckpt_export`` / ``onnx_export`` as they are: both give the network one random
``image`` input, so at best they export the report-free path; ``ckpt_export`` without ``--use_trace`` scripts the
network, which fails on the ``transformers`` encoders (``torch.jit.script`` needs their source); with it the tracer's
own check fails unless ``check_trace`` is off; ``onnx_export`` fails in ``torch.export`` (see :func:`export_onnx`).
The export here runs the network once eagerly, then traces or exports it with all three inputs, and stores the
metadata and inference config as ``ckpt_export`` does.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from bundle.load import bundle_parser, load_checkpoint

__all__ = ["FORMATS", "ExportResult", "load_network", "example_inputs", "export", "export_onnx", "export_torchscript"]

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
INPUT_NAMES = ("image", "text_ids", "text_mask")
# a QaTa-COV19 report, for exports made without an example of the user's own
DEFAULT_REPORT = "bilateral pulmonary infection, two infected areas, all left lung and middle lower right lung."
# the largest |logit| difference an export may show against PyTorch (float32 kernels differ, ~1e-5 is usual)
TOLERANCE = 1e-3
# the optional packages of the ONNX export, as requirements-dev.txt pins them
ONNX_REQUIREMENTS = "onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0"


@dataclass
class ExportResult:
    """An exported file and how closely it reproduces the PyTorch network on the example inputs.

    ``max_abs_diff`` and ``mask_agreement`` (fraction of pixels where ``sigmoid > 0.5`` agrees) are keyed by
    ``"with report"`` and ``"without report"`` (the same image, its ``text_mask`` all zero).
    """

    path: Path
    format: str
    seconds: float
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    mask_agreement: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        checks = ", ".join(
            f"{k}: max |Δlogit| {v:.2e}, masks agree on {self.mask_agreement[k]:.4%} of pixels"
            for k, v in self.max_abs_diff.items()
        )
        size = self.path.stat().st_size / 1e6
        return f"{self.format} written: {self.path} ({size:.1f} MB, {self.seconds:.0f} s); against PyTorch: {checks}"


def load_network(
    root: str | os.PathLike = ".", ckpt: str | os.PathLike | None = None
) -> tuple[torch.nn.Module, ConfigParser]:
    """The inference config's ``network_def`` with its weights, in eval mode on the CPU, and the config parser.

    Args:
        root: bundle root.
        ckpt: weights, a plain state dict or a training checkpoint with a ``"model"`` entry (default
            ``models/model.pt``); float16 weights load into the float32 network.
    """
    root = Path(root)
    # CPU: the export must not depend on a GPU being there, and CPU float32 is the reference the checks use
    parser = bundle_parser(root / "configs" / "inference.yaml", {"device": "$torch.device('cpu')"}, root=root)
    net = load_checkpoint(parser.get_parsed_content("network_def"), ckpt or root / "models" / "model.pt")
    return net.eval(), parser


def example_inputs(
    parser: ConfigParser, image: str | os.PathLike | None = None, report: str | None = None, batch: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image, text_ids, text_mask)`` as the inference workflow feeds the network.

    With ``image`` the config's own ``preprocessing`` reads and resizes it; otherwise a seeded random image of the
    config's ``spatial_size``. The batch repeats the sample; every second row has an all-zero ``text_mask``, so
    that the report-free path is traced and checked too.
    """
    report = DEFAULT_REPORT if report is None else report
    if image is not None:
        sample = parser.get_parsed_content("preprocessing")({"image": str(image), "report": report})
        img = torch.as_tensor(sample["image"]).float()[None]
        ids, mask = torch.as_tensor(sample["report_ids"])[None], torch.as_tensor(sample["report_mask"])[None]
    else:
        size = parser.get_parsed_content("spatial_size")
        channels = parser.get_parsed_content("network_def#in_channels")
        img = torch.rand(1, channels, *size, generator=torch.Generator().manual_seed(0))
        ids, mask = (t[None] for t in parser.get_parsed_content("tokenizer")(report))
    ids, mask = ids.long(), mask.long()
    masks = torch.cat([mask if i % 2 == 0 else torch.zeros_like(mask) for i in range(batch)])
    return img.repeat(batch, 1, 1, 1), ids.repeat(batch, 1), masks


def _compare(reference: torch.Tensor, exported: torch.Tensor, result: ExportResult) -> None:
    """Records the differences of the rows with (even) and without (odd) report; raises past :data:`TOLERANCE`."""
    for name, rows in (("with report", slice(0, None, 2)), ("without report", slice(1, None, 2))):
        ref, out = reference[rows], exported[rows]
        if ref.numel() == 0:
            continue
        result.max_abs_diff[name] = float((ref - out).abs().max())
        result.mask_agreement[name] = float(((ref > 0) == (out > 0)).float().mean())  # sigmoid > 0.5 ⇔ logit > 0
    worst = max(result.max_abs_diff.values())
    if not worst <= TOLERANCE:  # also catches NaN
        raise RuntimeError(f"{result.format} export of {result.path} differs from PyTorch: max |Δlogit| {worst:.3g}")


def _saved_configs(root: Path) -> dict[str, bytes]:
    """The inference config as JSON, the extra file ``ckpt_export`` stores next to the metadata."""
    config = ConfigParser.load_config_file(str(root / "configs" / "inference.yaml"))
    return {"inference.json": json.dumps(config).encode()}


def export_torchscript(
    net: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: str | os.PathLike, root: str | os.PathLike = "."
) -> ExportResult:
    """Traces ``net`` on ``inputs`` and saves it with the bundle's metadata and inference config, as
    ``monai.bundle ckpt_export`` does (``monai.data.load_net_with_metadata`` reads them back).

    ``torch.jit.script`` cannot compile the ``transformers`` encoders, so this traces. The trace is fixed to the
    example's image size (the sin-cos position tables are constants) but not to its batch size or report.
    """
    from monai.data import save_net_with_metadata

    path, root, start = Path(path), Path(root), time.time()
    with torch.no_grad():
        # an eager call first fills GuideLayer's cache of sin-cos position tables: otherwise the first trace builds
        # the table and the tracer's check (a second trace) reads it from the cache, and the two graphs differ
        reference = net(*inputs)
        traced = torch.jit.trace(net, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    save_net_with_metadata(
        traced, str(path), include_config_vals=False, meta_values=meta, more_extra_files=_saved_configs(root)
    )
    result = ExportResult(path, "torchscript", time.time() - start)
    with torch.no_grad():
        _compare(reference, torch.jit.load(str(path))(*inputs), result)
    return result


def export_onnx(
    net: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: str | os.PathLike, root: str | os.PathLike = "."
) -> ExportResult:
    """Exports ``net`` with ``torch.onnx.export`` (the ``torch.export`` based exporter; needs ``onnx`` and
    ``onnxscript``) as one self-contained file with a dynamic batch axis and the bundle's metadata, and checks it
    with ``onnxruntime``.

    Raises:
        ModuleNotFoundError: naming the missing optional package.
    """
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"ONNX export needs {package}: pip install {ONNX_REQUIREMENTS}", name=package
            ) from e
    import onnxruntime

    path, root, start = Path(path), Path(root), time.time()
    with torch.no_grad():
        # an eager call first: GuideLayer's sin-cos position table is built once per grid and cached; built for the
        # first time under torch.export's fake tensors, the cache would keep a fake tensor and the export fails
        # ("We found a fake tensor in the exported program constant's list")
        reference = net(*inputs)
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.onnx.export(
            net, inputs, dynamo=True, input_names=list(INPUT_NAMES), output_names=["pred"],
            dynamic_shapes={name: {0: batch} for name in INPUT_NAMES},
        )
    # what ckpt_export stores as extra files, as ONNX metadata properties
    program.model.metadata_props["metadata.json"] = (root / "configs" / "metadata.json").read_text()
    program.model.metadata_props.update({k: v.decode() for k, v in _saved_configs(root).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    # one file (about 110 MB, under protobuf's 2 GB limit) rather than a graph and a weights file to keep together
    program.save(str(path), external_data=False)
    result = ExportResult(path, "onnx", time.time() - start)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {name: t.numpy() for name, t in zip(INPUT_NAMES, inputs)})[0]
    _compare(reference, torch.from_numpy(out), result)
    return result


def export(
    fmt: str,
    out: str | os.PathLike | None = None,
    root: str | os.PathLike = ".",
    ckpt: str | os.PathLike | None = None,
    image: str | os.PathLike | None = None,
    report: str | None = None,
) -> ExportResult:
    """Exports the bundle's inference network (``configs/inference.yaml``, weights ``ckpt``) to ``out``.

    Args:
        fmt: ``"onnx"`` or ``"torchscript"``.
        out: destination file (default ``models/model.onnx`` or ``models/model.ts`` under ``root``; git ignores
            both).
        root: bundle root.
        ckpt: weights (default ``models/model.pt``).
        image, report: an example to trace and check on (default: a random image and a QaTa-style report).

    Raises:
        ValueError: for an unknown format.
        RuntimeError: when the exported model's logits differ from PyTorch's by more than :data:`TOLERANCE`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {sorted(FORMATS)}")
    root = Path(root)
    net, parser = load_network(root, ckpt)
    inputs = example_inputs(parser, image, report)
    path = Path(out) if out else root / "models" / FORMATS[fmt]
    export_fn = export_onnx if fmt == "onnx" else export_torchscript
    return export_fn(net, inputs, path, root)
