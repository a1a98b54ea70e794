"""Shared fixtures: the bundle root, small demo data sets and fast workflow overrides."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LGS_SHARED_DATA", BUNDLE_ROOT.parent / "shared" / "data"))

# configs import `scripts` and the tests import `bundle`; subprocesses need the same
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BUNDLE_ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

# small and quick, but through the very same configs a user runs
FAST = {
    "spatial_size": [64, 64],
    "batch_size": 4,
    "num_workers": 0,
    "max_epochs": 1,
    "log_model": False,  # the MLflow model export (~20 s): tested once, in test_workflows.py
}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from bundle.demo_data import write_demo_data

    out = tmp_path_factory.mktemp("demo")
    write_demo_data(out, num_samples=24, seed=1)
    return out


def config(name: str) -> str:
    return str(BUNDLE_ROOT / "configs" / name)


def bundle_tmca():
    """TMCA as the bundle's configs build it (inference.yaml's ``network_def``), the network the shipped weights and
    every training of train.yaml fit; ``scripts.networks.TMCA()``'s Python defaults are the first design's."""
    from bundle.load import bundle_parser

    return bundle_parser(config("inference.yaml")).get_parsed_content("network_def")


# reports of the network tests: a repeated one (equal reports are positives of each other, never negatives) and
# named zones; a test module may set its own REPORTS, which the `tokens` fixture then reads
REPORTS = ["lower left lung.", "upper right lung.", "lower left lung.", "all left lung and middle right lung."]


@pytest.fixture(scope="module")
def tokens(request):
    """Token ids and attention masks (B×L each) of the test module's ``REPORTS`` (or conftest's)."""
    return tokenize_reports(getattr(request.module, "REPORTS", REPORTS))


def lesion_masks(b: int, size: int | tuple[int, int] = 64):
    """B×1×H×W binary masks with one 20×20 lesion each, shifted by 8 rows per sample (distinct targets)."""
    import torch

    h, w = (size, size) if isinstance(size, int) else size
    y = torch.zeros(b, 1, h, w)
    for i in range(b):
        y[i, :, 8 * i : 8 * i + 20, 10:30] = 1
    return y


def tokenize_reports(reports: list[str], max_length: int = 24):
    """Token ids and attention masks (B×L each) of ``reports``, as the configs' ``TokenizeReportd`` gives them."""
    import torch

    from scripts.transforms import TokenizeReport

    t = TokenizeReport(max_length=max_length)
    pairs = [t(r) for r in reports]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@contextmanager
def captured_logs(*names: str):
    """The records of the named loggers during the block. pytest's caplog cannot be used around a workflow: the
    bundle's logging.conf, applied when a workflow starts, replaces the root handlers caplog relies on."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
