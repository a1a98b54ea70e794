"""Clinical free-text phrasings of the lung zones a report names: the training-time report augmentation.

QaTa-COV19's reports follow one template ("unilateral pulmonary infection, one infected area, lower left lung.");
a reader writes "patchy opacity in the left lower zone; the right lung is clear." A network trained on the
template alone learns its wording, not its meaning. :func:`clinical_phrasing` writes the zones of a report as
one of many clinical phrasings: zones as upper/mid/lower zone, apex, base, perihilar, the entire lung; findings
as opacity, ground-glass, consolidation, infiltrates; the sides in either order; for a unilateral report, often
a negated sentence about the clear side.

Left and right keep the meaning they have in the source report (the dataset's convention,
``report_left_is_image_left``), and :func:`scripts.zones.report_zones` reads every phrasing back to the same zones
(tested on every QaTa report). The held-out free-text validation reports (``bundle/freetext.py``) are written by
other rules, with other words, so that validation does not reward learning these.

:func:`qata_template` goes the other way: it writes the zones a report names in the QaTa-COV19 template, which a
network trained on that template reads best (``scripts.transforms.ReportToTemplate``, at validation and inference).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from scripts.zones import LEVELS, SIDES

__all__ = ["clinical_phrasing", "FINDINGS", "qata_template", "ReportTemplate", "REPORT_TEMPLATES"]

FINDINGS = (
    "opacity", "opacities", "patchy opacity", "patchy opacities", "ground-glass opacity", "ground-glass opacities",
    "consolidation", "patchy consolidation", "airspace opacity", "airspace opacities", "infiltrates",
    "hazy opacity",
)
# one level of one side; {s} is the side word
_ONE_LEVEL = {
    0: ("{s} upper zone", "{s} apex", "{s} upper lung"),
    1: ("{s} mid zone", "{s} middle zone", "{s} perihilar region"),
    2: ("{s} lower zone", "{s} base", "base of the {s} lung"),
}
_TWO_LEVELS = {
    (0, 1): ("{s} upper and mid zones", "{s} upper and middle zones"),
    (0, 2): ("{s} upper and lower zones",),
    (1, 2): ("{s} mid and lower zones", "{s} middle and lower zones"),
}
_ALL_LEVELS = ("entire {s} lung", "whole {s} lung", "{s} lung")
# a sentence about the clear side; {o} is its side word
_CLEAR_SIDE = ("The {o} lung is clear.", "No {f} in the {o} lung.", "{O} lung clear.", "The {o} lung is unremarkable.")


def _pick(rng: np.random.RandomState, options: tuple[str, ...]) -> str:
    return options[rng.randint(len(options))]


def _location(levels: tuple[int, ...], side: str, rng: np.random.RandomState) -> str:
    if len(levels) == 3:
        options = _ALL_LEVELS
    elif len(levels) == 2:
        options = _TWO_LEVELS[levels]
    else:
        options = _ONE_LEVEL[levels[0]]
    return _pick(rng, options).format(s=side)


def clinical_phrasing(zones: np.ndarray, rng: np.random.RandomState, clear_side_prob: float = 0.5) -> str:
    """A clinical phrasing of ``zones``.

    Args:
        zones: 2×3 bool [side, level] (side 0 = "left", level 0 = "upper"), e.g. from
            :func:`scripts.zones.report_zones`; at least one zone named.
        rng: the random state (the calling transform's, so that ``set_determinism`` reproduces the draws).
        clear_side_prob: probability of a negated sentence about the clear side of a unilateral report.

    Returns:
        the report text, e.g. "Patchy opacity in the left lower zone. The right lung is clear."
    """
    named = [(SIDES[s], tuple(int(lv) for lv in np.flatnonzero(zones[s]))) for s in range(2) if zones[s].any()]
    if not named:
        raise ValueError("clinical_phrasing needs at least one named zone")
    if len(named) == 2 and rng.rand() < 0.5:
        named.reverse()
    finding = _pick(rng, FINDINGS)
    places = [_location(levels, side, rng) for side, levels in named]
    form = rng.randint(4)
    if form == 0:
        text = f"{finding.capitalize()} in the {' and the '.join(places)}."
    elif form == 1:
        second = _pick(rng, FINDINGS)
        parts = [f"{places[0].capitalize()} {finding}"] + [f"{p} {second}" for p in places[1:]]
        text = "; ".join(parts) + "."
    elif form == 2 and len(places) == 2:
        text = f"Bilateral {finding}, {places[0]} and {places[1]}."
    else:
        verb = "are" if finding.endswith("s") else "is"
        text = f"There {verb} {finding} in the {' and the '.join(places)}."
    if len(named) == 1 and rng.rand() < clear_side_prob:
        other = SIDES[1 - SIDES.index(named[0][0])]
        text += " " + _pick(rng, _CLEAR_SIDE).format(o=other, O=other.capitalize(), f=_pick(rng, FINDINGS))
    return text


def qata_template(zones: np.ndarray) -> str:
    """``zones`` written in the QaTa-COV19 report template (LViT's annotations), e.g. "bilateral pulmonary infection,
    two infected areas, all left lung and lower right lung.".

    The template also counts "infected areas", which the zones do not determine; the count written is the one the
    training reports give most often for the laterality (one for a unilateral report, two for a bilateral one: 96 %
    and 89 % of those training images). A side with all three levels is written "all" (as in 4,246 of the 4,540
    whole-lung mentions of the training images' reports), other sides as their levels top to bottom ("middle
    lower"). The rewrite gives back the very report for 88 % of the training images and 93 % of the validation
    images, and the same zones for all of them (``ReportToTemplate`` leaves a report already in the template as
    it is).

    Args:
        zones: 2×3 bool [side, level] (side 0 = "left", level 0 = "upper"), e.g. from
            :func:`scripts.zones.report_zones`; at least one zone named.
    """
    zones = np.asarray(zones, dtype=bool)
    if zones.shape != (len(SIDES), len(LEVELS)) or not zones.any():
        raise ValueError(f"qata_template needs a 2×3 zone array with at least one zone named, not {zones.tolist()}")
    places = []
    for s, side in enumerate(SIDES):
        if zones[s].any():
            levels = "all" if zones[s].all() else " ".join(LEVELS[v] for v in np.flatnonzero(zones[s]))
            places.append(f"{levels} {side} lung")
    if len(places) == 1:
        return f"unilateral pulmonary infection, one infected area, {places[0]}."
    return f"bilateral pulmonary infection, two infected areas, {places[0]} and {places[1]}."


class ReportTemplate(NamedTuple):
    """A report template: ``write`` (2×3 zones → text) and ``pattern``, which a report already in the template
    matches in full (lower case, single spaces)."""

    write: Callable[[np.ndarray], str]
    pattern: re.Pattern


# the templates a report can be rewritten into, by name (the configs' ``report_template``)
REPORT_TEMPLATES = {
    "qata": ReportTemplate(
        qata_template, re.compile(r"(unilateral|bilateral) pulmonary infection, [a-z]+ infected areas?, [a-z ]+ lung\.")
    ),
}
