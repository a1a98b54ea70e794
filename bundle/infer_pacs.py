"""``python -m bundle infer-pacs``: DICOM in, DICOM Segmentations, overlays and a summary CSV out.

Two sources of series:

- :func:`infer_pacs`, a PACS export folder: indexed by series (``datalist pacs``: reports beside the images or in
  DICOM SR are found); a rerun on the same folders skips the series whose outputs are there.
- :func:`infer_pacs_archive`, an archive (``bundle.pacs``): the series of the studies a query finds are retrieved
  with their study's SR reports (or a report sidecar), segmented, and their SEG stored back into the study; a rerun
  skips the series whose SEG the archive already holds.

Each series goes through the components of ``configs/inference.yaml`` (the same preprocessing, network, inferer and
postprocessing as ``monai.bundle run inference``), and ``summary.csv`` gets one row per series as soon as it is done,
so an interrupted run keeps what it finished. A series that fails is logged, counted and retried on the next run.
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
from scripts.io import atomic_write, atomic_write_text
from scripts.precision import Autocast

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = ("series_uid", "study_uid", "modality", "source", "report", "status", "reason",
                  "lesion_fraction", "dicom_seg", "seg_sop_uid", "overlay", "mask", "probability", "seconds",
                  "retrieve_seconds", "infer_seconds", "store_seconds")


@dataclass
class PacsRun:
    """Counts of one ``infer-pacs`` run."""

    done: int = 0  # segmented (and, from an archive, stored back)
    already_done: int = 0
    failed: int = 0
    unreadable_files: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def record_failure(self, series_uid: str, source: str, error: BaseException) -> dict[str, str]:
        """Logs and counts a series that failed; returns its summary fields (status, reason)."""
        reason = _root_cause(error)
        logger.error("series %s (%s): failed: %s", series_uid, source, reason)
        self.failed += 1
        self.failures.append((source, reason))
        return {"status": "failed", "reason": reason}

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
    """The inference config's components, built once: ``__call__(entry)`` runs one datalist entry end to end.

    ``config_files`` None: ``configs/inference.yaml``; the other arguments as :func:`infer_pacs`.
    """

    def __init__(
        self,
        output_dir: Path,
        formats: Sequence[str],
        config_files: Sequence[str | os.PathLike] | None = None,
        ckpt: str | os.PathLike | None = None,
        device: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        config_files = config_files or [BUNDLE_ROOT / "configs" / "inference.yaml"]
        self.parser = bundle_parser(config_files, {"output_dir": str(output_dir), "output_formats": list(formats),
                                                   **(overrides or {})})
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
    segmenter = _Segmenter(output_dir, formats, config_files, ckpt, device, overrides) if todo else None
    for n, entry in enumerate(todo, 1):
        source = entry["image"] if isinstance(entry["image"], str) else entry["image"][0]
        row = {"series_uid": entry["id"], "study_uid": entry.get("study", ""), "modality": entry.get("modality", ""),
               "source": source, "report": entry.get("report", "")}
        start = time.perf_counter()
        try:
            result = segmenter(entry)
        except Exception as e:  # one bad series must not stop the export: logged, counted, retried next run
            row |= run.record_failure(entry["id"], source, e)
        else:
            row |= {"status": "done", **_result_fields(result)}
            run.done += 1
            logger.info("[%d/%d] series %s: done", n, len(todo), entry["id"])
        row["seconds"] = f"{time.perf_counter() - start:.2f}"
        rows[entry["id"]] = row
        _write_summary(summary_path, rows, stale)
    if not todo:
        _write_summary(summary_path, rows, stale)
    return run


def _result_fields(result: dict) -> dict[str, str]:
    """Summary fields of one segmented series: lesion fraction, output files, the SEG's SOP Instance UID."""
    files = result.get("output_files", {})
    fields = {"lesion_fraction": f"{float((result['pred'] > 0).float().mean()):.5f}",
              **{k: files.get(k, "") for k in ("dicom_seg", "overlay", "mask", "probability")}}
    if fields["dicom_seg"]:
        import pydicom

        fields["seg_sop_uid"] = str(pydicom.dcmread(fields["dicom_seg"], stop_before_pixels=True).SOPInstanceUID)
    return fields


def infer_pacs_archive(
    archive: Any,
    output_dir: str | os.PathLike,
    query: dict[str, str] | None = None,
    reports_dir: str | os.PathLike | None = None,
    formats: Sequence[str] = ("dicom_seg", "overlay"),
    config_files: Sequence[str | os.PathLike] | None = None,
    ckpt: str | os.PathLike | None = None,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> PacsRun:
    """Segment the image series of the studies ``query`` finds in ``archive`` and store each SEG back.

    Per series: skipped when the archive already holds a SEG of it written by this bundle; otherwise retrieved
    (with its study's SR reports) into ``<output_dir>/retrieved/<SeriesInstanceUID>/``, segmented, its SEG stored
    into the same study, and the retrieved copy deleted. ``summary.csv`` records the stored SEG's SOP Instance UID
    and the seconds spent retrieving, segmenting and storing.

    Args:
        archive: a :class:`bundle.pacs.DicomWebArchive` (or an object with its methods).
        output_dir: where the SEGs, overlays and ``summary.csv`` go.
        query: QIDO-RS study attributes (e.g. ``{"ModalitiesInStudy": "CR", "StudyDate": "20261130"}``); None: all.
        reports_dir: report sidecars for archives without SR: ``<StudyInstanceUID>.txt`` (or
            ``<AccessionNumber>.txt``) is the report of that study's series; an SR of the study comes first.
        formats: outputs per series; ``dicom_seg`` is required (it is what is stored).
        config_files, ckpt, device, overrides: as :func:`infer_pacs`.

    Raises:
        ValueError: ``formats`` without ``dicom_seg``.
        bundle.pacs.PacsError: the query itself failed (a series that fails is counted, not raised).
    """
    import shutil

    from bundle.datalist import build_datalist

    if "dicom_seg" not in formats:
        raise ValueError(f"formats {list(formats)}: storing back into the archive needs dicom_seg")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary_path = output_dir / "summary.csv"
    previous = _read_summary(summary_path)
    refs = archive.find_series(query)
    logger.info("%s: %d image series in the studies found (%s)", archive.url, len(refs),
                ", ".join(f"{k}={v}" for k, v in (query or {}).items()) or "no query: every study")
    run, rows, segmenter = PacsRun(), {}, None
    for n, ref in enumerate(refs, 1):
        row = {"series_uid": ref.series_uid, "study_uid": ref.study_uid, "modality": ref.modality,
               "source": f"{archive.url}/studies/{ref.study_uid}/series/{ref.series_uid}"}
        start = time.perf_counter()
        folder = output_dir / "retrieved" / ref.series_uid
        try:
            stored = archive.stored_segmentation(ref)
            if stored:
                before = previous.get(ref.series_uid, {})
                row = {**before, **row, "status": "done", "reason": "", "seg_sop_uid": stored}
                run.already_done += 1
                logger.info("[%d/%d] series %s: its SEG %s is in the archive already", n, len(refs),
                            ref.series_uid, stored)
                rows[ref.series_uid] = row
                _write_summary(summary_path, rows, {})
                continue
            t0 = time.perf_counter()
            archive.retrieve_series(ref, folder / "images")
            archive.retrieve_reports(ref.study_uid, folder / "reports")
            _copy_sidecar(reports_dir, folder)
            t1 = time.perf_counter()
            index = build_datalist("pacs", folder, skip_bad=True)
            entry = next((e for e in index.splits["test"] if e["id"] == ref.series_uid), None)
            if entry is None:
                why = "; ".join(reason for _, reason in index.skipped) or "no image instances"
                raise ValueError(f"series {ref.series_uid}: nothing to segment in what the archive returned ({why})")
            segmenter = segmenter or _Segmenter(output_dir, formats, config_files, ckpt, device, overrides)
            result = segmenter(entry)
            t2 = time.perf_counter()
            fields = _result_fields(result)
            if not fields["dicom_seg"]:
                raise ValueError(f"series {ref.series_uid} ({ref.modality}): no DICOM SEG was written for it")
            fields["seg_sop_uid"] = archive.store(fields["dicom_seg"])
            t3 = time.perf_counter()
            row |= {"report": entry.get("report", ""), "status": "done", "reason": "", **fields,
                    "retrieve_seconds": f"{t1 - t0:.2f}", "infer_seconds": f"{t2 - t1:.2f}",
                    "store_seconds": f"{t3 - t2:.2f}"}
            shutil.rmtree(folder, ignore_errors=True)  # a cache: the SEG is stored and kept under output_dir
            run.done += 1
            logger.info("[%d/%d] series %s: segmented, SEG %s stored", n, len(refs), ref.series_uid,
                        fields["seg_sop_uid"])
        except Exception as e:  # one bad series must not stop the run: logged, counted, retried next run
            row |= run.record_failure(ref.series_uid, row["source"], e)
        row["seconds"] = f"{time.perf_counter() - start:.2f}"
        rows[ref.series_uid] = row
        _write_summary(summary_path, rows, {})
    if not refs:
        _write_summary(summary_path, rows, {})
    return run


def _copy_sidecar(reports_dir: str | os.PathLike | None, folder: Path) -> None:
    """``<reports_dir>/<StudyInstanceUID>.txt`` (or ``<AccessionNumber>.txt``) of the retrieved series as
    ``<folder>/report.txt``, where ``datalist pacs`` finds a report beside the images."""
    if reports_dir is None:
        return
    import pydicom

    first = next((folder / "images").glob("*.dcm"), None)
    if first is None:
        return
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    for key in (ds.get("StudyInstanceUID"), ds.get("AccessionNumber")):
        sidecar = Path(reports_dir) / f"{key}.txt" if key else None
        if sidecar is not None and sidecar.is_file():
            data = sidecar.read_bytes()  # as it is: the indexer reads it under its own encoding rules
            atomic_write(folder / "report.txt", lambda f: f.write(data))
            return


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
