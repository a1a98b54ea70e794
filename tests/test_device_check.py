"""bundle/device_check.sh, the prepared GPU check, in its CPU mode on a few real QaTa-COV19 images (so it cannot
rot between the sessions that are lent a GPU)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import BUNDLE_ROOT, SHARED_DATA


@pytest.fixture(scope="module")
def small_qata(tmp_path_factory):
    src = SHARED_DATA / "qata"
    if not src.is_dir():
        pytest.skip(f"shared QaTa data not found at {src}")
    ids = json.loads((src / "split.json").read_text())["train"][:6]
    qata = tmp_path_factory.mktemp("qata")
    for sub, suffix in (("images", ".png"), ("masks", ".png"), ("reports", ".txt")):
        (qata / sub).mkdir()
        for i in ids:
            shutil.copy(src / sub / f"{i}{suffix}", qata / sub / f"{i}{suffix}")
    (qata / "split.json").write_text(json.dumps({"train": ids}))
    return qata


@pytest.mark.slow
def test_device_check_script_runs_on_cpu_and_prints_its_figures(small_qata, tmp_path):
    env = {**os.environ, "QATA_DIR": str(small_qata), "OUT": str(tmp_path), "PYTHON": sys.executable,
           "DEVICE": "cpu", "BATCH": "2", "ENCODER": "cpu", "SIZE": "64", "WARMUP": "1"}
    proc = subprocess.run(["bash", str(BUNDLE_ROOT / "bundle" / "device_check.sh"), "4", "0"], cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| device | compute | workers | batch |" in proc.stdout and "| cpu |" in proc.stdout
    assert "compute path on cpu" in proc.stdout + proc.stderr and "repeated to 8" in proc.stdout + proc.stderr
    (result,) = json.loads((tmp_path / "device_check.json").read_text())["results"]
    # 4 steps of batch 2 need 8 entries: the 6 images were repeated; 3 steps timed after 1 of warm-up
    assert result["steps"] == 4 and result["timed_steps"] == 3 and result["batch_size"] == 2
    assert result["samples_per_s"] > 0 and 0 <= result["data_wait_fraction"] < 1 and result["step_s"] > 0
    assert math.isfinite(result["loss_first"]) and math.isfinite(result["loss_last"])
    assert math.isnan(result["peak_gpu_mb"])  # no GPU: not made up


def test_device_check_refuses_too_few_steps(small_qata, tmp_path):
    from bundle.device_check import device_check

    with pytest.raises(ValueError, match="must exceed warmup"):
        device_check(small_qata / "none.json", steps=2, warmup=2)
