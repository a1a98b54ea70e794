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


@pytest.mark.parametrize("left_is_image_left", [True, False])
def test_zones_on_the_data_path_give_the_guidance_of_decoded_token_ids(left_is_image_left, monkeypatch):
    """ReportZonesd's raster (the data path) and the decoded token ids (MONAI Label) must guide SSA alike; with
    zones given, SSA does not decode the report at all."""
    import torch
    from conftest import tokenize_reports

    from scripts.networks.ssa import SSA, ZoneGuidance, guidance_from_zones
    from scripts.text import default_text_encoder_dir
    from scripts.transforms import ReportZonesd

    reports = ["lower left lung.", "", "pulmonary infection.", "Bilateral upper zones and right middle zone."]
    zones_d = ReportZonesd(left_is_image_left=left_is_image_left)
    raster = torch.stack([zones_d({"report": r, "image": torch.zeros(1, 64, 96)})["zones"] for r in reports])
    ids, mask = tokenize_reports(reports)
    decoded, decoded_guided = ZoneGuidance(default_text_encoder_dir(), left_is_image_left)(ids, mask, (64, 96))
    guidance, guided = guidance_from_zones(raster)
    assert guided.tolist() == decoded_guided.tolist() == [True, False, False, True]
    torch.testing.assert_close(guidance, decoded)

    net = SSA(left_is_image_left=left_is_image_left).train()
    monkeypatch.setattr(ZoneGuidance, "decode", lambda *a: pytest.fail("decoded although zones were given"))
    out = net(torch.rand(4, 1, 64, 96), ids, mask, zones=raster)
    torch.testing.assert_close(out["guidance"], decoded)


def test_ssa_config_hands_the_batch_zones_to_the_network(demo_dir):
    """train.yaml rasters the zones after the random transforms; ssa.yaml's prepare_batch passes them on."""
    from monai.bundle import ConfigParser
    from monai.data import list_data_collate

    parser = ConfigParser()
    parser.read_config([config("train.yaml"), config("networks/ssa.yaml")])
    parser.update({"dataset_dir": str(demo_dir), "spatial_size": [64, 64]})
    items = parser.get_parsed_content("train#datalist")[:2]
    transform = parser.get_parsed_content("train#preprocessing")
    batch = list_data_collate([transform(i) for i in items])
    assert batch["zones"].shape == (2, 1, 64, 64)
    _, _, _, kwargs = parser.get_parsed_content("prepare_batch")(batch, "cpu")
    assert set(kwargs) == {"text_ids", "text_mask", "zones"}
