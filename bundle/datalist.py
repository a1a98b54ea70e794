"""Datalists from the layouts users of this field keep their image–report pairs in.

``python -m bundle datalist <layout> --root DIR [--out FILE]`` writes a MONAI datalist JSON (``training``,
``validation``, ``test``; entries ``id``, ``image``, ``label``, ``report``) that the workflows read through
``--dataset_dir``/``--datalist``. Reports are stored as text in the datalist, read and checked once here.

Layouts:

- ``folder``: ``images/``, ``masks/``, ``reports/<id>.txt`` and an optional ``split.json``
  (``{"train": [ids], "val": [ids], "test": [ids]}``), as the QaTa-COV19 copy in ``shared/data/qata``.
- ``lvit``: ``{Train,Val,Test}_Folder/{img,labelcol,*_text.xlsx}`` with Excel columns ``Image`` (the mask file
  name) and ``Description``, as LViT, RecLMIS and their users keep data.
- ``csv``: one CSV with image, mask and report columns (names are options; GuideDecoder's prompt files are one
  case), paths relative to the CSV's folder.
- ``pacs``: a folder tree exported from a PACS (any nesting, meaningless file names): every DICOM file is indexed
  with pydicom and grouped by SeriesInstanceUID, one entry per series (a single file, or the series' file list —
  never a folder, which could mix series). The report is a ``.txt`` in the series' folder or a parent folder up
  to the root, else the text of a DICOM SR of the same study, else absent. No masks: an inference datalist.

Every problem names the file and what is wrong; with ``skip_bad`` the entry is skipped, logged and counted.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from scripts.image_files import DICOM_SUFFIXES, IMAGE_SUFFIXES, image_stem, is_raster
from scripts.io import atomic_write_text

__all__ = ["DatalistError", "Datalist", "read_report", "check_pair", "build_datalist", "write_datalist", "LAYOUTS"]

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")
_SPLIT_NAMES = {"train": "training", "training": "training", "val": "validation", "valid": "validation",
                "validation": "validation", "test": "test", "testing": "test"}


class DatalistError(ValueError):
    """A problem with one input file; the message starts with the file's path."""


@dataclass
class Datalist:
    """Entries per split and what was skipped, with why."""

    splits: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{s}: {len(self.splits[s])}" for s in SPLITS]
        lines.append(f"skipped: {len(self.skipped)}")
        reasons = Counter(reason.split(":", 1)[0] for _, reason in self.skipped)
        lines += [f"  {n} × {reason}" for reason, n in reasons.most_common()]
        return "\n".join(lines)


def read_report(path: str | os.PathLike, encoding_errors: str = "strict") -> str:
    """A report file's text, whitespace-normalised.

    Args:
        path: the ``.txt`` file.
        encoding_errors: ``"strict"`` raises on non-UTF-8 bytes; ``"replace"`` decodes them as U+FFFD with a
            warning naming the file.

    Raises:
        DatalistError: missing file, non-UTF-8 bytes (strict), or an empty report.
    """
    p = Path(path)
    if not p.is_file():
        raise DatalistError(f"{p}: missing report: no such file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"byte 0x{raw[e.start]:02x} at offset {e.start}"
        if encoding_errors == "strict":
            raise DatalistError(f"{p}: report is not UTF-8 text ({where})") from e
        logger.warning("%s: report is not UTF-8 (%s); undecodable bytes replaced", p, where)
        text = raw.decode("utf-8", errors="replace")
    return _normalise(text, p)


def _normalise(text: str, source: object) -> str:
    text = " ".join(str(text).split())
    if not text:
        raise DatalistError(f"{source}: empty report")
    return text


def _size(path: Path) -> tuple[int, ...]:
    if not path.is_file():
        raise DatalistError(f"{path}: no such file")
    if is_raster(path):
        try:
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                return im.size
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DatalistError(f"{path}: unreadable or corrupt image ({e})") from e
    return ()  # other formats (NIfTI, DICOM) are checked when loaded


def check_pair(image: str | os.PathLike, label: str | os.PathLike | None) -> None:
    """Both files readable, the same size, and the mask binary (two values at most, one of them 0).

    Raises:
        DatalistError: naming the file and the problem.
    """
    image, size = Path(image), _size(Path(image))
    if label is None:
        return
    label = Path(label)
    label_size = _size(label)
    if size and label_size and size != label_size:
        raise DatalistError(f"{label}: mask size {label_size} differs from image {image.name} size {size}")
    if is_raster(label):
        with Image.open(label) as im:
            values = np.unique(np.asarray(im))
        if len(values) > 2 or (len(values) == 2 and values[0] != 0):
            shown = ", ".join(str(v) for v in values[:6]) + (" …" if len(values) > 6 else "")
            raise DatalistError(f"{label}: mask is not binary (values {shown})")


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def _folder_layout(root: Path, encoding_errors: str) -> Iterable[tuple[str | None, Callable[[], dict]]]:
    for sub in ("images", "masks", "reports"):
        if not (root / sub).is_dir():
            raise DatalistError(f"{root}: not a 'folder' layout: no {sub}/ folder")
    split_of: dict[str, str] = {}
    split_file = root / "split.json"
    if split_file.is_file():
        splits = _read_json(split_file)
        if not isinstance(splits, dict):
            raise DatalistError(f"{split_file}: expected an object of id lists, found {type(splits).__name__}")
        for name, ids in splits.items():
            if name not in _SPLIT_NAMES:
                raise DatalistError(f"{split_file}: unknown split {name!r} (use train/val/test)")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise DatalistError(f"{split_file}: split {name!r} must be a list of id strings, found {ids!r:.60}")
            for sid in ids:
                if sid in split_of:
                    raise DatalistError(f"{split_file}: id {sid!r} is listed twice")
                split_of[sid] = _SPLIT_NAMES[name]
    stems = sorted({_stem(p) for p in (root / "images").iterdir() if p.is_file()})
    for sid in stems:
        if split_of and sid not in split_of:
            continue  # images outside the given split are not part of the set

        def entry(sid: str = sid) -> dict:
            image = _find(root / "images", sid)
            label = _find(root / "masks", sid)
            if label is None:
                raise DatalistError(f"{root / 'masks' / sid}.*: missing mask for image {image.name}")
            report = read_report(root / "reports" / f"{sid}.txt", encoding_errors)
            check_pair(image, label)
            return {"id": sid, "image": str(image), "label": str(label), "report": report}

        yield split_of.get(sid), entry
    missing = sorted(set(split_of) - set(stems))
    if missing:
        raise DatalistError(f"{split_file}: {len(missing)} ids have no image, e.g. {missing[0]!r}")


def _inside(base: Path, rel: str, source: str) -> Path:
    """``base / rel``, refused when it resolves outside ``base`` (``../../etc/passwd``, an absolute path, a link
    out): a datalist indexes the data set's own files only."""
    path = base / rel
    if not path.resolve().is_relative_to(base.resolve()):
        raise DatalistError(f"{source}: {rel!r} leaves {base}")
    return path


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DatalistError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise DatalistError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e


def _stem(p: Path) -> str:
    stem = image_stem(p)
    return stem if stem != p.name else p.stem


def _read_excel(path: Path) -> list[dict]:
    import openpyxl

    try:
        sheet = openpyxl.load_workbook(path, read_only=True).worksheets[0]
    except Exception as e:  # openpyxl raises several unrelated types for broken files
        raise DatalistError(f"{path}: unreadable Excel file ({e})") from e
    rows = list(sheet.iter_rows(values_only=True))
    header = [str(c).strip() if c is not None else "" for c in (rows[0] if rows else [])]
    if "Image" not in header or "Description" not in header:
        raise DatalistError(f"{path}: expected columns 'Image' and 'Description', found {header}")
    i, d = header.index("Image"), header.index("Description")
    return [{"Image": r[i], "Description": r[d], "row": n + 2} for n, r in enumerate(rows[1:]) if any(r)]


def _lvit_layout(root: Path, encoding_errors: str) -> Iterable[tuple[str | None, Callable[[], dict]]]:
    folders = {split: root / f"{name}_Folder" for split, name in zip(SPLITS, ("Train", "Val", "Test"))}
    if not any(f.is_dir() for f in folders.values()):
        raise DatalistError(f"{root}: not an 'lvit' layout: no Train_Folder, Val_Folder or Test_Folder")
    for split, folder in folders.items():
        if not folder.is_dir():
            continue
        sheets = sorted(folder.glob("*_text.xlsx"))
        if len(sheets) != 1:
            raise DatalistError(f"{folder}: expected one *_text.xlsx, found {len(sheets)}")
        for row in _read_excel(sheets[0]):

            def entry(row: dict = row, folder: Path = folder, sheet: Path = sheets[0]) -> dict:
                mask_name = str(row["Image"] or "").strip()
                if not mask_name:
                    raise DatalistError(f"{sheet}: row {row['row']}: empty 'Image' cell")
                where = f"{sheet}: row {row['row']}"
                label = _inside(folder / "labelcol", mask_name, where)
                image = _inside(folder / "img", mask_name, where)
                if not image.is_file() and mask_name.startswith("mask_"):
                    image = folder / "img" / mask_name[len("mask_") :]  # QaTa in LViT: mask_covid_1.png
                report = _normalise(row["Description"] or "", f"{sheet}: row {row['row']} ({mask_name})")
                check_pair(image, label)
                return {"id": Path(mask_name).stem, "image": str(image), "label": str(label), "report": report}

            yield split, entry


def _csv_layout(
    csv_path: Path, encoding_errors: str, image_column: str, mask_column: str | None, report_column: str
) -> Iterable[tuple[str | None, Callable[[], dict]]]:
    if not csv_path.is_file():
        raise DatalistError(f"{csv_path}: no such CSV file")
    try:
        text = csv_path.read_bytes().decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as e:
        raise DatalistError(
            f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start}); --encoding-errors replace reads it anyway"
        ) from e
    if "\ufffd" in text and encoding_errors == "replace":
        logger.warning("%s: bytes that are not UTF-8 were replaced by U+FFFD", csv_path)
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    columns = set(rows[0]) if rows else set()
    wanted = [c for c in (image_column, mask_column, report_column) if c]
    if not set(wanted) <= columns:
        raise DatalistError(f"{csv_path}: expected columns {wanted}, found {sorted(columns)}")
    base = csv_path.parent
    for n, row in enumerate(rows, start=2):

        def entry(row: dict = row, n: int = n) -> dict:
            for column in (image_column, mask_column):
                if column and not (row[column] or "").strip():
                    raise DatalistError(f"{csv_path}: line {n}: empty '{column}' cell")
            image = _inside(base, row[image_column].strip(), f"{csv_path}: line {n}")
            label = _inside(base, row[mask_column].strip(), f"{csv_path}: line {n}") if mask_column else None
            report = _normalise(row[report_column] or "", f"{csv_path}: line {n} ({image.name})")
            check_pair(image, label)
            out = {"id": _stem(image), "image": str(image), "report": report}
            return out | ({"label": str(label)} if label else {})

        yield None, entry


_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # structured report SOP classes


def _sr_text(ds) -> str:
    """The TEXT content items of a DICOM SR, in document order."""
    texts, stack = [], list(getattr(ds, "ContentSequence", []))[::-1]
    while stack:
        item = stack.pop()
        if getattr(item, "ValueType", "") == "TEXT" and getattr(item, "TextValue", ""):
            texts.append(str(item.TextValue))
        stack.extend(list(getattr(item, "ContentSequence", []))[::-1])
    return " ".join(texts)


_REPORT_NAME = re.compile(r"report|finding|impression|befund", re.IGNORECASE)


def _is_report_name(path: Path) -> bool:
    """A text file named as a report: its name holds "report", "finding", "impression" or "befund"."""
    return bool(_REPORT_NAME.search(path.stem))


def _report_beside(folder: Path, root: Path, encoding_errors: str) -> str | None:
    """The report of a series from a text file, by the rule of ``docs/data.md``:

    - in the series' own folder: a file named as a report (:func:`_is_report_name`), else its only ``.txt``;
    - in a parent folder up to the export root: a file named as a report only (a ``README.txt``, ``INDEX.txt`` or
      a notes file there describes the export, not this series);
    - the nearest folder with a candidate decides; two candidates there are an error naming the folder.

    Text files that are not reports are ignored with a debug line.
    """
    for candidate in (folder, *folder.parents):
        texts = sorted(candidate.glob("*.txt"))
        named = [t for t in texts if _is_report_name(t)]
        reports = named or (texts if candidate == folder and len(texts) == 1 else [])
        for ignored in sorted(set(texts) - set(reports)):
            logger.debug("%s: not a report by its name or place; ignored", ignored)
        if len(reports) > 1:
            raise DatalistError(f"{candidate}: {len(reports)} report files ({reports[0].name}, {reports[1].name}, ...)")
        if reports:
            return read_report(reports[0], encoding_errors)
        if candidate == root:
            break
    return None


def _pacs_layout(root: Path, encoding_errors: str) -> Iterable[tuple[str | None, Callable[[], dict]]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not root.is_dir():
        raise DatalistError(f"{root}: no such folder")
    series: dict[str, list[tuple[Path, object]]] = {}
    sr_reports: dict[str, list[str]] = {}
    broken: list[tuple[Path, str]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() != ".txt"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            if path.name.lower().endswith(DICOM_SUFFIXES):
                broken.append((path, "unreadable or corrupt DICOM file"))
            continue  # not DICOM at all: other files of an export (viewers, indexes) are ignored
        except (OSError, ValueError, EOFError) as e:
            broken.append((path, f"unreadable or corrupt DICOM file ({e})"))
            continue
        if str(ds.get("SOPClassUID", "")).startswith(_SR_PREFIX):
            text = _sr_text(ds)
            if text.strip():
                sr_reports.setdefault(str(ds.StudyInstanceUID), []).append(text)
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            broken.append((path, "DICOM file without SeriesInstanceUID"))
            continue
        series.setdefault(uid, []).append((path, ds))
    for path, reason in broken:

        def fail(path: Path = path, reason: str = reason) -> dict:
            raise DatalistError(f"{path}: {reason}")

        yield None, fail
    for uid, files in sorted(series.items()):

        def entry(uid: str = uid, files: list = files) -> dict:
            files = sorted(files, key=lambda f: (int(f[1].get("InstanceNumber", 0) or 0), str(f[0])))
            first = files[0][1]
            # a structured report of the study first (the PACS's own record), else a text file by the rule
            report = None
            if str(first.get("StudyInstanceUID", "")) in sr_reports:
                report = _normalise(" ".join(sr_reports[str(first.StudyInstanceUID)]), f"{files[0][0]} (SR)")
            if report is None:
                report = _report_beside(files[0][0].parent, root, encoding_errors)
            image = str(files[0][0]) if len(files) == 1 else [str(f) for f, _ in files]
            out = {"id": uid, "image": image, "study": str(first.get("StudyInstanceUID", "")),
                   "modality": str(first.get("Modality", ""))}
            return out | ({"report": report} if report else {})

        yield "test", entry


LAYOUTS = ("folder", "lvit", "csv", "pacs")


def build_datalist(
    layout: str,
    root: str | os.PathLike,
    skip_bad: bool = False,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    encoding_errors: str = "strict",
    image_column: str = "image",
    mask_column: str | None = "mask",
    report_column: str = "report",
) -> Datalist:
    """Index ``root`` (a folder, or the CSV file for ``csv``) in the given layout.

    A layout's own split is kept; entries without one are split by a seeded shuffle into ``val_fraction`` and
    ``test_fraction``, the rest for training.

    Raises:
        DatalistError: the first problem, naming the file, unless ``skip_bad`` (then it is logged and counted).
    """
    root = Path(root)
    if layout == "folder":
        items = _folder_layout(root, encoding_errors)
    elif layout == "lvit":
        items = _lvit_layout(root, encoding_errors)
    elif layout == "csv":
        items = _csv_layout(root, encoding_errors, image_column, mask_column, report_column)
    elif layout == "pacs":
        items = _pacs_layout(root, encoding_errors)
    else:
        raise DatalistError(f"{root}: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    result, unsplit, seen = Datalist(), [], {}
    for split, make in items:
        try:
            entry = make()
            if entry["id"] in seen:
                raise DatalistError(f"{entry['image']}: duplicate id {entry['id']!r} (also {seen[entry['id']]})")
        except DatalistError as e:
            if not skip_bad:
                raise
            logger.warning("skipped: %s", e)
            path, _, reason = str(e).partition(": ")
            result.skipped.append((path, reason))
            continue
        seen[entry["id"]] = entry["image"] if isinstance(entry["image"], str) else entry["image"][0]
        (result.splits[split] if split else unsplit).append(entry)
    # images without a mask can only be segmented: all of them go to `test`, which inference reads, rather than
    # being split by chance into lists that training would need masks for
    result.splits["test"] += [e for e in unsplit if "label" not in e]
    unsplit = [e for e in unsplit if "label" in e]
    if unsplit:
        # not monai.data.partition_dataset: its rounding drops samples (3 entries at 0.7/0.15/0.15 give lists of
        # 2, 0 and 0, one entry lost; MONAI 1.6.1); here every entry lands in exactly one list
        random.Random(seed).shuffle(unsplit)
        n_val, n_test = round(val_fraction * len(unsplit)), round(test_fraction * len(unsplit))
        result.splits["validation"] += unsplit[:n_val]
        result.splits["test"] += unsplit[n_val : n_val + n_test]
        result.splits["training"] += unsplit[n_val + n_test :]
    return result


def write_datalist(datalist: Datalist, out: str | os.PathLike) -> Path:
    """Write the JSON; paths under the file's folder are stored relative to it, others absolute."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)

    def rel(p: str | list) -> str | list:
        if isinstance(p, list):
            return [rel(x) for x in p]
        path = Path(p).resolve()
        return str(path.relative_to(out.parent)) if path.is_relative_to(out.parent) else str(path)

    payload = {
        split: [{k: rel(v) if k in ("image", "label") else v for k, v in e.items()} for e in entries]
        for split, entries in datalist.splits.items()
    }
    return atomic_write_text(out, json.dumps(payload, indent=1, ensure_ascii=False))
