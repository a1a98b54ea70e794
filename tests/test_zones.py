"""Report -> lung zones, their raster, and the report-consistency metrics."""

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from scripts.metrics import ReportConsistencyMetric, report_consistency
from scripts.transforms import ReportZonesd
from scripts.zones import report_zones, zone_map

L, R = 0, 1
U, M, D = 0, 1, 2


def _zones(*pairs):
    z = np.zeros((2, 3), dtype=bool)
    for side, level in pairs:
        z[side, level] = True
    return z


ALL_LEFT = [(L, U), (L, M), (L, D)]
ALL_RIGHT = [(R, U), (R, M), (R, D)]


@pytest.mark.parametrize(
    "text, expected",
    [
        # QaTa-COV19 templates
        ("bilateral pulmonary infection, two infected areas, all left lung and all right lung.", ALL_LEFT + ALL_RIGHT),
        ("bilateral pulmonary infection, two infected areas, lower left lung and lower right lung.", [(L, D), (R, D)]),
        ("unilateral pulmonary infection, one infected area, lower right lung.", [(R, D)]),
        ("bilateral pulmonary infection, two infected areas, middle lower left lung and lower right lung.",
         [(L, M), (L, D), (R, D)]),
        ("bilateral pulmonary infection, three infected areas, upper lower left lung and upper middle lower right "
         "lung.", [(L, U), (L, D)] + ALL_RIGHT),
        ("unilateral pulmonary infection, one infected area, upper middle right lung.", [(R, U), (R, M)]),
        ("bilateral pulmonary infection, two infected areas, all lung and all right lung.", ALL_LEFT + ALL_RIGHT),
        # free text
        ("Consolidation in the left lower lobe.", [(L, D)]),
        ("right base opacity", [(R, D)]),
        ("patchy opacities in both lungs", ALL_LEFT + ALL_RIGHT),
        ("bilateral infiltrates", ALL_LEFT + ALL_RIGHT),
        ("bilateral lower zone consolidation", [(L, D), (R, D)]),
        ("opacities in the lower zones bilaterally.", [(L, D), (R, D)]),
        ("bibasal atelectasis", [(L, D), (R, D)]),
        # negation (issue 19): the clear lung is not named, an exception after the cue is
        ("Right upper and middle lobe pneumonia; left lung clear apart from the lt base.", [(R, U), (R, M), (L, D)]),
        ("patchy opacity in the left lower zone; the right lung is clear.", [(L, D)]),
        ("no opacity in the left lung, consolidation at the right base", [(R, D)]),
        ("opacity at the left base but the right lung is normal", [(L, D)]),
        ("Ground-glass change in both lower zones. No consolidation in the upper zones.", [(L, D), (R, D)]),
        ("upper and lower left lung", [(L, U), (L, D)]),
        ("rt mid zone haziness", [(R, M)]),
        ("left apical pneumothorax", [(L, U)]),
        # a level noun after "lung(s)"; a "Side lung:" heading gives its side to the sentence after it
        ("Airspace opacity in the left lung base.", [(L, D)]),
        ("Patchy changes at both lung bases, more marked on the left.", [(L, D), (R, D)]),
        ("Left lung: clear. Right lung: consolidation in the upper zone.", [(R, U)]),
        ("Right lung: normal. Left lung: opacity in the mid and lower zones.", [(L, M), (L, D)]),
        ("Left lung: consolidation.", ALL_LEFT),
        ("Right lung: normal. Bilateral infiltrates.", ALL_LEFT + ALL_RIGHT),
        ("Findings: opacity in the lower zones.", [(L, D), (R, D)]),
        # what follows "sparing" in its clause is taken out
        ("Extensive bilateral consolidation sparing the apices.", [(L, M), (L, D), (R, M), (R, D)]),
        ("Dense consolidation throughout the left lung with sparing of the right.", ALL_LEFT),
        ("Opacities in both lungs, sparing the right upper zone.", ALL_LEFT + [(R, M), (R, D)]),
    ],
)
def test_report_zones(text, expected):
    np.testing.assert_array_equal(report_zones(text), _zones(*expected))


@pytest.mark.parametrize("text", [None, "", "pulmonary infection.", "no acute findings", "both lungs are clear.",
                                  "Right lung: normal"])  # a negated last sentence without its full stop
def test_reports_without_a_location_name_no_zones(text):
    assert report_zones(text) is None


def test_every_qata_report_names_a_zone():
    reports = SHARED_DATA / "qata" / "reports"
    if not reports.is_dir():
        pytest.skip(f"shared QaTa data not found at {reports}")
    texts = {p.read_text().strip() for p in reports.glob("*.txt")}
    unparsed = [t for t in texts if report_zones(t) is None]
    assert len(texts) > 150 and unparsed == []


def test_zone_map_geometry_and_conventions():
    z = _zones((L, D), (R, U))
    raster = zone_map(z, (100, 200), level_edges=(0.25, 0.5))  # X = columns, Y = rows from the top
    assert raster.shape == (100, 200)
    assert set(np.unique(raster[:50, 100:])) == {1 + 0 * 3 + 2}  # left half, rows below half: left lower
    assert set(np.unique(raster[50:, :50])) == {1 + 1 * 3 + 0}  # right half, top quarter: right upper
    assert (raster[:50, :100] == 0).all() and (raster[50:, 50:] == 0).all()
    radiological = zone_map(z, (100, 200), left_is_image_left=False, level_edges=(0.25, 0.5))
    assert set(np.unique(radiological[50:, 100:])) == {3}  # the patient's left drawn on the image's right
    assert not zone_map(None, (8, 8)).any()
    with pytest.raises(ValueError, match="increasing fractions"):
        zone_map(z, (8, 8), level_edges=(0.6, 0.3))


def test_report_zones_transform_rasters_on_the_image_grid():
    d = ReportZonesd(level_edges=(0.25, 0.5))({"image": torch.zeros(1, 40, 80), "report": "left lung"})
    assert d["zones"].shape == (1, 40, 80) and d["zones"].dtype == torch.uint8
    assert (d["zones"][0, :20] > 0).all() and (d["zones"][0, 20:] == 0).all()
    none = ReportZonesd()({"image": torch.zeros(1, 8, 8)})
    assert not none["zones"].any()


def test_report_consistency_values():
    z = torch.as_tensor(zone_map(_zones((L, D)), (4, 6), level_edges=(1 / 3, 2 / 3)))[None, None]  # rows 4-5
    pred = torch.zeros(1, 1, 4, 6)
    pred[0, 0, 0, 4:] = 1  # 2 pixels in the named zone
    pred[0, 0, 3, 0:2] = 1  # 2 outside (right upper)
    outside, missed = report_consistency(pred, z)
    assert outside.item() == pytest.approx(0.5) and missed.item() == 0.0
    two = torch.as_tensor(zone_map(_zones((L, D), (R, D)), (4, 6), level_edges=(1 / 3, 2 / 3)))[None, None]
    _, missed = report_consistency(pred, two)
    assert missed.item() == pytest.approx(0.5)  # the right lower zone has no predicted pixel
    empty_o, empty_m = report_consistency(torch.zeros_like(pred), two)
    assert torch.isnan(empty_o).all() and empty_m.item() == 1.0
    no_zone_o, no_zone_m = report_consistency(pred, torch.zeros_like(two))
    assert torch.isnan(no_zone_o).all() and torch.isnan(no_zone_m).all()


def test_metric_averages_where_defined():
    z = torch.as_tensor(zone_map(_zones((L, D)), (4, 6), level_edges=(1 / 3, 2 / 3)))[None, None]
    inside = torch.zeros(1, 1, 4, 6)
    inside[0, 0, 0, 5] = 1
    outside = torch.zeros(1, 1, 4, 6)
    outside[0, 0, 3, 0] = 1
    metric = ReportConsistencyMetric("outside")
    metric(torch.cat([inside, outside]), torch.cat([z, z]))
    metric(torch.zeros(1, 1, 4, 6), z)  # nothing predicted: undefined, left out of the mean
    assert metric.aggregate().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="kind"):
        ReportConsistencyMetric("inside")


def test_metric_is_nan_when_no_image_has_a_located_report():
    """Report-less validation (MONAI Label's image + label lists): nothing to measure is NaN, not a perfect 0."""
    for kind in ("outside", "missed"):
        metric = ReportConsistencyMetric(kind)
        metric(torch.ones(2, 1, 4, 6), torch.zeros(2, 1, 4, 6))
        assert torch.isnan(metric.aggregate()).all()


def test_qata_ground_truth_stays_mostly_in_the_named_zones():
    """The zone grid fits real data: ground-truth masks of QaTa's validation split lie mostly in the zones their
    reports name (a median validation image puts under 10 % of its lesion elsewhere)."""
    from PIL import Image

    root = SHARED_DATA / "qata"
    if not root.is_dir():
        pytest.skip(f"shared QaTa data not found at {root}")
    ids = json.loads((root / "split.json").read_text())["val"][::10]
    outside, missed = [], []
    for i in ids:
        mask = torch.as_tensor(np.array(Image.open(root / "masks" / f"{i}.png")).T > 127)[None, None]
        text = (root / "reports" / f"{i}.txt").read_text()
        z = torch.as_tensor(zone_map(report_zones(text), tuple(mask.shape[2:])))[None, None]
        o, m = report_consistency(mask, z)
        outside.append(o.item())
        missed.append(m.item())
    assert np.median(outside) < 0.1 and np.mean(missed) < 0.1
    flipped = [report_consistency(torch.as_tensor(np.array(Image.open(root / "masks" / f"{i}.png")).T[::-1].copy()
                                                  > 127)[None, None],
                                  torch.as_tensor(zone_map(report_zones((root / "reports" / f"{i}.txt").read_text()),
                                                           (224, 224)))[None, None])[0].item() for i in ids]
    assert np.median(flipped) > np.median(outside) + 0.1  # a left-right mix-up is caught


def test_zones_check_on_demo_data(demo_dir):
    from bundle.zones_check import ground_truth_consistency

    r = ground_truth_consistency(demo_dir / "datalist.json", "training")
    n = len(json.loads((demo_dir / "datalist.json").read_text())["training"])
    assert r["images"] + r["no_location"] == n
    # the demo masks mark the opacities the report names: every named zone is hit, little lies outside
    assert r["missed_zones"]["mean"] == 0.0 and r["outside_named"]["median"] < 0.3
    flipped = ground_truth_consistency(demo_dir / "datalist.json", "training", left_is_image_left=False)
    assert flipped["missed_zones"]["mean"] > 0.5 and flipped["outside_named"]["median"] > 0.5
