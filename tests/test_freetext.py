"""Free-text reports (issue 19, part 4): the training-time rephrasing (scripts/phrasing.py, RandRephraseReportd)
and the held-out free-text validation reports (bundle/freetext.py), written by other rules."""

import itertools
import json
import re

import numpy as np
import pytest
from conftest import SHARED_DATA, config

from bundle.freetext import EVAL_FINDINGS, freetext_report, write_freetext_datalists
from scripts.phrasing import FINDINGS, clinical_phrasing
from scripts.transforms import RandRephraseReportd, TokenizeReport, TokenizeReportd
from scripts.zones import report_zones

EVERY_ZONE_SET = [np.array(z, dtype=bool).reshape(2, 3) for z in itertools.product([0, 1], repeat=6) if any(z)]
TEMPLATE = "bilateral pulmonary infection, two infected areas, {l} left lung and {r} right lung."


def _qata_reports() -> list[str]:
    reports = SHARED_DATA / "qata" / "reports"
    if not reports.is_dir():
        pytest.skip(f"shared QaTa data not found at {reports}")
    return sorted({p.read_text().strip() for p in reports.glob("*.txt")})


def test_every_phrasing_names_the_zones_it_was_given():
    rng = np.random.RandomState(0)
    for zones in EVERY_ZONE_SET:
        for _ in range(60):
            text = clinical_phrasing(zones, rng)
            np.testing.assert_array_equal(report_zones(text), zones, err_msg=text)


def test_rephrasing_keeps_every_qata_report_s_zones_and_fits_the_tokenizer():
    tokenizer = TokenizeReport(max_length=24)
    rephrase = RandRephraseReportd(prob=1.0, tokenizer=tokenizer)
    rephrase.set_random_state(0)
    load = TokenizeReportd(keys="report", tokenizer=tokenizer)
    changed = 0
    for report in _qata_reports():
        for _ in range(5):
            d = rephrase(load({"report": report}))
            np.testing.assert_array_equal(report_zones(d["report"]), report_zones(report), err_msg=d["report"])
            assert tokenizer.token_count(d["report"]) <= 24  # never cut
            ids, mask = tokenizer(d["report"])
            assert (d["report_ids"] == ids).all() and (d["report_mask"] == mask).all()
            changed += d["report"] != report
    assert changed > 0.95 * 5 * len(_qata_reports())


def test_rephrasing_leaves_reports_without_a_zone_and_is_reproducible():
    rephrase = RandRephraseReportd(prob=1.0)
    d = {"report": "pulmonary infection.", "report_ids": 1, "report_mask": 1}
    assert rephrase(d) == d
    assert rephrase({"image": 0}) == {"image": 0}  # no report key: nothing to rewrite
    texts = []
    for _ in range(2):
        rephrase.set_random_state(7)
        texts.append([rephrase({"report": TEMPLATE.format(l="all", r="lower")})["report"] for _ in range(5)])
    assert texts[0] == texts[1] and len(set(texts[0])) > 1


def test_tokenizer_cache_is_bounded():
    t = TokenizeReport(cache_size=3)
    for i in range(10):
        t(f"report {i}")
    assert len(t._cache) == 3 and "report 9" in t._cache


def test_held_out_reports_name_the_same_zones_with_other_words():
    words = set()
    for i, report in enumerate(_qata_reports()):
        text = freetext_report(report, f"sample_{i}")
        np.testing.assert_array_equal(report_zones(text), report_zones(report), err_msg=text)
        assert freetext_report(report, f"sample_{i}") == text  # a fixed function of the id
        words |= set(re.findall(r"[a-z-]+", text.lower()))
    # no finding, location or clear-side wording of the augmentation: validation cannot reward learning it
    augmentation = set()
    rng = np.random.RandomState(1)
    for zones in EVERY_ZONE_SET:
        for _ in range(40):
            augmentation |= set(re.findall(r"[a-z-]+", clinical_phrasing(zones, rng).lower()))
    shared = (words & augmentation) - {"left", "right", "the", "in", "and", "is", "lung", "mid", "upper", "lower", "no"}
    assert shared <= {"of"}, shared
    assert not set(EVAL_FINDINGS) & set(FINDINGS)


def test_freetext_datalists_rewrite_the_split_and_drop_its_reports(tmp_path):
    entries = [{"id": f"s{i}", "image": f"images/s{i}.png", "label": f"masks/s{i}.png",
                "report": TEMPLATE.format(l="all", r="lower")} for i in range(3)]
    src = tmp_path / "datalist.json"
    src.write_text(json.dumps({"training": entries[:1], "validation": entries}))
    free, none = write_freetext_datalists(src)
    free_d, none_d = json.loads(free.read_text()), json.loads(none.read_text())
    assert free_d["training"] == entries[:1] and none_d["training"] == entries[:1]
    assert [e["report"] != TEMPLATE.format(l="all", r="lower") for e in free_d["validation"]] == [True] * 3
    assert all("report" not in e for e in none_d["validation"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"validation": [{"id": "x", "image": "x.png"}]}))
    with pytest.raises(ValueError, match=r"bad\.json: x has no report"):
        write_freetext_datalists(bad)


def test_train_config_rephrases_before_the_zone_raster(demo_dir):
    """With report_rephrase_prob, the training pipeline rewrites reports and rasters the zones of the rewrite."""
    from monai.bundle import ConfigParser

    from scripts.zones import zone_map

    parser = ConfigParser()
    parser.read_config(config("train.yaml"))
    parser.update({"dataset_dir": str(demo_dir), "spatial_size": [64, 64], "report_rephrase_prob": 1.0,
                   "report_dropout": 0.0})
    items = parser.get_parsed_content("train#datalist")[:4]
    transform = parser.get_parsed_content("train#preprocessing")
    transform.set_random_state(0)
    for item in items:
        out = transform(dict(item))
        assert out["report"] != item["report"]
        np.testing.assert_array_equal(report_zones(out["report"]), report_zones(item["report"]))
        np.testing.assert_array_equal(out["zones"][0].numpy(), zone_map(report_zones(out["report"]), (64, 64)))
