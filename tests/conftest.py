"""Shared fixtures: the bundle root, small demo data sets and fast workflow overrides."""

from __future__ import annotations

import os
import sys
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
}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from bundle.demo_data import write_demo_data

    out = tmp_path_factory.mktemp("demo")
    write_demo_data(out, num_samples=24, seed=1)
    return out


def config(name: str) -> str:
    return str(BUNDLE_ROOT / "configs" / name)


def tokenize_reports(reports: list[str], max_length: int = 24):
    """Token ids and attention masks (B×L each) of ``reports``, as the configs' ``TokenizeReportd`` gives them."""
    import torch

    from scripts.transforms import TokenizeReport

    t = TokenizeReport(max_length=max_length)
    pairs = [t(r) for r in reports]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
