"""Results tables from evaluation outputs: the ``metrics.json`` files that ``configs/evaluate.yaml`` writes."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable
from pathlib import Path

__all__ = ["COLUMNS", "load_metrics", "results_table", "run_name", "seed_table"]

_SEED_RE = re.compile(r"^(?P<row>.+)_s(?P<seed>\d+)$")

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


def run_name(path: str | Path) -> str:
    """The run a metrics file belongs to: ``<run>/eval_val/metrics.json`` (as ``bundle/qata.sh`` writes it) is
    ``<run>``; any other file, e.g. ``docs/results/issue19/<run>.json`` (copies kept with the docs), is its stem."""
    path = Path(path)
    return path.parent.parent.name if path.name == "metrics.json" else path.stem


def results_table(paths: Iterable[str | Path], baseline: str | None = None) -> str:
    """A markdown table, one row per ``<run>/eval_val/metrics.json`` (named by ``<run>``), best Dice first.

    Args:
        paths: metrics.json files; a row is named by the folder above the file's own folder.
        baseline: a row name; adds a column with each row's ``dice_mean`` minus the baseline's.
    """
    rows = {run_name(p): load_metrics(p) for p in paths}
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


def _row_and_seed(run: str) -> tuple[str, int]:
    m = _SEED_RE.match(run)
    if m is None:
        raise ValueError(f"run {run!r} is not named <row>_s<seed>")
    return m["row"], int(m["seed"])


def seed_table(paths: Iterable[str | Path], baseline: str | None = None) -> str:
    """A markdown table over seeds: one row per ``<row>`` of runs named ``<row>_s<seed>`` (the folder above each
    ``eval_val``), every metric as mean ± sd over its seeds (sample sd; a single seed shows ``± —``), then the
    per-seed ``dice_mean`` values in seed order, best mean Dice first.

    Args:
        paths: metrics.json files of runs named ``<row>_s<seed>``.
        baseline: a row name; adds the difference of each row's mean ``dice_mean`` to the baseline's, and how many
            of the seeds both rows share the row is ahead in.
    """
    rows: dict[str, dict[int, dict[str, float]]] = {}
    for p in paths:
        row, seed = _row_and_seed(run_name(p))
        if seed in rows.setdefault(row, {}):
            raise ValueError(f"{p}: seed {seed} of {row} given twice")
        rows[row][seed] = load_metrics(p)
    if baseline is not None and baseline not in rows:
        raise ValueError(f"baseline {baseline!r} is not among the rows: {', '.join(sorted(rows))}")

    def mean_sd(values: list[float]) -> str:
        if len(values) < 2:  # one seed has no spread to show: "± 0.0000" would read as a measured one
            return f"{statistics.fmean(values):.4f} ± —"
        return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"

    def dice(row: str) -> float:
        return statistics.fmean(m["val_dice_mean"] for m in rows[row].values())

    head = ["row", "seeds", *COLUMNS.values(), "dice_mean per seed"]
    if baseline:
        head += [f"Δ dice_mean vs {baseline}", "seeds ahead"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(rows, key=lambda r: -dice(r)):
        seeds = sorted(rows[row])
        cells = [row, str(len(seeds))]
        cells += [mean_sd([rows[row][s][k] for s in seeds if not math.isnan(rows[row][s][k])] or [math.nan])
                  for k in COLUMNS]
        cells.append(", ".join(f"s{s} {rows[row][s]['val_dice_mean']:.4f}" for s in seeds))
        if baseline == row:
            cells += ["—", "—"]
        elif baseline:
            shared = sorted(set(seeds) & set(rows[baseline]))
            ahead = sum(rows[row][s]["val_dice_mean"] > rows[baseline][s]["val_dice_mean"] for s in shared)
            cells += [f"{dice(row) - dice(baseline):+.4f}", f"{ahead}/{len(shared)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
