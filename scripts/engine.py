"""Ignite engine glue: batches with reports, trainers with several named loss terms, checkpoints to resume."""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as _IgniteProgressBar
from monai.engines import IterationEvents, PrepareBatch, SupervisedEvaluator, SupervisedTrainer
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver, EarlyStopHandler, MLFlowHandler
from monai.utils import CommonKeys as Keys

from scripts.console import drop_fresh_start_line
from scripts.data import SKIPPED_KEY
from scripts.io import atomic_torch_save, atomic_write_text, keep_aside
from scripts.precision import Autocast
from scripts.run_record import RunRecord
from scripts.zones import report_zones

__all__ = [
    "ReportPrepareBatch",
    "ResumeLoader",
    "ResumableMLFlowHandler",
    "SegmentationTrainer",
    "SegmentationEvaluator",
    "ProgressBar",
    "TrainingProgress",
    "ReportBank",
    "MetricsJsonWriter",
    "loss_terms",
    "every_n_iterations",
    "latest_checkpoint",
    "AtomicCheckpointSaver",
    "BestMetricState",
    "CheckedCheckpointLoader",
    "InferenceSummary",
]

logger = logging.getLogger(__name__)


class ReportPrepareBatch(PrepareBatch):
    """Moves ``image`` and ``label`` to the device and hands the report tokens to the network as keyword arguments.

    Unlike MONAI's ``PrepareBatchExtraInput``, absent text keys are not an error: an image-only caller (MONAI
    Label, a PACS export without reports) gets ``network(image)``. A batch without ``label`` yields ``None``.

    Args:
        text_keys: network keyword → batch key, by default ``text_ids ← report_ids`` and
            ``text_mask ← report_mask``; ``{}`` for image-only networks such as MONAI's ``UNet``.
        memory_format: of the B×C×H×W image on the device; ``torch.channels_last`` (with the network's weights
            in the same format) lets the convolutions skip a layout conversion per call.
    """

    def __init__(
        self,
        text_keys: Mapping[str, str] | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        default = {"text_ids": "report_ids", "text_mask": "report_mask"}
        self.text_keys = dict(default if text_keys is None else text_keys)
        self.memory_format = memory_format

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict[str, torch.Tensor]]:
        def to(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=device, non_blocking=non_blocking, **kwargs)

        image = to(batchdata[Keys.IMAGE])
        if image.dim() == 4:
            image = image.contiguous(memory_format=self.memory_format)
        label = batchdata.get(Keys.LABEL)
        text = {arg: to(batchdata[key]) for arg, key in self.text_keys.items() if key in batchdata}
        return image, None if label is None else to(label), (), text


def _usable_handlers(handlers: Sequence | None) -> list | None:
    """The handlers of a list to attach: without ``None`` entries, and with only the first ``MLFlowHandler``.

    A rank-0 handler that a list references by id (``'@validate#best_checkpoint'``) is ``None`` on the other ranks.
    The bundle's configs track with MLflow by themselves; ``--tracking mlflow`` appends MONAI's default handler,
    which would log every value twice into the same run. Its executed-config artifact is kept.
    """
    if handlers is None:
        return None
    kept: list = []
    first: MLFlowHandler | None = None
    for handler in handlers:
        if handler is None:
            continue
        if isinstance(handler, MLFlowHandler):
            if first is None:
                first = handler
            else:
                extra = tuple(a for a in handler.artifacts if a and a not in first.artifacts)
                first.artifacts = tuple(a for a in first.artifacts if a) + extra
                logger.info("the bundle already tracks with MLflow: merged the extra MLFlowHandler into it")
                continue
        kept.append(handler)
    return kept


class ResumableMLFlowHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` that carries on a run after ``--resume True`` and never leaves one RUNNING.

    - **Which run.** With a ``run_record`` (:class:`scripts.run_record.RunRecord`), a resumed training continues
      the MLflow run its checkpoint recorded, by id, whatever ``run_name`` says now; the validation handler,
      given the same record, logs into the run the training handler chose. Without one (or when that run is
      not in this tracking store) MONAI's choice by ``run_name`` stands.
    - **Changed params.** MLflow params cannot change, and a resumed command differs from the first
      (``--resume True``, perhaps a longer ``--max_epochs``): MONAI's handler then stops the training on "Changing
      param values is not allowed". Here params already logged keep their first value and a differing new value
      is logged as the tag ``resumed.<param>``, so the run goes on and both stay visible.
    - **Ended runs.** A process that ends before its engine completed (an exception, Ctrl-C, SIGTERM, e.g. from
      torchrun) marks its run FAILED (KILLED for a signal) at exit, instead of leaving it RUNNING forever. Only
      SIGKILL leaves a run RUNNING; resuming continues it and finishes it.
    - **Readable optimizer values.** The learning rate is logged as ``lr_log10_group_<i>`` (−3 for 1e-3) rather
      than MONAI's ``lr_group_<i>``: the MLflow UI draws a constant 0.001 as 0 on a ±0.5 axis, and a cosine decay
      to 1 % spans two clear units on a log scale.
    - **The model.** With a ``model_logger`` (:class:`scripts.mlflow_model.NetworkModelLogger`), the best weights
      are logged as an MLflow model of the run when the engine completes, before the run closes. A model that cannot
      be logged is an error in the log and the run's tag ``model_not_logged``, not a lost run: its checkpoints
      are already on disk.

    Args:
        run_record: the training run's record, shared by the training and the validation handler.
        tags: set on the run when it starts (e.g. :func:`scripts.run_record.run_tags`: commit, source, data).
        tracking_params: the engine-state values logged as params (MONAI: max_epochs, epoch_length).
        model_logger: called with the run id and the tracking URI when the engine completes (None: no model).
        args, kwargs: MONAI's ``MLFlowHandler``.
    """

    def __init__(
        self,
        *args: Any,
        run_record: RunRecord | None = None,
        tags: Mapping[str, str] | None = None,
        tracking_params: Sequence[str] | None = None,
        model_logger: Callable[[str, str], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.run_record = run_record
        self.model_logger = model_logger
        self.log10_params, self.optimizer_param_names = self.optimizer_param_names, ()  # logged by this class
        self.tags = dict(tags or {})
        if tracking_params is not None:  # e.g. [] for an evaluation, where max_epochs/epoch_length say nothing
            self.default_tracking_params = list(tracking_params)
        self._engine_done = True
        self._exit_hook = False

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self._engine_done = False

    def _completed(self, engine: Engine) -> None:
        self._engine_done = True

    def start(self, engine: Engine) -> None:
        record = self.run_record
        if self.cur_run is None and record is not None:
            if record.mlflow_run_id:  # the validation handler: the run the training handler chose
                self.cur_run = self._active_run(record.mlflow_run_id)
            elif record.resumed_run_id:
                self.cur_run = self._active_run(record.resumed_run_id)
                if self.cur_run is not None:
                    logger.info("continuing MLflow run %s ('%s') of the resumed checkpoint",
                                self.cur_run.info.run_id, self.cur_run.info.run_name)
        super().start(engine)
        if record is not None and self.cur_run is not None and not record.mlflow_run_id:
            record.mlflow_run_id = self.cur_run.info.run_id
        for key, value in self.tags.items():
            self.client.set_tag(self.cur_run.info.run_id, key, str(value)[:5000])
        if not self._exit_hook:
            atexit.register(self._end_unfinished)
            _terminate_on_sigterm()
            self._exit_hook = True

    def _default_iteration_log(self, engine: Engine) -> None:
        super()._default_iteration_log(engine)
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is None or self.output_transform(engine.state.output) is None:
            return
        values = {
            f"{name}_log10_group_{i}": math.log10(float(group[name]))
            for name in self.log10_params for i, group in enumerate(optimizer.param_groups) if float(group[name]) > 0
        }
        self._log_metrics(values, step=engine.state.iteration)

    def complete(self) -> None:
        if self.model_logger is not None and self.cur_run is not None:
            run_id = self.cur_run.info.run_id
            try:
                self.model_logger(run_id, self.client.tracking_uri)
            except Exception as e:  # the training is done and saved: a model that cannot be logged must not fail it
                logger.error("MLflow model not logged for run %s: %s: %s", run_id, type(e).__name__, e)
                self.client.set_tag(run_id, "model_not_logged", f"{type(e).__name__}: {e}"[:5000])
        super().complete()

    def _active_run(self, run_id: str):
        """The run ``run_id`` of this tracking store, set RUNNING again, or None (with a warning) when it is not
        there or was deleted."""
        import mlflow

        try:
            run = self.client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            logger.warning("MLflow run %s (recorded in the resumed checkpoint) is not in %s: a new run is started",
                           run_id, getattr(self.client, "tracking_uri", "this tracking store"))
            return None
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        return run

    def _end_unfinished(self) -> None:
        """At interpreter exit: the run of an engine that did not complete is marked FAILED, or KILLED after a
        signal or Ctrl-C, unless something else already ended it."""
        if self.cur_run is None or self._engine_done:
            return
        try:
            run_id = self.cur_run.info.run_id
            if self.client.get_run(run_id).info.status != "RUNNING":
                return
            last = getattr(sys, "last_value", None)
            killed = _SIGNALLED or isinstance(last, KeyboardInterrupt)
            self.client.set_terminated(run_id, "KILLED" if killed else "FAILED")
            logging.raiseExceptions = False  # at exit a console stream may already be closed (a test runner's)
            logger.info("MLflow run %s marked %s: the run ended before it completed", run_id,
                        "KILLED" if killed else "FAILED")
        except Exception as e:  # the store may be gone at exit: never mask the error that ended the run
            logger.warning("could not mark MLflow run as ended: %s", e)

    def _log_params(self, params: dict[str, Any]) -> None:
        if not self.cur_run:
            raise ValueError("Current Run is not Active to log params")
        import mlflow

        run_id = self.cur_run.info.run_id
        logged = self.client.get_run(run_id).data.params
        new = [mlflow.entities.Param(k, str(v)) for k, v in params.items() if k not in logged]
        changed = {k: str(v) for k, v in params.items() if k in logged and logged[k] != str(v)}
        if changed:
            logger.info("resumed MLflow run %s: %s differ from the first run; logged as resumed.* tags",
                        run_id, ", ".join(sorted(changed)))
        tags = [mlflow.entities.RunTag(f"resumed.{k}", v[:5000]) for k, v in changed.items()]
        self.client.log_batch(run_id=run_id, metrics=[], params=new, tags=tags)


_SIGNALLED = False


def _terminate_on_sigterm() -> None:
    """SIGTERM (torchrun, a scheduler, ``kill``) ends the process through Python's normal exit, so that exit hooks
    run; Python's default would end it at once. Only where nobody else handles SIGTERM, in the main thread."""

    def handler(signum: int, frame: Any) -> None:
        global _SIGNALLED
        _SIGNALLED = True
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)


class _NamedTerms:
    """Adapts a loss returning ``{"loss": total, "loss_<term>": ...}`` to the engine, keeping the terms."""

    def __init__(self, loss_function: Callable) -> None:
        self.loss_function = loss_function
        self.terms: dict[str, torch.Tensor] = {}

    def __call__(self, pred: Any, target: torch.Tensor) -> torch.Tensor:
        out = self.loss_function(pred, target)
        if not isinstance(out, Mapping):
            self.terms = {}
            return out
        self.terms = {k: v.detach() for k, v in out.items() if k != Keys.LOSS}
        return out[Keys.LOSS]


def _device_type(kwargs: Mapping[str, Any]) -> str:
    """The engine's device type; refuses MONAI's ``amp``, which ``compute_dtype`` replaces (MONAI's engines
    autocast only on CUDA, :class:`scripts.precision.Autocast` on any device)."""
    if "amp" in kwargs or "amp_kwargs" in kwargs:
        raise TypeError("set the config's `precision` (auto, bf16, fp16, fp32) instead of `amp`")
    device = kwargs.get("device")
    return torch.device(device).type if device is not None else "cpu"


def _autocast_forward(engine: SupervisedTrainer | SupervisedEvaluator, device_type: str,
                      compute_dtype: torch.dtype | None) -> None:
    """Runs the engine's inferer (its forward pass) under ``compute_dtype`` autocast, outputs back in float32."""
    engine.compute_dtype = compute_dtype
    engine.inferer = Autocast(engine.inferer, device_type, compute_dtype)


class SegmentationTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` for networks with auxiliary training outputs and losses with named terms.

    - The loss function may return a mapping with the total under ``"loss"`` and each term under its own key
      (``"loss_dice"``, ``"loss_bce"``, ...); every term lands in ``engine.state.output`` for the handlers.
    - In training mode the network may return a mapping with the logits under ``"pred"`` and whatever its losses
      need; the loss receives the whole mapping, while ``engine.state.output["pred"]`` holds the logits only,
      so post-processing and metrics see a plain B×C×H×W tensor.
    - ``compute_dtype`` (:func:`scripts.precision.autocast_dtype`) runs the forward pass under autocast; the
      loss, backward and optimizer step see float32 outputs. fp16 on CUDA goes through MONAI's ``amp`` with its
      gradient scaler.

    Takes the arguments of ``SupervisedTrainer`` except ``amp``/``amp_kwargs``, which ``compute_dtype`` sets.
    """

    def __init__(
        self,
        *args: Any,
        train_handlers: Sequence | None = None,
        compute_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        device_type = _device_type(kwargs)
        if compute_dtype is torch.float16 and device_type == "cuda":  # fp16 needs MONAI's gradient scaler
            kwargs.update(amp=True, amp_kwargs={"dtype": torch.float16})
        super().__init__(*args, train_handlers=_usable_handlers(train_handlers), **kwargs)
        _autocast_forward(self, device_type, compute_dtype)
        drop_fresh_start_line(self.logger)
        self.loss_function = _NamedTerms(self.loss_function)
        # before MODEL_COMPLETED, where MONAI decollates and post-processes the output
        self.add_event_handler(IterationEvents.LOSS_COMPLETED, self._unpack_output)

    def _unpack_output(self, engine: SupervisedTrainer) -> None:
        output = engine.state.output
        if isinstance(output[Keys.PRED], Mapping):
            output[Keys.PRED] = output[Keys.PRED][Keys.PRED]
        output.update(self.loss_function.terms)


class SegmentationEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` that, like :class:`SegmentationTrainer`, merges a duplicate MLflow handler and runs
    the forward pass in ``compute_dtype`` (predictions come back in float32)."""

    def __init__(
        self,
        *args: Any,
        val_handlers: Sequence | None = None,
        compute_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        device_type = _device_type(kwargs)
        super().__init__(*args, val_handlers=_usable_handlers(val_handlers), **kwargs)
        _autocast_forward(self, device_type, compute_dtype)
        self.add_event_handler(Events.STARTED, _reset_counts)
        drop_fresh_start_line(self.logger)

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict:
        """MONAI's evaluation step, after taking out the entries the dataset could not load
        (:class:`scripts.data.SkipFailedDataset`): they are counted in ``engine.state.skipped``; a batch without
        any loaded entry skips the network and the post-processing."""
        if isinstance(batchdata, Mapping) and SKIPPED_KEY in batchdata:
            engine.state.skipped.extend(batchdata[SKIPPED_KEY])
            batchdata = {k: v for k, v in batchdata.items() if k != SKIPPED_KEY}
            engine.state.batch = batchdata
            if Keys.IMAGE not in batchdata:
                return {}
        engine.state.segmented += len(batchdata[Keys.IMAGE])
        return super()._iteration(engine, batchdata)


def _reset_counts(engine: Engine) -> None:
    engine.state.skipped = []
    engine.state.segmented = 0


class InferenceSummary:
    """Says, when inference ends, how many images were segmented, how many were skipped (each was named in a
    warning as it happened) and where the outputs are; raises when none could be segmented, so that the
    command fails instead of exiting 0 with nothing written.

    Args:
        output_dir: where the outputs were written.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = output_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        skipped, done = engine.state.skipped, engine.state.segmented
        if skipped and not done:
            raise RuntimeError(
                f"inference: none of the {len(skipped)} image(s) could be segmented, e.g. {skipped[0]}"
            )
        line = f"inference: {done} image(s) segmented"
        if skipped:
            line += f", {len(skipped)} skipped (named in the warnings above)"
        logger.info("%s; outputs in %s", line, os.path.abspath(self.output_dir))


class TrainingProgress:
    """Tells an object with ``set_progress(epochs: float)`` (a loss with a warm-up, e.g.
    :class:`scripts.losses.TMCALoss`) how far training is, in fractional epochs, before every iteration.

    Read from the engine's state, so a resumed run continues its schedule where it stopped. A target without
    ``set_progress`` (a loss without a schedule) is left alone.

    Args:
        target: the object to inform.
    """

    def __init__(self, target: Any) -> None:
        self.target = target

    def attach(self, engine: Engine) -> None:
        if callable(getattr(self.target, "set_progress", None)):
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.target.set_progress((engine.state.iteration - 1) / max(engine.state.epoch_length or 1, 1))


class ReportBank:
    """Fills a network's report bank (``TMCA(report_bank=True)``) with every distinct report of the training
    datalist, tokenised with the config's tokenizer, when training starts.

    A network without a bank switched on is left alone (one log line says so), as is one whose training datalist
    holds no report (a warning says so; MONAI Label trains from image + label lists). A bank whose trainer does not hand
    the network the batch's zone raster (``zones`` among ``prepare_batch#text_keys``) matches reports by their token
    ids alone, so a rephrased report has no positive in the bank and takes no part in the bank term: a warning says
    so when training starts.

    Args:
        network: the network module (``network_def``, not a DDP wrapper), with ``set_report_bank``.
        datalist: the training datalist (dicts with a ``report_key`` text).
        tokenizer: the config's ``TokenizeReport``.
        report_key: the report's key in the datalist entries.
    """

    def __init__(self, network: torch.nn.Module, datalist: Sequence[Mapping], tokenizer: Callable,
                 report_key: str = "report") -> None:
        self.network, self.datalist, self.tokenizer, self.report_key = network, datalist, tokenizer, report_key

    def attach(self, engine: Engine) -> None:
        if not getattr(self.network, "report_bank", False):
            logger.info("report bank: off for %s", type(self.network).__name__)
            return
        engine.add_event_handler(Events.STARTED, self)
        text_keys = getattr(getattr(engine, "prepare_batch", None), "text_keys", None)
        if text_keys is not None and "zones" not in text_keys:
            logger.warning(
                "report bank: prepare_batch#text_keys %s does not pass 'zones', so the bank matches reports by their "
                "token ids only (a rephrased report takes no part in the bank term); add zones: zones to use the "
                "lung-zone soft targets", dict(text_keys))

    def __call__(self, engine: Engine | None = None) -> None:
        texts = sorted({e[self.report_key].strip() for e in self.datalist
                        if isinstance(e.get(self.report_key), str) and e[self.report_key].strip()})
        if not texts:  # e.g. MONAI Label's image + label lists: no report has anything to align with
            logger.warning("report bank: the training datalist has no report, so the bank stays empty (the "
                           "alignment takes only samples with a report, within their batch)")
            return
        pairs = [self.tokenizer(t) for t in texts]
        flags = [report_zones(t) for t in texts]
        flags = np.stack([z.reshape(-1) if z is not None else np.zeros(6, dtype=bool) for z in flags])
        self.network.set_report_bank(
            torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), torch.as_tensor(flags)
        )
        logger.info("report bank: %d distinct training reports", len(texts))


class ProgressBar(_IgniteProgressBar):
    """Ignite's tqdm progress bar, attachable from a config handler list, showing the running loss.

    Args:
        output_transform: values shown beside the bar.
        every: refresh every this many iterations; reading the loss is a host sync on a GPU, so it is not done
            at every step.
    """

    def __init__(self, output_transform: Callable | None = None, every: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._output_transform = output_transform
        self.every = int(every)

    def attach(self, engine, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("output_transform", self._output_transform)
        kwargs.setdefault("event_name", Events.ITERATION_COMPLETED(every=self.every))
        super().attach(engine, *args, **kwargs)


def every_n_iterations(n: int) -> Callable[[Engine, int], bool]:
    """Event filter for iteration-level logging handlers (``iteration_log``): True every ``n`` iterations and at
    the last iteration of each epoch, so that an epoch shorter than ``n`` still leaves a point on the curves."""

    def due(engine: Engine, iteration: int) -> bool:
        length = engine.state.epoch_length
        return iteration % int(n) == 0 or bool(length and iteration % length == 0)

    return due


class MetricsJsonWriter:
    """Writes an engine's final metrics, with extra fields (split, checkpoint, ...), to a JSON file on completion.

    Beside MONAI's ``MetricsSaver`` (``metrics.csv``, per-image ``<metric>_raw.csv``, summaries), not instead of it:
    ``MetricsSaver`` writes CSV only, and ``python -m bundle results``, the study's kept figures and MLflow's
    artifact want one JSON object that says which split and checkpoint the figures belong to. Written atomically.

    Args:
        path: output file; its folder is created.
        extra: JSON-serialisable fields stored beside ``"metrics"``.
    """

    def __init__(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = {k: float(v) for k, v in engine.state.metrics.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({**self.extra, "metrics": metrics}, indent=2, default=str))


def loss_terms(output: Any, prefix: str = "") -> dict[str, float]:
    """``output_transform`` for trackers: every ``loss*`` value of a trainer's output as a float, keys prefixed."""
    first = output[0] if isinstance(output, (list, tuple)) else output
    return {f"{prefix}{k}": float(v) for k, v in first.items() if str(k).startswith(Keys.LOSS)}


_EPOCH_RE = re.compile(r"(\d+)\.pt$")


def _is_complete(path: Path) -> bool:
    """Whether a ``torch.save`` file is whole: its zip archive opens and every member's CRC checks out."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> str:
    """Path of the newest complete ``<prefix>*<epoch>.pt`` training checkpoint in ``ckpt_dir``, for resuming.

    A newer file that is truncated or corrupt (a crash while it was written by an older version of this bundle, a
    full disk) is skipped with a warning naming it, and the previous one is taken.

    Raises:
        FileNotFoundError: when there is none, naming the folder.
    """
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob(f"{prefix}*.pt") if (m := _EPOCH_RE.search(p.name))]
    if not found:
        raise FileNotFoundError(f"no '{prefix}*.pt' training checkpoint to resume from in {ckpt_dir}")
    for _, path in sorted(found, reverse=True):
        if _is_complete(path):
            return str(path)
        logger.warning("resume: %s is truncated or corrupt; skipped", path)
    raise FileNotFoundError(f"every '{prefix}*.pt' training checkpoint in {ckpt_dir} is truncated or corrupt")


class _AtomicDiskSaver(DiskSaver):
    """ignite's ``DiskSaver`` that writes whole files only (:func:`scripts.io.atomic_torch_save`) and removes
    the files it replaces only after the new one is on disk.

    ignite removes an older checkpoint before it writes the newer one, and MONAI's saver writes in place: a kill in
    between leaves no checkpoint, or a truncated one.

    Args:
        dirname: the folder.
        filename: a fixed file name (``model.pt``), or None for ignite's names.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, keep_replaced: bool = False) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=False)
        self.filename = filename
        self.keep_replaced = keep_replaced
        self._pending: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename or filename
        dest = Path(self.dirname) / name
        if self.keep_replaced and dest.is_file():  # a file this run did not write: kept under another name
            kept = keep_aside(dest)
            logger.warning("%s existed before this run (e.g. the shipped model): kept as %s", dest, kept.name)
        self.keep_replaced = False
        atomic_torch_save(checkpoint, dest)
        for old in self._pending:
            if old != name:
                (Path(self.dirname) / old).unlink(missing_ok=True)
        self._pending = []

    def remove(self, filename: str) -> None:
        self._pending.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) whose files are written whole or not at all: a temporary file,
    fsynced, renamed; the checkpoint it replaces is deleted only after the new one is complete. A kill at any
    moment leaves the previous ``model.pt`` and the previous training checkpoint loadable.

    Args:
        replaces: the training checkpoint this run resumed from (``train#resume_from``): ignite counts ``n_saved``
            within one process only, so without this every resume would leave its starting checkpoint behind. It
            is deleted once the first new interval checkpoint is complete.
        keep_replaced: a fixed-name file (``model.pt``) that exists before this saver first writes it was not
            written by this run (the shipped model, another run's best): it is renamed
            ``<name>.replaced-<time>.pt`` with a warning instead of being overwritten.
        args, kwargs: MONAI's ``CheckpointSaver``.
    """

    def __init__(
        self,
        *args: Any,
        replaces: str | os.PathLike | None = None,
        keep_replaced: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                old = checkpoint.save_handler
                fixed = getattr(old, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(old.dirname, fixed, keep_replaced and fixed is not None)
        if replaces is not None and self._interval_checkpoint is not None:
            handler = self._interval_checkpoint.save_handler
            if Path(replaces).resolve().parent == Path(handler.dirname).resolve():
                handler.remove(Path(replaces).name)

    def state_dict(self) -> dict[str, list[tuple[float, str]]]:
        """The best key-metric scores saved so far, as ``[(score, filename)]``: a training checkpoint that holds
        them lets a resumed run replace ``model.pt`` only with a better model, as the run before the interruption
        would have (ignite forgets them with the process)."""
        if self._key_metric_checkpoint is None:
            return {"best": []}
        return {"best": [(float(p), str(f)) for p, f in self._key_metric_checkpoint.state_dict()["_saved"]]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._key_metric_checkpoint is not None:
            self._key_metric_checkpoint.load_state_dict({"_saved": [tuple(item) for item in state["best"]]})


class ResumableEarlyStopHandler(EarlyStopHandler):
    """MONAI's ``EarlyStopHandler`` (same arguments) whose patience counter and best score go into the training
    checkpoint (``train#checkpoint_state``): without them a resumed run would start counting its patience from
    zero and compare against no best score."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pending: Mapping[str, Any] | None = None
        super().__init__(*args, **kwargs)

    def set_trainer(self, trainer: Engine) -> None:
        super().set_trainer(trainer)
        if self._pending is not None:
            self._handler.load_state_dict(self._pending)
            self._pending = None

    def state_dict(self) -> dict[str, Any]:
        if self._handler is None:
            raise RuntimeError("ResumableEarlyStopHandler: set_trainer() before saving its state")
        state = dict(self._handler.state_dict())
        if state["best_score"] is not None:  # a numpy or tensor score would not load with weights_only
            state["best_score"] = float(state["best_score"])
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._handler is None:  # restored before set_trainer: applied when the trainer is set
            self._pending = dict(state)
        else:
            self._handler.load_state_dict(state)


class BestMetricState:
    """The evaluator's best key-metric score and its epoch (``state.best_metric``, ``state.best_metric_epoch``) as
    training-checkpoint state (``train#checkpoint_state``).

    MONAI's workflow sets both to -1 in every process, so without this a resumed run's validation log ("best
    value: … at epoch: …") names the best since the resume, and can name an epoch whose model is not the
    ``model.pt`` that the resumed best-model saver kept.

    Args:
        evaluator: the validation evaluator (``validate#evaluator``).
    """

    def __init__(self, evaluator: Engine) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict[str, float | int]:
        state = self.evaluator.state
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` (same arguments) whose errors name the checkpoint and the problem: a missing,
    empty or truncated file (MONAI: a bare ``EOFError`` or ``PytorchStreamReader`` error) or weights that do not
    fit the network (``checkpoint <path>: does not fit ...``)."""

    def __call__(self, engine: Engine) -> None:
        path = Path(self.load_path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path}: not found (train first, or set --ckpt_dir)")
        if path.stat().st_size == 0 or not _is_complete(path):
            raise ValueError(f"checkpoint {path}: empty, truncated or not a PyTorch checkpoint "
                             f"({path.stat().st_size} bytes)")
        try:
            super().__call__(engine)
        except RuntimeError as e:
            raise RuntimeError(f"checkpoint {path}: does not fit the network: {e}") from e


# the state objects a training checkpoint of an earlier version may lack, and what starting each afresh means
_AFRESH: dict[type, str] = {
    AtomicCheckpointSaver: "the first validation replaces model.pt",
    ResumableEarlyStopHandler: "the early-stop patience counts from 0",
    BestMetricState: "the validation log's best value counts from the resume",
}


class ResumeLoader(CheckedCheckpointLoader):
    """The checkpoint loader for ``--resume True`` that also checks the optimizer state it restored.

    Network weights load by name, but optimizer moments load by parameter position: a checkpoint written by
    another version of the network (parameters added, removed or registered in another order) loads without
    complaint and then fails in the first optimizer step with a bare tensor-size error. This names the checkpoint
    and says what to do instead.
    """

    def __call__(self, engine: Engine) -> None:
        complete = Path(self.load_path).is_file() and _is_complete(Path(self.load_path))
        # mmap: only the key names are read here, not the tensors
        saved = torch.load(self.load_path, map_location="cpu", weights_only=True, mmap=True) if complete else None
        for name, obj in list(self.load_dict.items()):
            if obj is None:
                self.load_dict.pop(name)  # a rank-0 handler (the best-model saver) on another rank
            elif isinstance(obj, RunRecord) and obj.resumed is None:
                self.load_dict.pop(name)  # a checkpoint taken with --resume_foreign that holds no record
            elif isinstance(obj, tuple(_AFRESH)) and saved is not None and name not in saved:
                self.load_dict.pop(name)
                meaning = next(text for kind, text in _AFRESH.items() if isinstance(obj, kind))  # subclasses too
                logger.warning("%s: written before the checkpoint kept '%s': the resumed run starts it afresh "
                               "(%s)", self.load_path, name, meaning)
        super().__call__(engine)
        for name, obj in self.load_dict.items():
            if not isinstance(obj, torch.optim.Optimizer):
                continue
            params = [p for group in obj.param_groups for p in group["params"]]
            bad = sum(
                1 for p in params
                if any(torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape for v in obj.state.get(p, {}).values())
            )
            if bad:
                raise ValueError(
                    f"{self.load_path}: the '{name}' state of {bad} of {len(params)} parameters does not fit the "
                    "network (the checkpoint was written by another version of it): start a new run with "
                    "--resume False in another ckpt_dir"
                )
