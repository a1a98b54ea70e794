"""``python -m bundle infer-pacs``: a PACS export in, DICOM Segmentations, overlays and a summary CSV out.

The export is indexed by series (``datalist pacs``: reports beside the images or in DICOM SR are found), each series
goes through the components of ``configs/inference.yaml`` (the same preprocessing, network, inferer and
postprocessing as ``monai.bundle run inference``), and ``summary.csv`` gets one row per series as soon as it is done,
so an interrupted run keeps what it finished and a rerun on the same folders skips it.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bundle.load import BUNDLE_ROOT, bundle_parser, load_checkpoint
from scripts.errors import root_cause
from scripts.io import atomic_write_text
from scripts.precision import Autocast

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = ("series_uid", "study_uid", "modality", "source", "report", "status", "reason",
                  "lesion_fraction", "dicom_seg", "overlay", "mask", "probability", "seconds")


@dataclass
class PacsRun:
    """Counts of one ``infer-pacs`` run."""

    done: int = 0
    already_done: int = 0
    failed: int = 0
    unreadable_files: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"segmented: {self.done}, already done: {self.already_done}, failed: {self.failed}, "
                f"unreadable files skipped: {self.unreadable_files}")


def _read_summary(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {row["series_uid"]: row for row in csv.DictReader(f)}


def _is_done(row: dict | None) -> bool:
    """Done, and its files are still there (a deleted output is made again)."""
    if row is None or row.get("status") != "done":
        return False
    files = [row.get(k) for k in ("dicom_seg", "overlay", "mask", "probability") if row.get(k)]
    return all(Path(f).is_file() for f in files)


class _Segmenter:
    """The inference config's components, built once: ``__call__(entry)`` runs one datalist entry end to end."""

    def __init__(
        self,
        output_dir: Path,
        formats: Sequence[str],
        config_files: Sequence[str | os.PathLike],
        ckpt: str | os.PathLike | None,
        device: str | None,
        overrides: dict[str, Any],
    ) -> None:
        self.parser = bundle_parser(config_files, {"output_dir": str(output_dir), "output_formats": list(formats),
                                                   **overrides})
        if device:
            self.parser["device"] = f"$torch.device('{device}')"
        self.device = self.parser.get_parsed_content("device")
        path = Path(ckpt) if ckpt else Path(self.parser.get_parsed_content("ckpt_dir")) / "model.pt"
        self.network = load_checkpoint(self.parser.get_parsed_content("network"), path, self.device).eval()
        self.preprocessing = self.parser.get_parsed_content("preprocessing")
        self.prepare_batch = self.parser.get_parsed_content("prepare_batch")
        # the evaluator's compute path (autocast, predictions back in float32), without building its data loader
        self.inferer = Autocast(self.parser.get_parsed_content("inferer"), self.device.type,
                                self.parser.get_parsed_content("compute_dtype"))
        self.postprocessing = self.parser.get_parsed_content("postprocessing")

    def __call__(self, entry: dict) -> dict:
        from monai.data import decollate_batch, list_data_collate

        item = self.preprocessing(dict(entry))
        batch = list_data_collate([item])
        image, _, args, kwargs = self.prepare_batch(batch, self.device)
        with torch.no_grad():
            batch["pred"] = self.inferer(image, self.network, *args, **kwargs)
        sample = decollate_batch(batch)[0]
        return self.postprocessing(sample)


def infer_pacs(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    formats: Sequence[str] = ("dicom_seg", "overlay"),
    config_files: Sequence[str | os.PathLike] | None = None,
    ckpt: str | os.PathLike | None = None,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> PacsRun:
    """Segment every image series of a DICOM export.

    Args:
        input_dir: the export folder (any nesting; file names do not matter).
        output_dir: where ``<SeriesInstanceUID>_seg.dcm``, ``..._overlay.png`` and ``summary.csv`` go.
        formats: outputs per series (``scripts.outputs.OUTPUT_FORMATS``).
        config_files: inference configs, merged in order (default: ``configs/inference.yaml``; add
            ``configs/networks/<name>.yaml`` for another network).
        ckpt: the weights (default ``models/model.pt`` of the bundle).
        device: e.g. ``"cpu"`` or ``"cuda:0"`` (default: the config's).
        overrides: further config values by id.

    Returns:
        the counts; ``summary.csv`` has one row per series (``done`` or ``failed`` with the reason) and is
        appended to as series finish. Unreadable files are logged and counted, never fatal; a series that fails
        is logged, counted and retried on the next run.
    """
    from bundle.datalist import build_datalist

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary_path = output_dir / "summary.csv"
    previous = _read_summary(summary_path)
    index = build_datalist("pacs", input_dir, skip_bad=True)
    entries = index.splits["test"]
    run = PacsRun(unreadable_files=len(index.skipped))
    for path, reason in index.skipped:
        run.failures.append((path, reason))
    logger.info("%s: %d image series, %d unreadable files skipped", input_dir, len(entries), len(index.skipped))

    todo = [e for e in entries if not _is_done(previous.get(e["id"]))]
    run.already_done = len(entries) - len(todo)
    rows = {uid: row for uid, row in previous.items() if _is_done(row)}
    stale = {uid: row for uid, row in previous.items() if uid not in rows}
    segmenter = _Segmenter(output_dir, formats, config_files or [BUNDLE_ROOT / "configs" / "inference.yaml"], ckpt,
                           device, overrides or {}) if todo else None
    for n, entry in enumerate(todo, 1):
        source = entry["image"] if isinstance(entry["image"], str) else entry["image"][0]
        row = {"series_uid": entry["id"], "study_uid": entry.get("study", ""), "modality": entry.get("modality", ""),
               "source": source, "report": entry.get("report", "")}
        start = time.perf_counter()
        try:
            result = segmenter(entry)
        except Exception as e:  # one bad series must not stop the export: logged, counted, retried next run
            reason = _root_cause(e)
            logger.error("series %s (%s): failed: %s", entry["id"], source, reason)
            run.failed += 1
            run.failures.append((source, reason))
            row |= {"status": "failed", "reason": reason}
        else:
            mask = result["pred"]
            files = result.get("output_files", {})
            row |= {"status": "done", "lesion_fraction": f"{float((mask > 0).float().mean()):.5f}",
                    **{k: files.get(k, "") for k in ("dicom_seg", "overlay", "mask", "probability")}}
            run.done += 1
            logger.info("[%d/%d] series %s: done", n, len(todo), entry["id"])
        row["seconds"] = f"{time.perf_counter() - start:.2f}"
        rows[entry["id"]] = row
        _write_summary(summary_path, rows, stale)
    if not todo:
        _write_summary(summary_path, rows, stale)
    return run


def _write_summary(path: Path, rows: dict[str, dict], stale: dict[str, dict]) -> None:
    """Rewritten whole after each series, atomically (a temporary name of its own per write), so it is never half
    a row. Under an exclusive lock, the rows another instance wrote to the same output folder meanwhile are read
    and kept: two instances neither race on one file nor drop each other's rows.

    Args:
        rows: this run's rows (the series it did, and those done before it started), which win.
        stale: the rows that were in the file when this run started and are not carried on (failed, or their
            files gone): dropped unless another instance has rewritten them since.
    """
    with _locked(path.with_name(path.name + ".lock")):
        merged = {uid: row for uid, row in _read_summary(path).items() if stale.get(uid) != row}
        merged.update(rows)
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in merged.values():
            writer.writerow({k: row.get(k, "") for k in SUMMARY_FIELDS})
        atomic_write_text(path, buffer.getvalue())


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``fcntl.flock``) on ``lock_path`` for the block. Python's standard library
    has no portable file lock; where ``fcntl`` is missing (Windows), run one instance per output folder."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _root_cause(error: BaseException) -> str:
    """The innermost message (MONAI wraps a transform's error in "applying transform ..." layers), on one line."""
    cause = root_cause(error)
    return f"{type(cause).__name__}: {cause}".replace("\n", " ")


def reasons(run: PacsRun) -> str:
    """The failures grouped by reason, for the command's output."""
    counts = Counter(reason.replace(f"{source}: ", "").replace(source, "<file>") for source, reason in run.failures)
    return "\n".join(f"  {n} × {reason}" for reason, n in counts.most_common())
