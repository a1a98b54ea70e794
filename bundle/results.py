"""Results tables from evaluation outputs: the ``metrics.json`` files that ``configs/evaluate.yaml`` writes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

__all__ = ["COLUMNS", "load_metrics", "results_table"]

# metric key in metrics.json -> column name in docs/results.md
COLUMNS = {
    "val_dice_mean": "dice_mean",
    "val_dice_pooled": "dice_pooled",
    "val_iou_mean": "iou_mean",
    "val_iou_pooled": "iou_pooled",
    "val_outside_named": "outside_named ↓",
    "val_missed_zones": "missed_zones ↓",
}


def load_metrics(path: str | Path) -> dict[str, float]:
    """The metrics of one evaluation; a file without all of :data:`COLUMNS` is an error naming it."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())["metrics"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not an evaluation metrics.json ({e})") from e
    missing = sorted(set(COLUMNS) - set(metrics))
    if missing:
        raise ValueError(f"{path}: missing metrics {', '.join(missing)}")
    return {k: float(metrics[k]) for k in COLUMNS}


def results_table(paths: Iterable[str | Path], baseline: str | None = None) -> str:
    """A markdown table, one row per ``<run>/eval_val/metrics.json`` (named by ``<run>``), best Dice first.

    Args:
        paths: metrics.json files; a row is named by the folder above the file's own folder.
        baseline: a row name; adds a column with each row's ``dice_mean`` minus the baseline's.
    """
    rows = {Path(p).parent.parent.name: load_metrics(p) for p in paths}
    if baseline is not None and baseline not in rows:
        raise ValueError(f"baseline {baseline!r} is not among the rows: {', '.join(sorted(rows))}")
    head = ["run", *COLUMNS.values()] + ([f"Δ dice_mean vs {baseline}"] if baseline else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in sorted(rows.items(), key=lambda kv: -kv[1]["val_dice_mean"]):
        cells = [name, *(f"{m[k]:.4f}" for k in COLUMNS)]
        if baseline:
            cells.append(f"{m['val_dice_mean'] - rows[baseline]['val_dice_mean']:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
