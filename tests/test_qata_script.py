"""bundle/qata.sh, the command behind each QaTa-COV19 row of docs/results.md, on a few real QaTa images."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import BUNDLE_ROOT, SHARED_DATA

from bundle.results import COLUMNS


@pytest.mark.slow
def test_one_row_trains_evaluates_and_is_not_trained_twice(tmp_path):
    src = SHARED_DATA / "qata"
    if not src.is_dir():
        pytest.skip(f"shared QaTa data not found at {src}")
    split = json.loads((src / "split.json").read_text())
    ids = {"train": split["train"][:6], "val": split["val"][:2]}
    qata = tmp_path / "qata"
    for sub, suffix in (("images", ".png"), ("masks", ".png"), ("reports", ".txt")):
        (qata / sub).mkdir(parents=True)
        for i in ids["train"] + ids["val"]:
            shutil.copy(src / sub / f"{i}{suffix}", qata / sub / f"{i}{suffix}")
    (qata / "split.json").write_text(json.dumps(ids))
    env = {**os.environ, "QATA_DIR": str(qata), "RUNS_DIR": str(tmp_path / "runs"), "PYTHON": sys.executable}
    cmd = ["bash", str(BUNDLE_ROOT / "bundle" / "qata.sh"), "unet", "1", "tiny", "--",
           "--spatial_size", "[64,64]", "--batch_size", "2"]

    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "run_id: 'training'" in first.stdout + first.stderr
    run = tmp_path / "runs" / "tiny"
    metrics = json.loads((run / "eval_val" / "metrics.json").read_text())["metrics"]
    assert set(COLUMNS) <= set(metrics) and 0 <= metrics["val_dice_mean"] <= 1
    assert (run / "mlruns.db").is_file() and (run / "trained").is_file()
    model = run / "models" / "model.pt"
    stamp = model.stat().st_mtime_ns

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert model.stat().st_mtime_ns == stamp  # a finished run is evaluated again, never retrained
    assert "run_id: 'training'" not in again.stdout + again.stderr

    # bundle/freetext_eval.sh on the same row: templated, free text and hand-written (in the template and as
    # written), no report; each evaluation made once
    evaluate = ["bash", str(BUNDLE_ROOT / "bundle" / "freetext_eval.sh"), "unet", "tiny", "--",
                "--spatial_size", "[64,64]", "--batch_size", "2"]
    free = subprocess.run(evaluate, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert free.returncode == 0, free.stderr[-3000:]
    lines = free.stdout.strip().splitlines()[-6:]
    assert [line.split()[0] for line in lines] == ["template", "_freetext", "_freetext_as_written", "_handwritten",
                                                   "_handwritten_as_written", "_noreport"], free.stdout
    assert "(2 images; templated on them: dice_mean" in lines[3]
    for variant in ("_freetext", "_handwritten_as_written", "_noreport"):
        metrics = json.loads((run / f"eval_val{variant}" / "metrics.json").read_text())["metrics"]
        assert 0 <= metrics["val_dice_mean"] <= 1
    written = json.loads((tmp_path / "runs" / "datalist_handwritten.json").read_text())["validation"]
    assert {e["id"] for e in written} == set(ids["val"])


def test_a_run_folder_in_use_is_refused_and_left_untouched(tmp_path):
    """A second qata.sh of a TAG that is training (another study lane) stops before anything, with status 75."""
    if shutil.which("flock") is None:
        pytest.skip("flock(1) not installed: qata.sh then only warns")
    run = tmp_path / "runs" / "busy"
    run.mkdir(parents=True)
    env = {**os.environ, "RUNS_DIR": str(tmp_path / "runs"), "QATA_DIR": str(tmp_path / "no_data"), "PYTHON": "false"}
    holder = subprocess.Popen(["flock", str(run / ".lock"), "sleep", "60"], start_new_session=True)
    try:
        for _ in range(100):  # until the holder has the lock
            if subprocess.run(["flock", "-n", str(run / ".lock"), "true"]).returncode != 0:
                break
            time.sleep(0.05)
        done = subprocess.run(["bash", str(BUNDLE_ROOT / "bundle" / "qata.sh"), "unet", "1", "busy"], env=env,
                              capture_output=True, text=True)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # flock and the sleep that holds the lock with it
        holder.wait()
    assert done.returncode == 75, done.stderr
    assert f"{run} is in use by another bundle/qata.sh" in done.stderr and "nothing started" in done.stderr
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # no datalist step, no training, no evaluation
    assert not (tmp_path / "runs" / "datalist.json").exists()

    # once the holder is gone the same command goes on (here to the datalist step, which fails on the missing data)
    free = subprocess.run(["bash", str(BUNDLE_ROOT / "bundle" / "qata.sh"), "unet", "1", "busy"], env=env,
                          capture_output=True, text=True)
    assert free.returncode not in (0, 75) and "in use" not in free.stderr


def test_a_name_of_two_network_files_merges_both_and_an_unknown_one_is_refused(tmp_path):
    """`tmca+tmca_no_target`: two network files merged, in that order."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "datalist.json").write_text("{}")
    fake = tmp_path / "python"  # records each command the script would run
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n")
    fake.chmod(0o755)
    env = {**os.environ, "RUNS_DIR": str(runs), "PYTHON": str(fake)}
    qata = str(BUNDLE_ROOT / "bundle" / "qata.sh")
    subprocess.run(["bash", qata, "tmca+tmca_no_target", "1", "row"], env=env, capture_output=True, text=True)
    training, evaluating = (tmp_path / "calls").read_text().splitlines()
    nets = "'configs/networks/tmca.yaml','configs/networks/tmca_no_target.yaml'"
    assert f"run training --config_file ['configs/train.yaml',{nets}]" in training
    assert f"run evaluating --config_file ['configs/train.yaml',{nets},'configs/evaluate.yaml']" in evaluating

    done = subprocess.run(["bash", qata, "tmca+tmca_typo", "1", "typo"], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "no configs/networks/tmca_typo.yaml (network 'tmca+tmca_typo'" in done.stderr
    assert "tmca_no_target" in done.stderr  # the names there are
    assert not (runs / "typo").exists()
