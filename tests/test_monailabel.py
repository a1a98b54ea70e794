"""The bundle as MONAI Label's ``monaibundle`` app uses it, emulated without MONAI Label installed.

What monailabel 0.8.5 does with a local bundle (docs/monailabel.md has the real server runs):
- inference (its BundleInferTask): reads ``configs/inference.yaml`` with ``bundle_root`` overwritten; takes the
  first input and output of ``metadata.json`` as image and prediction keys, their ``channel_def`` (less
  "background") as labels, and ``len(spatial_shape)`` as the dimension; builds ``network_def`` once and loads
  ``models/model.pt`` into it; per request writes the client's params into ``displayable_configs`` and re-parses,
  runs ``preprocessing``, then ``inferer(image[None], network)`` (the image only), then ``postprocessing`` without
  its ``SaveImaged`` transforms, and writes ``pred`` as the returned mask.
- training (its BundleTrainTask): runs the ``run`` id of ``configs/train.yaml`` in process with ``bundle_root``,
  ``device``, ``train#trainer#max_epochs``, ``train#dataset#data`` and ``validate#dataset#data`` (image + label
  entries only: no report) and ``train#handlers`` (a CheckpointLoader of ``models/model.pt`` into ``@network``
  prepended) overridden.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, FAST, SHARED_DATA, config
from monai.bundle import ConfigParser, create_workflow
from monai.data import load_decathlon_datalist
from monai.transforms import Compose, LoadImaged, SaveImaged
from PIL import Image

QATA = SHARED_DATA / "qata"
LESION_IMAGE = "covid_0001"  # a QaTa-COV19 X-ray with a large lesion in both lungs


def _bundle_config(name: str, root=BUNDLE_ROOT) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config(name))
    parser.config.update({"bundle_root": str(root)})
    return parser


def _metadata() -> dict:
    return ConfigParser.load_config_file(config("metadata.json"))


def _state_dict() -> dict:
    saved = torch.load(BUNDLE_ROOT / "models" / "model.pt", map_location="cpu", weights_only=True)
    return saved.get("model", saved)


def test_metadata_gives_the_keys_labels_and_dimension_monai_label_derives():
    fmt = _metadata()["network_data_format"]
    image_key, image = next(iter(fmt["inputs"].items()))
    pred_key, pred = next(iter(fmt["outputs"].items()))
    assert (image_key, pred_key) == ("image", "pred")  # hard-coded in its infer task
    assert len(image["spatial_shape"]) == 2  # its dimension: 2D
    labels = {v.lower(): int(k) for k, v in pred["channel_def"].items() if v.lower() != "background"}
    assert labels == {"lesion": 1}  # the mask's 1 is the lesion


def test_the_ids_monai_label_reads_exist():
    infer = _bundle_config("inference.yaml")
    for key in ("bundle_root", "device", "network_def", "preprocessing", "inferer", "postprocessing"):
        assert infer.get(key) is not None, key
    assert infer.get_parsed_content("displayable_configs") == {"report": ""}
    train = _bundle_config("train.yaml")
    for key in ("bundle_root", "device", "network", "network_def", "train#trainer#max_epochs", "train#dataset#data",
                "train#handlers", "validate#dataset#data", "run"):
        assert train.get(key) is not None, key


def test_shipped_model_loads_strictly_into_network_def():
    # MONAI Label loads with strict=False and only warns about mismatched keys
    network = _bundle_config("inference.yaml").get_parsed_content("network_def")
    network.load_state_dict(_state_dict(), strict=True)


class _Spy(torch.nn.Module):
    """The network, recording the text keywords each call brings."""

    def __init__(self, network):
        super().__init__()
        self.network, self.calls = network, []

    def forward(self, image, **kwargs):
        self.calls.append(kwargs)
        return self.network(image, **kwargs)


@pytest.fixture(scope="module")
def infer_task():
    """A parsed inference config and its network, loaded once as MONAI Label's infer task keeps them."""
    parser = _bundle_config("inference.yaml")
    parser.config.update({"device": "cpu"})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(_state_dict(), strict=True)
    return parser, _Spy(network.eval())


def _request(parser, spy, image_path, params):
    """One ``POST /infer/<bundle>`` as MONAI Label's bundle infer task runs it: the returned ``pred``."""
    parser["displayable_configs"].update({k: params.get(k, v) for k, v in {"report": ""}.items()})
    parser.parse()
    pre = parser.get_parsed_content("preprocessing")
    pre = list(pre.transforms) if isinstance(pre, Compose) else pre
    assert isinstance(pre[0], LoadImaged)  # wrapped by MONAI Label's loader, which calls it on file paths
    data = {"image": str(image_path), **params}
    for t in pre:
        data = t(data)
    inferer = parser.get_parsed_content("inferer")
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], spy)[0]
    post = parser.get_parsed_content("postprocessing")
    post = list(post.transforms) if isinstance(post, Compose) else post
    kept = [t for t in post if not isinstance(t, SaveImaged)]  # its default post_filter
    assert len(kept) == len(post) - 1  # the bundle's writer is a SaveImaged and is left out
    for t in kept:
        data = t(data)
    return data["pred"]


@pytest.fixture(scope="module")
def qata_image():
    path = QATA / "images" / f"{LESION_IMAGE}.png"
    if not path.is_file():
        pytest.skip(f"shared QaTa data not found at {QATA}")
    return path


def _check_mask(pred, shape):
    """The PNG MONAI Label returns: its ITK writer transposes ``pred`` (MONAI indexes a 2D image x, y) and takes
    only 2D uint8/uint16 arrays for PNG."""
    assert pred.ndim == 2 and pred.dtype == torch.uint8
    mask = np.asarray(pred).T
    assert mask.shape == shape  # rows × columns of the input file
    assert set(np.unique(mask)) <= {0, 1}
    return mask


def test_image_only_request_returns_a_lesion_mask_at_the_input_size(infer_task, qata_image):
    parser, spy = infer_task
    spy.calls.clear()
    mask = _check_mask(_request(parser, spy, qata_image, {}), (224, 224))
    assert spy.calls == [{}]  # the network gets the image alone
    truth = np.asarray(Image.open(QATA / "masks" / qata_image.name)) > 0
    assert mask.any() and 2 * (mask.astype(bool) & truth).sum() / (mask.sum() + truth.sum()) > 0.5


def test_report_from_displayable_configs_reaches_the_network_and_does_not_leak(infer_task, qata_image):
    parser, spy = infer_task
    report = (QATA / "reports" / f"{LESION_IMAGE}.txt").read_text().strip()
    spy.calls.clear()
    with_report = _check_mask(_request(parser, spy, qata_image, {"report": report}), (224, 224))
    assert with_report.any()
    text_mask = spy.calls[0]["text_mask"]
    assert text_mask.shape == (1, 24) and text_mask.sum() > 5  # the report's tokens, not an empty row
    _request(parser, spy, qata_image, {})  # the next request without params: image only again
    assert spy.calls[1] == {}


def test_a_non_square_image_comes_back_at_its_own_size(infer_task, qata_image, tmp_path):
    parser, spy = infer_task
    path = tmp_path / "wide.png"
    Image.open(qata_image).resize((300, 260)).save(path)  # W×H
    mask = _check_mask(_request(parser, spy, path, {}), (260, 300))  # as it was in the file
    assert mask.any()


def test_training_from_monai_label_image_label_lists(demo_dir, tmp_path):
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    shutil.copy(BUNDLE_ROOT / "models" / "model.pt", root / "models" / "model.pt")
    before = (root / "models" / "model.pt").stat().st_mtime_ns

    def image_label(split, n):
        return [{"image": e["image"], "label": e["label"]}
                for e in load_decathlon_datalist(str(demo_dir / "datalist.json"), True, split)[:n]]

    handlers = _bundle_config("train.yaml", root).get("train#handlers")  # the raw config list
    handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(root / "models" / "model.pt"),
                        "load_dict": {"model": "$@network"}, "strict": False})
    overrides = {
        "bundle_root": str(root),
        "train#trainer#max_epochs": 1,
        "train#dataset#data": image_label("training", 8),
        "device": "cpu",
        "train#handlers": handlers,
        "validate#dataset#data": image_label("validation", 4),
        **{k: v for k, v in FAST.items() if k != "max_epochs"},
    }
    warnings = []
    handler = logging.Handler()
    handler.emit = warnings.append
    logger = logging.getLogger("scripts.transforms")
    logger.addHandler(handler)
    try:
        # what monai.bundle.run (MONAI Label's call) does, keeping the workflow to look at
        workflow = create_workflow(config_file=config("train.yaml"), meta_file=config("metadata.json"),
                                   run_id="run", **overrides)
        workflow.run()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        workflow.finalize()
    finally:
        logger.removeHandler(handler)
    assert trainer.state.epoch == 1 and trainer.state.iteration == 2
    absent = [r.getMessage() for r in warnings if "no 'report' key" in r.getMessage()]
    # the 12 image-only samples (training and validation): the first 3 named, then counted, not one line each
    assert len([m for m in absent if m.startswith("sample ")]) == 3
    assert [m for m in absent if not m.startswith("sample ")] == [
        "10 samples so far have no 'report' key (image-only samples); after the first 3 they are counted, not named"]
    saved = root / "models" / "model.pt"
    assert saved.stat().st_mtime_ns != before  # the best model replaces the one MONAI Label serves
    network = _bundle_config("train.yaml", root).get_parsed_content("network_def")
    state = torch.load(saved, weights_only=True)
    network.load_state_dict(state.get("model", state), strict=True)


def test_an_absent_report_is_image_only_only_when_allowed_and_an_empty_one_stays_an_error():
    from scripts.transforms import TokenizeReportd

    lenient = TokenizeReportd(keys="report", absent_report_image_only=True)
    out = lenient({"image": "/studies/a.png", "label": "/studies/labels/final/a.png"})
    assert out["report"] == "" and not out["report_mask"].any()
    for report in (None, "", "  "):
        with pytest.raises(ValueError, match="b.png"):
            lenient({"image": "/studies/b.png", "report": report})
    with pytest.raises(ValueError, match="is missing for sample /studies/c.png"):
        TokenizeReportd(keys="report")({"image": "/studies/c.png"})
    assert _bundle_config("train.yaml").get_parsed_content("absent_report_image_only") is True
