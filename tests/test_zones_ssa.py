"""Report → lung zones cases SSA's directional guidance relies on that tests/test_zones.py does not spell out: the
issue's phrases verbatim, and every QaTa-COV19 report against an independent reading of its template."""

import re

import numpy as np
import pytest
from conftest import SHARED_DATA, config

from scripts.zones import report_zones

L, R = 0, 1
U, M, D = 0, 1, 2
ALL_LEFT = [(L, U), (L, M), (L, D)]
ALL_RIGHT = [(R, U), (R, M), (R, D)]


def _zones(*pairs):
    z = np.zeros((2, 3), dtype=bool)
    for side, level in pairs:
        z[side, level] = True
    return z


@pytest.mark.parametrize(
    "text, expected",
    [
        ("left lower lobe", [(L, D)]),
        ("both lungs", ALL_LEFT + ALL_RIGHT),
        ("bilateral", ALL_LEFT + ALL_RIGHT),
        ("right base", [(R, D)]),
        ("bilateral pulmonary infection, two infected areas, all left lung and middle lower right lung.",
         ALL_LEFT + [(R, M), (R, D)]),
        ("unilateral pulmonary infection, one infected area, middle left lung.", [(L, M)]),
        ("unilateral pulmonary infection, one infected area, all left lung.", ALL_LEFT),
        ("bilateral pulmonary infection, four infected areas, upper lower left lung and upper middle right lung.",
         [(L, U), (L, D), (R, U), (R, M)]),
        # what the network parses: its token ids decoded by an uncased WordPiece tokenizer (spaces before
        # punctuation, lower case)
        ("bilateral pulmonary infection , two infected areas , all left lung and middle lower right lung .",
         ALL_LEFT + [(R, M), (R, D)]),
        ("Left Lower Lobe and RIGHT BASE", [(L, D), (R, D)]),
    ],
)
def test_issue_cases(text, expected):
    np.testing.assert_array_equal(report_zones(text), _zones(*expected))


_LEVELS = {"upper": (U,), "middle": (M,), "lower": (D,), "all": (U, M, D)}


def _template_zones(text: str) -> np.ndarray:
    """Independent reading of QaTa's template '<side>lateral pulmonary infection, <n> infected area(s), <levels>
    <side> lung[ and <levels> <side> lung].' ("all lung" without a side: both sides)."""
    m = re.fullmatch(r"(?:bi|uni)lateral pulmonary infection, \w+ infected areas?, (.+)\.", text)
    assert m, text
    z = np.zeros((2, 3), dtype=bool)
    for part in m.group(1).split(" and "):
        words = part.split()
        assert words[-1] == "lung", text
        sides = {"left": (L,), "right": (R,)}.get(words[-2])
        levels = words[:-2] if sides else words[:-1]
        for side in sides or (L, R):
            for word in levels:
                z[side, list(_LEVELS[word])] = True
    return z


def test_every_qata_report_matches_its_template():
    reports = SHARED_DATA / "qata" / "reports"
    if not reports.is_dir():
        pytest.skip(f"shared QaTa data not found at {reports}")
    texts = sorted({p.read_text().strip() for p in reports.glob("*.txt")})
    wrong = [t for t in texts if not np.array_equal(report_zones(t), _template_zones(t))]
    assert len(texts) > 150 and wrong == []


@pytest.mark.parametrize("workflow", ["train.yaml", "inference.yaml"])
def test_ssa_guidance_follows_the_config_s_one_side_convention(workflow):
    """configs/networks/ssa.yaml once hard-coded the QaTa convention: switching report_left_is_image_left changed
    the validation zones but not SSA's guidance."""
    from monai.bundle import ConfigParser

    for convention in (True, False):
        parser = ConfigParser()
        parser.read_config([config(workflow), config("networks/ssa.yaml")])
        parser["report_left_is_image_left"] = convention
        assert parser.get_parsed_content("network_def").zone_guidance.left_is_image_left is convention
