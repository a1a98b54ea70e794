"""``python -m bundle ship``: a trained run's best network becomes the bundle's shipped model.

Shipping by hand means converting the weights, copying them over ``models/model.pt`` and typing the validation
figures into ``configs/metadata.json``: the figures then describe the float32 file that was evaluated, not the
float16 file that ships, and nothing ties them to the run that trained it. This does every step from the run
folder and the bundle's own configs, and changes nothing in the bundle until every step has passed:

1. the run's best weights (``<run>/models/model.pt``) in float16 (half the size; loading casts them back to the
   network's float32), refused when a value does not fit float16;
2. fitted strictly into the network ``configs/inference.yaml`` builds: a shipped file must be what inference
   loads, so a run trained with other switches than the configs' defaults is refused (set the defaults first);
3. at most ``max_model_mb`` (the model zoo's limit for a committed ``model.pt`` is 25 MB);
4. written to ``<run>/shipped/model.pt`` and evaluated *there*, through ``monai.bundle run evaluating`` with
   ``configs/train.yaml`` + ``configs/evaluate.yaml``, on the validation datalist and on any extra named datalists
   (e.g. the no-report list of ``python -m bundle freetext``); each ``metrics.json`` must name that file's SHA-256;
5. then ``models/model.pt`` is replaced (a different previous file is kept as ``model.replaced-<time>.pt``) and
   ``eval_metrics`` of ``configs/metadata.json`` rewritten, both atomically, with the figures, the file's SHA-256
   and the training command and status the run's MLflow store recorded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bundle.load import BUNDLE_ROOT, bundle_parser, checkpoint_weights, fit_weights
from scripts.io import atomic_torch_save, atomic_write, atomic_write_text, file_sha256, keep_aside
from scripts.run_record import read_run_record

__all__ = ["ShipError", "half_weights", "training_run", "ship"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
# figures of the main evaluation that go into eval_metrics: the segmentation and report-consistency ones (the
# alignment health, val_align_*, describes training and stays in the run's metrics.json and MLflow)
_SHIPPED_PREFIXES = ("val_dice", "val_iou", "val_outside", "val_missed")
_EXTRA_FIGURES = ("val_dice_mean", "val_dice_pooled")


class ShipError(RuntimeError):
    """A step of shipping failed; the bundle's ``models/model.pt`` and ``metadata.json`` are unchanged."""


def half_weights(weights: Mapping[str, Any], source: PathLike) -> dict[str, Any]:
    """``weights`` with every floating-point tensor in float16, other entries as they are.

    Raises:
        ShipError: a finite value that float16 cannot hold (beyond ±65504 it becomes ±inf: a silently broken
            network), naming ``source`` and the tensor.
    """
    out: dict[str, Any] = {}
    for key, value in weights.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            half = value.to(torch.float16)
            if not torch.equal(torch.isfinite(half), torch.isfinite(value)):
                big = value[torch.isfinite(value)].abs().max().item()
                raise ShipError(f"{source}: {key} holds values up to {big:.4g}, beyond float16's 65504")
            value = half
        out[key] = value
    return out


def training_run(run_dir: PathLike, tracking_uri: str | None = None) -> dict[str, str]:
    """Where the weights of ``<run_dir>/models`` come from, as the run's MLflow run recorded it:
    ``training_command`` (its ``command`` parameter) and ``training_status`` (FINISHED, or RUNNING, KILLED, FAILED
    for a run that has not ended well: shipping its best model so far is then said in a warning). Found through the
    run record of the newest ``checkpoint_*.pt``; empty (with a warning) when there is no training checkpoint, no
    record, no store or no such run.

    Args:
        tracking_uri: the run's MLflow store (default: ``<run_dir>/mlruns.db``, ``bundle/qata.sh``'s layout).
    """
    models = Path(run_dir) / "models"
    ckpts = sorted(models.glob("checkpoint_*.pt"), key=os.path.getmtime)
    record = read_run_record(ckpts[-1]) if ckpts else None
    run_id = (record or {}).get("mlflow_run_id")
    store = Path(run_dir) / "mlruns.db"
    uri = tracking_uri or (f"sqlite:///{store.resolve()}" if store.is_file() else None)
    if not run_id or uri is None:
        why = "no training checkpoint with a run record" if not run_id else f"no MLflow store ({store})"
        logger.warning("ship: the training run of %s is not known (%s); eval_metrics will not name its command",
                       run_dir, why)
        return {}
    import mlflow

    try:
        run = mlflow.MlflowClient(uri).get_run(run_id)
    except Exception as e:  # an MLflow store of another version, a deleted run: the command is optional
        logger.warning("ship: MLflow run %s not readable in %s (%s: %s); eval_metrics will not name its command",
                       run_id, uri, type(e).__name__, e)
        return {}
    if run.info.status != "FINISHED":
        logger.warning("ship: training run %s of %s is %s, not FINISHED: its best model so far is shipped", run_id,
                       run_dir, run.info.status)
    found = {"training_command": run.data.params.get("command"), "training_status": run.info.status}
    return {k: v for k, v in found.items() if v}


def _evaluate(
    root: Path, ckpt_dir: Path, sha: str, name: str, dataset_dir: Path, datalist: Path, overrides: Sequence[str]
) -> dict[str, float]:
    """``monai.bundle run evaluating`` of ``ckpt_dir/model.pt`` (whose SHA-256 is ``sha``) on ``datalist``: the
    command a user runs, in a process of its own (a failure or a leak there cannot touch this one); returns its
    metrics."""
    out = ckpt_dir / f"eval_{name}"
    configs = [str(root / "configs" / "train.yaml"), str(root / "configs" / "evaluate.yaml")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", str(configs),
           "--meta_file", str(root / "configs" / "metadata.json"), "--bundle_root", str(root),
           "--dataset_dir", str(dataset_dir), "--datalist", str(datalist), "--ckpt_dir", str(ckpt_dir),
           "--output_dir", str(out), "--tracking_uri", f"sqlite:///{(ckpt_dir / 'mlruns.db').resolve()}",
           "--run_name", f"ship_eval_{name}", "--alignment_health", "False", *overrides]
    # the configs' `scripts` from the bundle shipped into, else this tool's own
    path = [str(root), str(BUNDLE_ROOT), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    logger.info("ship: evaluating %s on %s (%s)", ckpt_dir / "model.pt", datalist, name)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise ShipError(f"evaluation '{name}' on {datalist} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads((out / "metrics.json").read_text())
    if result.get("checkpoint_sha256") != sha:
        raise ShipError(f"{out / 'metrics.json'} does not name {ckpt_dir / 'model.pt'} by its SHA-256")
    return result["metrics"]


def _figure(name: str, value: float) -> float | None:
    """A figure for metadata.json, 4 decimals; an undefined one (NaN: e.g. ``val_outside_named`` of a network
    that predicts no foreground) becomes null with a warning, since JSON has no NaN (``json.dumps`` would write
    ``NaN``, which strict readers refuse)."""
    if not math.isfinite(value):
        logger.warning("ship: %s is %s (undefined on this evaluation): written as null", name, value)
        return None
    return round(value, 4)


def _keep_replaced(dest: Path, new_sha: str) -> Path | None:
    """Moves a ``dest`` whose content differs from the file about to ship aside; returns its new path."""
    if not dest.is_file() or file_sha256(dest) == new_sha:
        return None
    kept = keep_aside(dest)
    logger.warning("ship: the previous %s is kept as %s", dest, kept.name)
    return kept


def ship(
    run_dir: PathLike,
    dataset_dir: PathLike,
    datalist: PathLike | None = None,
    extra_datalists: Mapping[str, PathLike] | None = None,
    dataset: str | None = None,
    root: PathLike = BUNDLE_ROOT,
    max_model_mb: float | None = 25.0,
    overrides: Sequence[str] = (),
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Ships the best network of the training run folder ``run_dir`` as ``<root>/models/model.pt`` with its
    validation figures as ``eval_metrics`` in ``<root>/configs/metadata.json`` (steps in the module docstring).

    Args:
        run_dir: a training run folder: ``models/model.pt`` (its best weights), ``models/checkpoint_*.pt`` and
            ``mlruns.db`` (for the training command; optional), as ``bundle/qata.sh`` lays it out.
        dataset_dir: the evaluation's ``dataset_dir`` (where the datalist's relative paths start).
        datalist: the datalist whose validation split is evaluated (default ``<dataset_dir>/datalist.json``).
        extra_datalists: name → datalist also evaluated (validation split); their ``val_dice_mean`` and
            ``val_dice_pooled`` ship as ``val_dice_mean_<name>``, ``val_dice_pooled_<name>``.
        dataset: what ``eval_metrics["dataset"]`` says the figures are (default: the datalist's path).
        root: the bundle root to ship into.
        max_model_mb: refuse a float16 file larger than this (None: no limit).
        overrides: ``monai.bundle`` arguments for every evaluation (e.g. ``["--device", "cuda:0"]``).
        tracking_uri: the run's MLflow store, for its training command (default ``<run_dir>/mlruns.db``).

    Returns:
        the new ``eval_metrics``.

    Raises:
        FileNotFoundError, ValueError, RuntimeError: the run's weights are missing, unreadable or do not fit the
            inference network (:mod:`scripts.weights`, naming the file).
        ShipError: float16 overflow, a file over the size limit, or a failed evaluation. Nothing in ``root`` is
            changed by a failed call.
    """
    root, run_dir, dataset_dir = Path(root).resolve(), Path(run_dir).resolve(), Path(dataset_dir).resolve()
    datalist = Path(datalist).resolve() if datalist else dataset_dir / "datalist.json"
    source = run_dir / "models" / "model.pt"
    weights = half_weights(checkpoint_weights(source), source)
    network = bundle_parser(root / "configs" / "inference.yaml", root=root).get_parsed_content("network_def")
    try:
        fit_weights(network, weights, source)
    except RuntimeError as e:
        raise RuntimeError(f"{e}\n(the run was trained with other network switches than configs/inference.yaml's "
                           "defaults: make the defaults the run's before shipping it)") from e
    staged = run_dir / "shipped" / "model.pt"
    atomic_torch_save(weights, staged)
    size_mb = staged.stat().st_size / 1e6
    if max_model_mb is not None and size_mb > max_model_mb:
        raise ShipError(f"{staged} is {size_mb:.1f} MB, over the {max_model_mb} MB limit")
    sha = file_sha256(staged)

    lists = {"validation": datalist, **{k: Path(v).resolve() for k, v in (extra_datalists or {}).items()}}
    results = {name: _evaluate(root, staged.parent, sha, name, dataset_dir, path, overrides) for name, path in lists.items()}
    eval_metrics: dict[str, Any] = {"dataset": dataset or f"validation split of {datalist}", "model_sha256": sha}
    eval_metrics.update(training_run(run_dir, tracking_uri))
    figures = {k: v for k, v in results.pop("validation").items() if k.startswith(_SHIPPED_PREFIXES)}
    for name, metrics in results.items():
        figures.update({f"{k}_{name}": metrics[k] for k in _EXTRA_FIGURES if k in metrics})
    eval_metrics.update({k: _figure(k, v) for k, v in figures.items()})

    meta_path = root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    dest = root / "models" / "model.pt"
    _keep_replaced(dest, sha)
    data = staged.read_bytes()
    atomic_write(dest, lambda f: f.write(data))
    meta["eval_metrics"] = eval_metrics
    atomic_write_text(meta_path, json.dumps(meta, indent=4) + "\n")
    logger.info("ship: %s (%.1f MB, sha256 %s) and eval_metrics of %s written", dest, size_mb, sha[:12], meta_path)
    return eval_metrics
