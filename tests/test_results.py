"""python -m bundle results: the results table of docs/results.md from evaluation outputs."""

import json
import subprocess
import sys

import pytest
from conftest import BUNDLE_ROOT

from bundle.results import COLUMNS, results_table, seed_table


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


def test_a_copy_kept_with_the_docs_is_named_by_its_stem(tmp_path):
    kept = tmp_path / "docs" / "tmca_s0.json"
    kept.parent.mkdir()
    kept.write_bytes(_write(tmp_path, "tmca_s0", 0.7).read_bytes())
    other = _write(tmp_path, "unet_s0", 0.6)
    lines = seed_table([kept, other], baseline="unet").splitlines()
    # one seed: no spread shown, not a zero one
    assert lines[2].startswith("| tmca | 1 | 0.7000 ± — |") and lines[3].startswith("| unet | 1 |")


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


def test_seed_table_gives_mean_sd_per_seed_values_and_seeds_ahead(tmp_path):
    from bundle.results import seed_table

    paths = [_write(tmp_path, f"tmca_s{s}", d) for s, d in enumerate([0.70, 0.72, 0.74])]
    paths += [_write(tmp_path, f"tmca_backbone_s{s}", d) for s, d in enumerate([0.71, 0.70, 0.72])]
    lines = seed_table(paths, baseline="tmca_backbone").splitlines()
    assert lines[0].startswith("| row | seeds | dice_mean |") and lines[0].endswith("| seeds ahead |")
    assert lines[2].startswith("| tmca | 3 | 0.7200 ± 0.0200 |")
    assert "s0 0.7000, s1 0.7200, s2 0.7400" in lines[2] and lines[2].endswith("| +0.0100 | 2/3 |")
    assert lines[3].startswith("| tmca_backbone | 3 | 0.7100 ± 0.0100 |") and lines[3].endswith("| — | — |")  # the baseline against itself: nothing to compare
    with pytest.raises(ValueError, match="not named <row>_s<seed>"):
        seed_table([_write(tmp_path, "tmca_1ep", 0.5)])
    proc = subprocess.run([sys.executable, "-m", "bundle", "results", "--seeds", *map(str, paths)], cwd=BUNDLE_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "| tmca | 3 |" in proc.stdout
