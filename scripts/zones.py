"""Lung zones named by a chest X-ray report: {left, right} × {upper, middle, lower}, and their raster on the image.

Used by the report-consistency metric (``scripts.metrics``) and by SSA's directional guidance. The zones are the
coarse grid the QaTa-COV19 reports are written in ("middle lower left lung and lower right lung"): image halves ×
thirds of the lung fields' height. Free-text variants are read too ("left lower lobe", "right base", "both lungs", "bilateral lower
zones", "bibasal").
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["SIDES", "LEVELS", "CXR_LEVEL_EDGES", "report_zones", "zone_map"]

SIDES = ("left", "right")
LEVELS = ("upper", "middle", "lower")

_SIDE_WORDS = {"left": (0,), "lt": (0,), "right": (1,), "rt": (1,), "both": (0, 1), "bilateral": (0, 1),
               "bilaterally": (0, 1), "bibasal": (0, 1), "bibasilar": (0, 1)}
_LEVEL_WORDS = {
    "upper": (0,), "apex": (0,), "apices": (0,), "apical": (0,), "top": (0,),
    "middle": (1,), "mid": (1,), "midzone": (1,), "midzones": (1,), "perihilar": (1,), "hilar": (1,),
    "lower": (2,), "base": (2,), "bases": (2,), "basal": (2,), "basilar": (2,), "bibasal": (2,), "bibasilar": (2,),
    "bottom": (2,),
    "all": (0, 1, 2), "whole": (0, 1, 2), "entire": (0, 1, 2), "diffuse": (0, 1, 2), "throughout": (0, 1, 2),
}
# words that end a location phrase ("left lower lobe", "right base")
_NOUNS = {"lung", "lungs", "lobe", "lobes", "zone", "zones", "field", "fields", "hemithorax", "base", "bases",
          "apex", "apices", "region", "regions"}
_BREAKS = {",", ".", ";", ":"}
# conjunctions that open a clause of their own: a negation does not reach across them ("opacity in the left base
# but the right lung is clear")
_CLAUSE_WORDS = {"but", "whereas", "while", "however"}
# negation cues: a clause with one names no zone ("no opacity in the left lung", "the right lung is clear")
_NEGATIONS = {"no", "not", "without", "clear", "normal", "unremarkable", "spared", "free", "negative", "nil"}
# exceptions end a negation's reach: "left lung clear apart from the lt base" names the left base
_EXCEPTIONS = {"except", "apart", "excepting", "besides"}
# what follows one in its clause is taken out of what the clause names: "bilateral consolidation sparing the apices"
_EXCLUSIONS = {"sparing", "spares", "excluding"}


class _Mention:
    def __init__(self, sides: tuple[int, ...], levels: set[int]) -> None:
        self.sides, self.levels, self.closed_by_noun = sides, set(levels), False


def report_zones(text: str | None) -> np.ndarray | None:
    """The lung zones a report names, as a 2×3 boolean array [side, level] (side 0 = "left", level 0 = "upper"),
    or None when it names no location.

    A side without a level ("left lung", "both lungs") names all three levels of that side; levels without a side
    ("lower zones") name both sides. A bare side word in a phrase with no lung noun and no level ("bilateral
    pulmonary infection") names zones only when the report names nothing more specific. A clause (between
    punctuation or "but"/"whereas"/"while"/"however") with a negation cue ("no", "not", "without", "clear",
    "normal", "unremarkable", "spared", ...) names nothing: "the right lung is clear" does not name the right lung;
    an exception after the cue ("apart from", "except") names what follows it. What follows "sparing" in its
    clause is taken out of the zones named ("bilateral consolidation sparing the apices": the middle and lower
    zones of both lungs).
    """
    if not text:
        return None
    tokens = re.findall(r"[a-z]+|[,.;:]", text.lower())
    mentions: list[_Mention] = []
    clause_start, negated = 0, False  # the mentions of the current clause: mentions[clause_start:]
    pending: set[int] = set()  # levels seen before their side ("lower left lung")
    pending_noun = False
    current: _Mention | None = None  # a side still taking levels after it ("left lower lobe")
    after_lung: _Mention | None = None  # a side just closed by "lung(s)", still taking a level noun ("lung bases")
    # a "Left lung:" heading: the side of the levels in the sentence after it ("Left lung: opacity in the lower zone.")
    heading: _Mention | None = None
    exclusion_start: int | None = None  # the clause's mentions from here on follow "sparing"
    excluded: list[_Mention] = []

    def close_exclusion() -> None:
        nonlocal exclusion_start
        if exclusion_start is not None:
            excluded.extend(mentions[exclusion_start:])
            del mentions[exclusion_start:]
            exclusion_start = None

    def close_clause() -> None:
        """Ends the clause: a negated one names nothing (nor the heading it follows), "sparing" moves its zones out."""
        nonlocal heading, exclusion_start
        close_pending()
        if negated:
            if heading is not None:  # "Right lung: normal." names nothing; emptied, not removed: indices hold
                heading.sides, heading = (), None
            del mentions[clause_start:]
            exclusion_start = None
        close_exclusion()

    def close_pending() -> None:
        nonlocal heading
        if pending:  # levels that never met a side name both sides ("lower zones.", "all lung and ...")
            sides = (0, 1)
            if heading is not None:  # ... or the heading's side, which they narrow (the heading names no more)
                sides, heading.sides, heading = heading.sides, (), None
            mention = _Mention(sides, pending)
            mention.closed_by_noun = True
            mentions.append(mention)

    for token in tokens:
        if token in _BREAKS or token in _CLAUSE_WORDS or (token in _EXCEPTIONS and negated):
            close_clause()
            clause = mentions[clause_start:]
            if token == ":" and len(clause) == 1 and not clause[0].levels and clause[0].closed_by_noun:
                heading = clause[0]
            elif token == ".":
                heading = None
            clause_start, negated = len(mentions), False
            pending, pending_noun = set(), False
            current = after_lung = None
            continue
        if after_lung is not None and token in _LEVEL_WORDS:  # "left lung base", "both lung bases"
            after_lung.levels.update(_LEVEL_WORDS[token])
            after_lung = None
            continue
        after_lung = None
        if token in _NEGATIONS:
            negated = True
        if token in _EXCLUSIONS and exclusion_start is None:
            close_pending()  # levels before the cue are named: "lower zones sparing the bases" is not an exclusion
            pending, pending_noun = set(), False
            current = None
            exclusion_start = len(mentions)
            continue
        if token == "and" and pending and pending_noun:
            close_pending()
            pending, pending_noun = set(), False
            current = None
            continue
        if token in _SIDE_WORDS:
            current = _Mention(_SIDE_WORDS[token], pending)
            current.closed_by_noun = pending_noun or bool(pending)
            mentions.append(current)
            pending, pending_noun = set(), False
        if token in _LEVEL_WORDS:  # after the side check: "bibasal" is both
            if current is not None:
                current.levels.update(_LEVEL_WORDS[token])
            else:
                pending.update(_LEVEL_WORDS[token])
        if token in _NOUNS:
            if current is not None:
                current.closed_by_noun = True
                if token in ("lung", "lungs") and not current.levels:
                    after_lung = current
                current = None
            else:
                pending_noun = True
    close_clause()

    zones = _named(mentions)
    if zones is None:
        return None
    spared = _named(excluded)
    if spared is not None:
        zones &= ~spared
    return zones if zones.any() else None


def _named(mentions: list[_Mention]) -> np.ndarray | None:
    """The zones of ``mentions``: the specific ones (with a level or a lung noun), else all; None without any."""
    mentions = [m for m in mentions if m.sides]  # a heading whose sentence named its levels, or was negated
    specific = [m for m in mentions if m.levels or m.closed_by_noun]
    chosen = specific or mentions
    if not chosen:
        return None
    zones = np.zeros((len(SIDES), len(LEVELS)), dtype=bool)
    for m in chosen:
        for side in m.sides:
            for level in m.levels or (0, 1, 2):
                zones[side, level] = True
    return zones


# The lung fields of a frontal chest film do not fill the image: on QaTa-COV19 the diffuse "all left lung and all
# right lung" masks span rows 14-74 % of the image (5-95 % row quantiles, training split), and the thirds of that
# span start at 34 % and 54 %. With these edges the ground-truth masks put a median 1 % (mean 15 %) of their
# foreground outside the zones their report names on the training split, 5 % (mean 19 %) on the validation split;
# with image thirds a median 11 % (mean 32 %) on the training split.
CXR_LEVEL_EDGES = (0.34, 0.54)


def zone_map(
    zones: np.ndarray | None,
    spatial_shape: tuple[int, int],
    left_is_image_left: bool = True,
    level_edges: tuple[float, float] = CXR_LEVEL_EDGES,
) -> np.ndarray:
    """Raster of the named zones on an image of ``spatial_shape`` (X×Y, MONAI's order: x = column, y = row from
    the top), as an int64 X×Y map: 1 + side·3 + level where the zone is named, 0 elsewhere (all 0 for None).

    Sides are the image halves; levels are split at ``level_edges`` (fractions of the image height, top = 0): rows
    above the first edge are "upper", below the second "lower". ``left_is_image_left``: "left" in the report is the
    image's left half (QaTa-COV19, see the data notes); False for the radiological convention, where the patient's
    left is on the image's right.
    """
    x, y = spatial_shape
    upper_end, middle_end = level_edges
    if not 0 < upper_end < middle_end < 1:
        raise ValueError(f"level_edges must be two increasing fractions in (0, 1), not {level_edges}")
    out = np.zeros((x, y), dtype=np.int64)
    if zones is None:
        return out
    col_edges = [0, x // 2, x]
    row_edges = [0, round(upper_end * y), round(middle_end * y), y]
    for side in range(2):
        half = side if left_is_image_left else 1 - side
        for level in range(3):
            if zones[side, level]:
                out[col_edges[half]:col_edges[half + 1], row_edges[level]:row_edges[level + 1]] = 1 + side * 3 + level
    return out
