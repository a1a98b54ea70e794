"""python -m bundle results: the results table of docs/results.md from evaluation outputs."""

import json
import subprocess
import sys

import pytest
from conftest import BUNDLE_ROOT

from bundle.results import COLUMNS, results_table


def _write(root, run, dice, **extra):
    path = root / run / "eval_val" / "metrics.json"
    path.parent.mkdir(parents=True)
    metrics = {k: 0.1 for k in COLUMNS} | {"val_dice_mean": dice} | extra
    path.write_text(json.dumps({"split": "validation", "metrics": metrics}))
    return path


def test_rows_are_named_by_run_sorted_by_dice_with_differences(tmp_path):
    a, b = _write(tmp_path, "tmca_1ep", 0.66), _write(tmp_path, "unet_1ep", 0.61)
    lines = results_table([b, a], baseline="tmca_1ep").splitlines()
    assert lines[0].startswith("| run | dice_mean | dice_pooled |") and "Δ dice_mean vs tmca_1ep" in lines[0]
    assert lines[2].startswith("| tmca_1ep | 0.6600 |") and lines[2].endswith("| +0.0000 |")
    assert lines[3].startswith("| unet_1ep | 0.6100 |") and lines[3].endswith("| -0.0500 |")


def test_incomplete_or_foreign_files_are_named_errors(tmp_path):
    bad = _write(tmp_path, "partial", 0.5)
    data = json.loads(bad.read_text())
    del data["metrics"]["val_missed_zones"]
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="partial.*missing metrics val_missed_zones"):
        results_table([bad])
    other = tmp_path / "x" / "y" / "metrics.json"
    other.parent.mkdir(parents=True)
    other.write_text("[1, 2]")
    proc = subprocess.run([sys.executable, "-m", "bundle", "results", str(other)], cwd=BUNDLE_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and str(other) in proc.stderr
