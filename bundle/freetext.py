"""Held-out free-text validation reports: the validation split with its templated reports rewritten by rules that
the training augmentation (:mod:`scripts.phrasing`) does not use, and without reports.

``python -m bundle freetext DATALIST`` writes, beside DATALIST, ``<stem>_freetext.json`` (every report of the
split rewritten) and ``<stem>_noreport.json`` (no report at all: the image-only path), so that one evaluation per
datalist (``configs/evaluate.yaml`` with ``--datalist``) gives the validation Dice with templated reports,
free-text reports and no report. The rules here share no finding word, no location wording and no clear-side
sentence with the augmentation's (``tests/test_freetext.py`` checks it), so a model cannot score well on this set by
having learned the augmentation's phrasings. Each rewrite is a fixed function of the sample's id.

``<stem>_handwritten.json`` holds the split's samples whose zones one of the report sentences written by hand in
``bundle/handwritten_reports.json`` names (by its hand label, not by the parser), each with one such sentence: free
text that neither rule set wrote, read by a parser that was not written for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from scripts.io import atomic_write_text
from scripts.zones import LEVELS, SIDES, report_zones

__all__ = ["EVAL_FINDINGS", "HANDWRITTEN_REPORTS", "freetext_report", "write_freetext_datalists",
           "write_handwritten_datalist"]

# report sentences written by hand, each with the zones it names labelled by hand
HANDWRITTEN_REPORTS = Path(__file__).with_name("handwritten_reports.json")
EVAL_FINDINGS = (
    "mottled shadowing", "confluent shadowing", "ill-defined shadowing", "increased density", "inflammatory change",
    "alveolar shadowing",
)
_ONE_LEVEL = {0: ("{s} upper field", "{s} apical area"), 1: ("{s} mid field", "{s} midzone"),
              2: ("{s} lower field", "{s} basal area")}
_TWO_LEVELS = {(0, 1): "{s} upper and mid fields", (0, 2): "{s} upper and lower fields",
               (1, 2): "{s} mid and lower fields"}
_ALL_LEVELS = ("{s} hemithorax", "{s} lung field")
_CLEAR_SIDE = ("No focal abnormality on the {o}.", "The {o} hemithorax appears normal.", "The {o} side is spared.")


def _rng(key: str) -> np.random.RandomState:
    return np.random.RandomState(int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little"))


def _location(levels: tuple[int, ...], side: str, rng: np.random.RandomState) -> str:
    if len(levels) == 3:
        return _ALL_LEVELS[rng.randint(len(_ALL_LEVELS))].format(s=side)
    if len(levels) == 2:
        return _TWO_LEVELS[levels].format(s=side)
    options = _ONE_LEVEL[levels[0]]
    return options[rng.randint(len(options))].format(s=side)


def freetext_report(report: str, key: str) -> str | None:
    """The held-out free-text rewrite of a report, a fixed function of ``key`` (the sample's id); None when the
    report names no lung zone (it cannot be rewritten without inventing one)."""
    zones = report_zones(report)
    if zones is None:
        return None
    rng = _rng(key)
    named = [(SIDES[s], tuple(int(v) for v in np.flatnonzero(zones[s]))) for s in range(2) if zones[s].any()]
    if len(named) == 2 and rng.rand() < 0.5:
        named.reverse()
    places = [_location(levels, side, rng) for side, levels in named]
    first, second = (EVAL_FINDINGS[i] for i in rng.choice(len(EVAL_FINDINGS), 2, replace=False))
    if rng.rand() < 0.5 or len(places) == 1:
        text = f"{first.capitalize()} affecting the {' and '.join(places)}."
    else:
        text = f"{first.capitalize()} is seen in the {places[0]}, with {second} in the {places[1]}."
    if len(named) == 1 and rng.rand() < 0.6:
        other = SIDES[1 - SIDES.index(named[0][0])]
        text += " " + _CLEAR_SIDE[rng.randint(len(_CLEAR_SIDE))].format(o=other)
    return text


def _read_split(datalist: str | os.PathLike, split: str) -> tuple[Path, dict]:
    path = Path(datalist)
    data = json.loads(path.read_text())
    if split not in data:
        raise ValueError(f"{path}: no {split!r} split")
    return path, data


def write_freetext_datalists(datalist: str | os.PathLike, split: str = "validation") -> tuple[Path, Path]:
    """Writes ``<stem>_freetext.json`` and ``<stem>_noreport.json`` beside ``datalist`` (atomically), each with
    ``split`` rewritten and the other splits as they are.

    Entries whose report names no zone keep their report in the free-text list (counted in its ``description``);
    entries without a report are an error naming the datalist, since the comparison needs every report.

    Returns:
        the two paths.
    """
    path, data = _read_split(datalist, split)
    free, none, kept = [], [], 0
    for entry in data[split]:
        if not isinstance(entry.get("report"), str) or not entry["report"].strip():
            raise ValueError(f"{path}: {entry.get('id') or entry.get('image')} has no report to rewrite")
        key = str(entry.get("id") or entry["image"])
        text = freetext_report(entry["report"], key)
        kept += text is None
        free.append({**entry, "report": text if text is not None else entry["report"]})
        none.append({k: v for k, v in entry.items() if k != "report"})
    out = []
    for suffix, entries, note in (
        ("freetext", free, f"{split} reports rewritten as free text by bundle/freetext.py ({kept} without a zone kept)"),
        ("noreport", none, f"{split} without reports (the image-only path)"),
    ):
        target = path.with_name(f"{path.stem}_{suffix}.json")
        atomic_write_text(target, json.dumps({**data, split: entries, "description": note}, indent=1))
        out.append(target)
    return out[0], out[1]


def _zone_names(zones: np.ndarray) -> tuple[str, ...]:
    return tuple(sorted(f"{SIDES[s]} {LEVELS[v]}" for s, v in zip(*np.nonzero(zones))))


def write_handwritten_datalist(
    datalist: str | os.PathLike, split: str = "validation", sentences: str | os.PathLike = HANDWRITTEN_REPORTS
) -> Path:
    """Writes ``<stem>_handwritten.json`` beside ``datalist`` (atomically): ``split`` reduced to the samples whose
    report's zones some hand-written sentence of ``sentences`` names by its hand label, each with one of those
    sentences (a fixed function of the sample's id), and the other splits as they are. Its ``description`` counts
    the samples left out (their zone set has no sentence).

    Returns:
        the path written.
    """
    path, data = _read_split(datalist, split)
    by_zones: dict[tuple[str, ...], list[str]] = {}
    for item in json.loads(Path(sentences).read_text())["reports"]:
        if item["zones"]:
            by_zones.setdefault(tuple(sorted(item["zones"])), []).append(item["text"])
    kept = []
    for entry in data[split]:
        zones = report_zones(entry.get("report")) if isinstance(entry.get("report"), str) else None
        if zones is None:
            raise ValueError(f"{path}: {entry.get('id') or entry.get('image')} has no report naming a lung zone")
        options = by_zones.get(_zone_names(zones))
        if options:
            key = str(entry.get("id") or entry["image"])
            kept.append({**entry, "report": options[_rng(key).randint(len(options))]})
    note = (f"{split}: the {len(kept)} of {len(data[split])} samples whose zones a hand-written sentence of "
            f"{Path(sentences).name} names, with that sentence as the report")
    target = path.with_name(f"{path.stem}_handwritten.json")
    atomic_write_text(target, json.dumps({**data, split: kept, "description": note}, indent=1))
    return target
