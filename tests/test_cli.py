"""The documented command lines, run as a user runs them: `python -m monai.bundle`, `torchrun`, resume."""

import subprocess
import sys

import mlflow
import pytest
import torch
from conftest import BUNDLE_ROOT, FAST, config
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from scripts.engine import latest_checkpoint
from scripts.networks import TMCA

EXPERIMENT = "language_guided_segmentation"


def _cli_overrides() -> list[str]:
    args = []
    for key, value in FAST.items():
        args += [f"--{key}", str(value).replace(" ", "")]
    return args


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _runs(root):
    client = mlflow.MlflowClient(f"sqlite:///{root}/eval/mlruns.db")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_run_training_with_tracking_logs_one_complete_mlflow_run(tmp_path, demo_dir):
    _run([
        sys.executable, "-m", "monai.bundle", "run", "training", "--meta_file", "configs/metadata.json",
        "--config_file", "configs/train.yaml", "--bundle_root", str(tmp_path), "--dataset_dir", str(demo_dir),
        "--tracking", "mlflow", *_cli_overrides(),
    ])
    client, runs = _runs(tmp_path)
    assert len(runs) == 1  # the handler added by --tracking is merged into the bundle's own
    run = runs[0]
    assert run.info.status == "FINISHED"
    expected = {
        "train_loss", "train_loss_dice", "train_loss_bce", "train_loss_align", "train_loss_map", "lr_group_0",
        "train_dice_mean", "val_dice_mean", "val_dice_pooled", "val_iou_mean", "val_iou_pooled",
    } | {f"train_loss_align_s{s}" for s in (4, 8, 16, 32)}
    assert expected <= set(run.data.metrics)
    assert run.data.metrics["train_loss_bce"] > 0
    assert run.data.params["network"] == "TMCA"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "train.yaml", "metadata.json"} <= artifacts  # the configs folder, file by file
    assert "--dataset_dir" in run.data.params["command"]
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts)  # the executed config


@pytest.mark.slow
def test_torchrun_two_processes_on_gloo(tmp_path, demo_dir):
    _run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run",
        "training", "--meta_file", "configs/metadata.json",
        "--config_file", "['configs/train.yaml','configs/multi_gpu_train.yaml']",
        "--bundle_root", str(tmp_path), "--dataset_dir", str(demo_dir), *_cli_overrides(),
    ])
    saved = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    TMCA().load_state_dict(saved.get("model", saved), strict=True)
    _, runs = _runs(tmp_path)
    assert len(runs) == 1  # rank 1 does not log


def _train(root, demo_dir, **overrides):
    wf = ConfigWorkflow(
        config_file=config("train.yaml"), meta_file=config("metadata.json"), logging_file=config("logging.conf"),
        workflow_type="train", bundle_root=str(root), dataset_dir=str(demo_dir), **{**FAST, **overrides},
    )
    wf.initialize()
    return wf


def test_resume_continues_the_epoch_counter(tmp_path, demo_dir):
    first = _train(tmp_path, demo_dir, max_epochs=3)
    trainer = first.trainer
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())  # a cut-off
    first.run()
    epoch_length = trainer.state.epoch_length
    lr_after_1 = first.parser.get_parsed_content("optimizer").param_groups[0]["lr"]
    first.finalize()
    assert trainer.state.epoch == 1
    assert [p.name for p in (tmp_path / "models").glob("checkpoint_*.pt")] == ["checkpoint_epoch=1.pt"]

    resumed = _train(tmp_path, demo_dir, max_epochs=3, resume=True)
    epochs_run = []
    resumed.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    resumed.run()
    state = resumed.trainer.state
    scheduler = resumed.parser.get_parsed_content("lr_scheduler")
    resumed.finalize()
    assert epochs_run == [2, 3]
    assert state.epoch == 3 and state.iteration == 3 * epoch_length
    assert scheduler.last_epoch == 3  # the LR schedule continued too
    assert lr_after_1 < FAST.get("learning_rate", 0.001)
    assert latest_checkpoint(tmp_path / "models").endswith("checkpoint_epoch=3.pt")


def test_a_killed_run_resumes_into_its_mlflow_run_with_a_changed_command(tmp_path, demo_dir):
    """A process killed mid-training leaves its MLflow run RUNNING; MONAI carries on that run when training resumes
    under the same run name. The resumed command differs (here: a longer max_epochs), and MLflow params cannot
    change: the run must go on, keeping the first value as the param and the new one as a tag."""
    first = _train(tmp_path, demo_dir, max_epochs=1, run_name="qata_tmca")  # a fixed name, as bundle/qata.sh gives
    first.run()
    first.finalize()
    client, (run,) = _runs(tmp_path)
    client.update_run(run.info.run_id, status="RUNNING")  # what a kill leaves behind

    resumed = _train(tmp_path, demo_dir, max_epochs=2, resume=True, run_name="qata_tmca")
    resumed.run()
    resumed.finalize()
    client, runs = _runs(tmp_path)
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["max_epochs"] == "1" and run.data.tags["resumed.max_epochs"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_dice_mean")]
    assert sorted(steps) == [1, 2]


def test_resuming_a_checkpoint_of_another_network_version_names_it(tmp_path, demo_dir):
    """Optimizer moments load by parameter position: a checkpoint whose parameter order no longer matches the
    network must be refused by name at resume, not fail later in Adam with a bare tensor-size error."""
    first = _train(tmp_path, demo_dir, max_epochs=1)
    first.run()
    first.finalize()
    path = tmp_path / "models" / "checkpoint_epoch=1.pt"
    ckpt = torch.load(path, weights_only=False)
    state = ckpt["optimizer"]["state"]
    keys = sorted(state)
    ckpt["optimizer"]["state"] = {k: state[keys[(i + 1) % len(keys)]] for i, k in enumerate(keys)}  # shifted by one
    torch.save(ckpt, path)
    resumed = _train(tmp_path, demo_dir, max_epochs=2, resume=True)
    with pytest.raises(Exception) as error:
        resumed.run()
    chain, e = [], error.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("checkpoint_epoch=1.pt: the 'optimizer' state of" in m and "--resume False" in m for m in chain)
