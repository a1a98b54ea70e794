"""bundle/study.sh, the command behind the TMCA study of docs/results.md (issue 19)."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import BUNDLE_ROOT

STUDY = str(BUNDLE_ROOT / "bundle" / "study.sh")

def _dry_run(*rows: str, seeds: str = "0") -> dict[str, tuple[str, list[str]]]:
    """tag -> (network file name, overrides after ``--``) of each run the study would start."""
    out = subprocess.run(["bash", STUDY, "--dry-run", *rows], env={"SEEDS": seeds, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout
    runs = {}
    for line in out.splitlines():
        words = shlex.split(line)
        assert words[0] == "bundle/qata.sh" and words[2] == "4" and words[4] == "--", line
        runs[words[3]] = (words[1], words[5:])
    return runs

def _switches(network: str) -> dict:
    return yaml.safe_load((BUNDLE_ROOT / "configs" / "networks" / f"{network}.yaml").read_text()) or {}

def test_every_tmca_ablation_differs_from_full_tmca_in_one_switch():
    runs = _dry_run()
    full_net, full_args = runs["tmca_v2bank_s0"]
    assert full_net == "tmca" and "--network_def#report_bank" in full_args
    ablations = {tag: run for tag, run in runs.items() if tag.startswith("tmca_v2bank_") and tag != "tmca_v2bank_s0"}
    assert {run[0] for run in ablations.values()} == {"tmca_no_target", "tmca_single_level", "tmca_no_enhancement"}
    for tag, (network, args) in ablations.items():
        assert args == full_args, tag  # same overrides: the network file is the only difference
        assert len(_switches(network)) == 1, network
        assert set(_switches(network)) - set(_switches("tmca")), network

def test_every_row_runs_with_the_same_recipe_and_its_own_seed():
    runs = _dry_run(seeds="0 2")
    assert len(runs) == 2 * 8
    for tag, (_, args) in runs.items():
        seed = tag.rsplit("_s", 1)[1]
        assert args[:4] == ["--seed", seed, "--report_rephrase_prob", "0.0"], tag

def test_an_unknown_row_is_an_error_naming_it_before_anything_runs():
    done = subprocess.run(["bash", STUDY, "tmca_backbone", "tmca_typo"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown row 'tmca_typo'" in done.stderr and "tmca_backbone" in done.stderr
    assert "qata.sh" not in done.stdout

def test_finished_runs_are_not_run_again_and_the_table_is_printed(tmp_path):
    # the three backbone seeds are kept in docs/results/issue19: nothing trains, the table comes from those files

    done = subprocess.run(["bash", STUDY, "tmca_backbone"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "RUNS_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| tmca_backbone | 3 |" in done.stdout and done.stdout.rstrip().endswith("| — | — |")
    assert not any(tmp_path.iterdir())

def test_a_run_another_lane_holds_is_left_to_it_and_the_lane_goes_on(tmp_path):
    if shutil.which("flock") is None:
        pytest.skip("flock(1) not installed: qata.sh then does not lock its run folder")
    keep, runs = tmp_path / "keep", tmp_path / "runs"
    keep.mkdir()
    shutil.copy(BUNDLE_ROOT / "docs" / "results" / "issue19" / "tmca_backbone_s1.json", keep)  # seed 1 is finished
    lock = runs / "tmca_backbone_s0" / ".lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(["flock", str(lock), "sleep", "60"], start_new_session=True)  # seed 0 is training in another lane
    try:
        for _ in range(100):  # until the holder has the lock
            if subprocess.run(["flock", "-n", str(lock), "true"]).returncode != 0:
                break
            time.sleep(0.05)
        done = subprocess.run(["bash", STUDY, "tmca_backbone"], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "RUNS_DIR": str(runs),
                                   "STUDY_DIR": str(keep), "SEEDS": "0 1",
                                   # if the lock failed, the run would stop at once on the missing data
                                   "QATA_DIR": str(tmp_path / "no_data")})
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # flock and the sleep that holds the lock with it
        holder.wait()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "left to the process that holds them (not in the table below): tmca_backbone_s0" in done.stderr
    assert "| tmca_backbone | 1 |" in done.stdout and "s1 0.7818" in done.stdout
    assert sorted(p.name for p in lock.parent.iterdir()) == [".lock"]  # nothing trained or evaluated there
    assert sorted(p.name for p in keep.iterdir()) == ["tmca_backbone_s1.json"]

def test_another_budget_is_refused_in_the_four_epoch_studys_folder(tmp_path):
    done = subprocess.run(["bash", STUDY, "tmca_backbone"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "EPOCHS": "8", "RUNS_DIR": str(tmp_path)})
    assert done.returncode == 2
    assert "EPOCHS=8: docs/results/issue19 keeps the 4-epoch study's figures; set STUDY_DIR" in done.stderr
    assert not any(tmp_path.iterdir())
