import pytest
import torch
from ignite.engine import Engine
from monai.handlers import MLFlowHandler

from scripts.engine import (
    AtomicCheckpointSaver,
    ReportPrepareBatch,
    ResumableEarlyStopHandler,
    _usable_handlers,
    latest_checkpoint,
    loss_terms,
)


def test_prepare_batch_passes_reports_as_keywords_and_tolerates_their_absence():
    batch = {"image": torch.zeros(2, 1, 8, 8), "label": torch.ones(2, 1, 8, 8)}
    image, label, args, kwargs = ReportPrepareBatch()(batch, device="cpu")
    assert image.shape == (2, 1, 8, 8) and label.shape == (2, 1, 8, 8) and args == () and kwargs == {}
    batch |= {"report_ids": torch.ones(2, 4, dtype=torch.long), "report_mask": torch.ones(2, 4, dtype=torch.long)}
    _, _, _, kwargs = ReportPrepareBatch()(batch, device="cpu")
    assert set(kwargs) == {"text_ids", "text_mask"}
    _, label, _, _ = ReportPrepareBatch()({"image": torch.zeros(1, 1, 8, 8)}, device="cpu")
    assert label is None


def test_a_second_mlflow_handler_is_merged_into_the_first(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    ours = MLFlowHandler(tracking_uri=uri, artifacts=[str(tmp_path / "model.pt")])
    added = MLFlowHandler(tracking_uri=uri, artifacts=str(tmp_path / "config.json"))
    other = object()
    kept = _usable_handlers([ours, None, other, added])
    assert kept == [ours, other]
    assert ours.artifacts == (str(tmp_path / "model.pt"), str(tmp_path / "config.json"))


def test_loss_terms_reads_decollated_output():
    out = [{"loss": torch.tensor(1.5), "loss_bce": torch.tensor(0.5), "pred": torch.zeros(1)}] * 2
    assert loss_terms(out, prefix="train_") == {"train_loss": 1.5, "train_loss_bce": 0.5}


def test_latest_checkpoint_picks_the_highest_epoch(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        latest_checkpoint(tmp_path)
    for epoch in (2, 10, 9):
        torch.save({"epoch": epoch}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    torch.save({}, tmp_path / "model.pt")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")


def test_logging_filter_fires_every_n_iterations_and_at_each_epoch_end():
    from types import SimpleNamespace

    from scripts.engine import every_n_iterations

    due = every_n_iterations(10)
    engine = SimpleNamespace(state=SimpleNamespace(epoch_length=25))
    assert [i for i in range(1, 51) if due(engine, i)] == [10, 20, 25, 30, 40, 50]
    short = SimpleNamespace(state=SimpleNamespace(epoch_length=3))  # an epoch shorter than the interval
    assert [i for i in range(1, 7) if due(short, i)] == [3, 6]


def test_a_model_that_cannot_be_logged_is_a_tagged_error_not_a_failed_run(tmp_path):
    """The MLflow model is logged when the training completes; one that cannot be (SSA cannot be exported) leaves
    the run FINISHED with the reason as the tag ``model_not_logged``, and the error in the log."""
    import mlflow
    from conftest import captured_logs
    from ignite.engine import Engine

    from scripts.engine import ResumableMLFlowHandler

    calls = []

    def cannot_export(run_id, tracking_uri):
        calls.append((run_id, tracking_uri))
        raise RuntimeError("Could not guard on data-dependent expression")

    uri = f"sqlite:///{tmp_path}/m.db"
    engine = Engine(lambda e, b: {"loss": 0.0})
    ResumableMLFlowHandler(tracking_uri=uri, model_logger=cannot_export, close_on_complete=True,
                           iteration_log=False, epoch_log=False).attach(engine)
    with captured_logs("scripts.engine") as records:
        engine.run([0, 1], max_epochs=1)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert calls == [(run.info.run_id, uri)]
    assert run.info.status == "FINISHED"
    assert run.data.tags["model_not_logged"] == "RuntimeError: Could not guard on data-dependent expression"
    assert any("MLflow model not logged" in r.getMessage() and r.levelname == "ERROR" for r in records)


def _scored(score: float, epoch: int) -> Engine:
    """An evaluator that has just computed its key metric."""
    engine = Engine(lambda e, b: None)
    engine.state.epoch, engine.state.iteration = epoch, epoch
    engine.state.key_metric_name = "val_dice_mean"
    engine.state.metrics = {"val_dice_mean": score}
    return engine


def test_a_resumed_best_model_saver_replaces_model_pt_only_with_a_better_model(tmp_path):
    net = torch.nn.Linear(2, 1)

    def saver() -> AtomicCheckpointSaver:
        return AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net}, save_key_metric=True,
                                     key_metric_filename="model.pt")

    first = saver()
    first.metrics_completed(_scored(0.8, 1))
    best = torch.load(tmp_path / "model.pt", weights_only=True)["weight"].clone()
    state = first.state_dict()
    assert [score for score, _ in state["best"]] == [pytest.approx(0.8)]

    with torch.no_grad():
        net.weight.add_(1.0)  # the weights go on changing after the interruption
    resumed = saver()
    resumed.load_state_dict(state)
    resumed.metrics_completed(_scored(0.7, 2))  # worse than the best before the interruption
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], best)
    resumed.metrics_completed(_scored(0.9, 3))
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], net.weight)
    assert [score for score, _ in resumed.state_dict()["best"]] == [pytest.approx(0.9)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_resumed_early_stop_keeps_counting_its_patience():
    def handler() -> ResumableEarlyStopHandler:
        return ResumableEarlyStopHandler(patience=2, score_function=lambda e: e.state.metrics["val_dice_mean"])

    first, trainer = handler(), Engine(lambda e, b: None)
    first.set_trainer(trainer)
    for epoch, score in enumerate((0.8, 0.7), 1):
        first(_scored(score, epoch))
    state = first.state_dict()
    assert state["counter"] == 1 and state["best_score"] == pytest.approx(0.8) and not trainer.should_terminate

    resumed, trainer = handler(), Engine(lambda e, b: None)
    resumed.load_state_dict(state)  # the resume loader runs before the trainer is set
    resumed.set_trainer(trainer)
    resumed(_scored(0.75, 3))  # the second epoch without improvement: patience 2 is used up
    assert trainer.should_terminate
