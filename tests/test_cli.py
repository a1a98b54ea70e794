"""The documented command lines, run as a user runs them: `python -m monai.bundle`, `torchrun`, resume."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from conftest import BUNDLE_ROOT, FAST, bundle_tmca, captured_logs, config
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from scripts.engine import latest_checkpoint
from scripts.errors import error_chain
from scripts.run_record import read_run_record

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


def test_the_command_line_is_logged_as_it_can_be_typed_again(tmp_path):
    from scripts.run_record import command_line

    main = tmp_path / "site" / "monai" / "bundle" / "__main__.py"
    main.parent.mkdir(parents=True)
    for package in (main.parent, main.parent.parent):
        (package / "__init__.py").touch()
    main.touch()
    keys = "{'text_ids': 'report_ids', 'zones': 'zones'}"
    argv = [str(main), "run", "training", "--prepare_batch#text_keys", keys, "--seed", "0"]
    line = command_line(argv, env={})
    assert line.startswith("python -m monai.bundle run training ")
    assert shlex.split(line)[5:] == ["--prepare_batch#text_keys", keys, "--seed", "0"]
    assert command_line(["/opt/tool.py", "a b"], env={}) == "/opt/tool.py 'a b'"  # a script: its path as run
    # a rank that torchrun started (2 nodes of 4 processes)
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}
    assert command_line(argv, env=torchrun).startswith("torchrun --nnodes=2 --nproc_per_node=4 -m monai.bundle run ")


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
        "train_loss", "train_loss_dice", "train_loss_bce", "train_loss_align", "train_loss_map", "lr_log10_group_0",
        "train_dice_mean", "val_dice_mean", "val_dice_pooled", "val_iou_mean", "val_iou_pooled",
    } | {f"train_loss_align_s{s}" for s in (4, 8, 16, 32)}
    assert expected <= set(run.data.metrics)
    assert run.data.metrics["train_loss_bce"] > 0
    assert run.data.params["network"] == "TMCA"
    tags = run.data.tags  # where the run came from: bundle version, commit (in a git checkout), data
    assert tags["mlflow.source.name"].startswith("Language-guided lesion segmentation ")
    assert len(tags["dataset.sha256"]) == 64 and tags["dataset"].endswith("datalist.json")
    if (BUNDLE_ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["mlflow.source.git.commit"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "train.yaml", "metadata.json"} <= artifacts  # the configs folder, file by file
    command = shlex.split(run.data.params["command"])  # as it can be typed again
    assert command[:5] == ["python", "-m", "monai.bundle", "run", "training"] and str(demo_dir) in command
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
    bundle_tmca().load_state_dict(saved.get("model", saved), strict=True)
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
    # the best score and the early-stop state go into the training checkpoint
    checkpoint = tmp_path / "models" / "checkpoint_epoch=1.pt"
    saved = torch.load(checkpoint, weights_only=True)
    (best, _), = saved["best_model"]["best"]
    assert saved["early_stop"]["best_score"] == pytest.approx(best) and saved["early_stop"]["counter"] == 0
    assert saved["best_metric"] == {"best_metric": pytest.approx(best), "best_metric_epoch": 1}

    resumed = _train(tmp_path, demo_dir, max_epochs=3, resume=True)
    epochs_run, restored = [], []
    resumed.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    evaluator = resumed.parser.get_parsed_content("validate#evaluator")
    resumed.trainer.add_event_handler(Events.EPOCH_STARTED(once=2), lambda e: restored.append(
        (resumed.parser.get_parsed_content("validate#best_checkpoint").state_dict(),
         resumed.parser.get_parsed_content("validate#early_stop").state_dict(),
         (evaluator.state.best_metric, evaluator.state.best_metric_epoch))))
    resumed.run()
    state = resumed.trainer.state
    scheduler = resumed.parser.get_parsed_content("lr_scheduler")
    resumed.finalize()
    assert epochs_run == [2, 3]
    assert restored[0][0] == saved["best_model"] and restored[0][1] == saved["early_stop"]
    # the evaluator's best (its log's "best value ... at epoch ...") is the run's, not the best since the resume
    assert restored[0][2] == (pytest.approx(best), 1)
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


def _error_chain(error: BaseException) -> list[str]:
    return [str(e) for e in error_chain(error)]


def test_resume_refuses_a_checkpoint_of_another_run_by_name(tmp_path, demo_dir):
    """A checkpoint left in ckpt_dir by a run on other data is not resumed silently: the error names the file;
    --resume_foreign True takes it anyway, with a warning."""
    first = _train(tmp_path, demo_dir, max_epochs=1)
    first.run()
    first.finalize()
    lists = json.loads((demo_dir / "datalist.json").read_text())
    other = {k: [{**e, "image": str(demo_dir / e["image"]), "label": str(demo_dir / e["label"])} for e in v]
             for k, v in lists.items() if isinstance(v, list)}
    other["training"] = other["training"][1:]  # other data: one training sample fewer
    (tmp_path / "other.json").write_text(json.dumps(other))

    resumed = _train(tmp_path, demo_dir, max_epochs=2, resume=True, datalist=str(tmp_path / "other.json"))
    with pytest.raises(Exception) as error:
        resumed.run()
    assert any("checkpoint_epoch=1.pt was trained on other data" in m and "--resume_foreign True" in m
               for m in _error_chain(error.value))

    forced = _train(tmp_path, demo_dir, max_epochs=2, resume=True, resume_foreign=True,
                    datalist=str(tmp_path / "other.json"))
    with captured_logs("scripts.run_record") as records:
        forced.run()
    forced.finalize()
    assert any("checkpoint_epoch=1.pt was trained on other data" in r.getMessage() and "resumed anyway" in
               r.getMessage() for r in records)
    assert forced.trainer.state.epoch == 2


def test_a_checkpoint_records_its_run_and_resume_continues_that_mlflow_run(tmp_path, demo_dir):
    """The resumed command need not repeat the first run's --run_name: the checkpoint says which MLflow run it
    belongs to, and the training goes on in that run."""
    first = _train(tmp_path, demo_dir, max_epochs=1, run_name="first")
    first.run()
    first.finalize()
    client, (run,) = _runs(tmp_path)
    record = read_run_record(tmp_path / "models" / "checkpoint_epoch=1.pt")
    assert record["mlflow_run_id"] == run.info.run_id and len(record["datalist_sha256"]) == 64

    resumed = _train(tmp_path, demo_dir, max_epochs=2, resume=True)  # a new default run name
    resumed.run()
    resumed.finalize()
    client, runs = _runs(tmp_path)
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    assert runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_dice_mean")) == [1, 2]
    assert read_run_record(tmp_path / "models" / "checkpoint_epoch=2.pt")["mlflow_run_id"] == run.info.run_id


# a training process that dies where the test says (KILL_AT): "write:<file name>" SIGKILLs itself half-way
# through writing that checkpoint, "step:<n>" at its n-th optimizer step; otherwise it runs as monai.bundle does
_DYING_TRAINING = """
import os, runpy, signal, sys
from pathlib import Path
import torch
import scripts.io as io

where, _, arg = os.environ.get("KILL_AT", "").partition(":")
if where == "write":
    real_write = io.atomic_write
    def atomic_write(path, write, mode=0o644):
        def half_then_die(f):
            write(f)
            f.flush()
            f.truncate(f.tell() // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(path, half_then_die if Path(path).name == arg else write, mode)
    io.atomic_write = atomic_write
elif where == "step":
    real_step, steps = torch.optim.AdamW.step, [0]
    def step(self, *a, **k):
        steps[0] += 1
        if steps[0] == int(arg):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, *a, **k)
    torch.optim.AdamW.step = step
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__")
"""


@pytest.mark.slow
def test_killed_trainings_resume_without_losing_a_checkpoint_or_the_mlflow_run(tmp_path, demo_dir):
    """SIGTERM, SIGKILL half-way through a checkpoint and SIGKILL mid-epoch, each followed by ``--resume True``
    (without the first --run_name): every resume starts from the newest complete checkpoint, and the whole
    training ends as one FINISHED MLflow run with every epoch's validation."""
    models = tmp_path / "models"
    cmd = [sys.executable, "-c", _DYING_TRAINING, "run", "training", "--meta_file", "configs/metadata.json",
           "--config_file", "configs/train.yaml", "--bundle_root", str(tmp_path), "--dataset_dir", str(demo_dir),
           *_cli_overrides(), "--max_epochs", "4"]

    def start(kill_at: str = "", resume: bool = True) -> subprocess.Popen:
        env = {**os.environ, "KILL_AT": kill_at}
        return subprocess.Popen([*cmd, "--resume", str(resume)], cwd=BUNDLE_ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    proc = start(resume=False)  # SIGTERM (torchrun, a scheduler) once epoch 1 is saved
    for _ in range(6000):  # up to 10 min on a loaded machine
        if (models / "checkpoint_epoch=1.pt").exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert proc.poll() is None and (models / "checkpoint_epoch=1.pt").exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    client, (run,) = _runs(tmp_path)
    assert run.info.status == "KILLED"  # not RUNNING forever

    proc = start("write:checkpoint_epoch=3.pt")  # SIGKILL half-way through writing epoch 3's checkpoint
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert sorted(p.name for p in models.glob("checkpoint_*.pt")) == ["checkpoint_epoch=2.pt"]
    assert latest_checkpoint(models).endswith("checkpoint_epoch=2.pt")
    saved = torch.load(models / "model.pt", weights_only=True)
    bundle_tmca().load_state_dict(saved.get("model", saved))  # model.pt intact

    proc = start("step:2")  # SIGKILL at the 2nd step of epoch 3
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert latest_checkpoint(models).endswith("checkpoint_epoch=2.pt")

    proc = start()
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    client, runs = _runs(tmp_path)
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    assert runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_dice_mean"))
    assert sorted(set(steps)) == [1, 2, 3, 4]
    assert latest_checkpoint(models).endswith("checkpoint_epoch=4.pt")


def test_inference_says_what_it_did_and_nothing_that_is_not_the_users_business(tmp_path, demo_dir):
    """A newcomer's inference run: the last line says how many images were segmented and where they went; the
    third-party notices (nvImageCodec, torch.meshgrid, transformers' weight-loading bar, ignite's fresh-start
    line) are not printed."""
    proc = _run([
        sys.executable, "-m", "monai.bundle", "run", "inference", "--meta_file", "configs/metadata.json",
        "--config_file", "configs/inference.yaml", "--bundle_root", ".", "--dataset_dir", str(demo_dir),
        "--output_dir", str(tmp_path), "--output_formats", "[mask]",
    ])
    printed = proc.stdout + proc.stderr
    n = len(json.loads((demo_dir / "datalist.json").read_text())["test"])
    assert f"inference: {n} image(s) segmented; outputs in {tmp_path}" in printed
    for noise in ("nvImageCodec", "torch.meshgrid", "Loading weights", "resuming from iteration 0,"):
        assert noise not in printed, noise


def test_a_training_keeps_a_model_pt_it_did_not_write(tmp_path, demo_dir):
    """The README's by-hand training into models/ replaced the shipped model.pt with a 1-epoch model: the file
    that was there is now kept aside, named, and a resumed run (whose model.pt is its own) replaces in place."""
    (tmp_path / "models").mkdir()
    shipped = tmp_path / "models" / "model.pt"
    torch.save({"shipped": torch.ones(1)}, shipped)
    before = shipped.read_bytes()
    first = _train(tmp_path, demo_dir, max_epochs=1)
    first.run()
    first.finalize()
    (kept,) = (tmp_path / "models").glob("model.replaced-*.pt")
    assert kept.read_bytes() == before and shipped.read_bytes() != before
    resumed = _train(tmp_path, demo_dir, max_epochs=2, resume=True)
    resumed.run()
    resumed.finalize()
    assert len(list((tmp_path / "models").glob("model.replaced-*.pt"))) == 1
