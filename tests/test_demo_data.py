import json

import numpy as np
from PIL import Image

from bundle.demo_data import LEVELS, make_sample, write_demo_data, zone_report


def test_zone_report_follows_the_qata_template():
    assert zone_report({("left", "lower")}) == "unilateral pulmonary infection, one infected area, lower left lung."
    both = zone_report({("left", lv) for lv in LEVELS} | {("right", "middle"), ("right", "lower")})
    assert both == "bilateral pulmonary infection, two infected areas, all left lung and middle lower right lung."


def test_mask_marks_exactly_the_named_zones():
    rng = np.random.default_rng(3)
    for _ in range(20):
        image, mask, report, named = make_sample(rng, 224)
        assert image.shape == mask.shape == (224, 224) and image.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        ys, xs = np.nonzero(mask)
        sides = {"left" if x < 112 else "right" for x in xs}
        assert sides == {side for side, _ in named}, report
        for side, _ in named:
            assert f"{side} lung" in report


def test_image_holds_opacities_the_report_does_not_name():
    # without unnamed opacities an image-only model could segment every bright blob and the text would not matter
    rng = np.random.default_rng(5)
    extra = 0
    for _ in range(30):
        image, mask, _, _ = make_sample(rng, 224)
        bright = image > np.percentile(image[mask > 0], 10)
        extra += int((bright & (mask == 0)).sum() > 200)
    assert extra > 10


def test_write_is_deterministic_and_lists_every_file(tmp_path):
    a = write_demo_data(tmp_path / "a", num_samples=20, seed=7)
    b = write_demo_data(tmp_path / "b", num_samples=20, seed=7)
    da, db = json.loads(a.read_text()), json.loads(b.read_text())
    assert da == db
    assert [len(da[k]) for k in ("training", "validation", "test")] == [14, 3, 3]
    for entry in da["training"] + da["validation"] + da["test"]:
        assert set(entry) == {"id", "image", "label", "report"}
        img_a = np.array(Image.open(tmp_path / "a" / entry["image"]))
        img_b = np.array(Image.open(tmp_path / "b" / entry["image"]))
        np.testing.assert_array_equal(img_a, img_b)
        assert (tmp_path / "a" / entry["label"]).is_file()
