import pytest
import torch
from conftest import config
from monai.bundle import ConfigParser
from monai.data import list_data_collate

from scripts.transforms import TokenizeReport, TokenizeReportd


@pytest.fixture(scope="module")
def tokenize():
    return TokenizeReportd(keys="report", tokenizer=TokenizeReport(max_length=24))


def test_tokens_are_fixed_length_and_masked(tokenize):
    d = tokenize({"image": "a.png", "report": "unilateral pulmonary infection, one infected area, lower left lung."})
    ids, mask = d["report_ids"], d["report_mask"]
    assert ids.shape == mask.shape == (24,) and ids.dtype == mask.dtype == torch.int64
    n = int(mask.sum())
    assert 10 < n < 24 and mask[:n].all() and not mask[n:].any()
    assert "left" in tokenize.tokenize._tok().decode(ids[:n])


def test_each_distinct_text_is_tokenised_once():
    t = TokenizeReport(max_length=8)
    calls = []
    tok = t._tok()
    t._tokenizer = lambda *a, **k: calls.append(a) or tok(*a, **k)
    a1, _ = t("lower left lung.")
    a2, _ = t("lower left lung.")
    t("lower right lung.")
    assert len(calls) == 2 and torch.equal(a1, a2)
    a1[0] = -1  # callers get copies: the cache cannot be corrupted
    assert t("lower left lung.")[0][0] != -1


@pytest.mark.parametrize("report", [None, "", "   "])
def test_missing_or_empty_report_is_an_error_naming_the_sample(tokenize, report):
    with pytest.raises(ValueError, match="x_017.png"):
        tokenize({"image": "/data/x_017.png", "report": report})


def test_non_text_report_is_an_error(tokenize):
    with pytest.raises(TypeError, match="x.png"):
        tokenize({"image": "x.png", "report": 3})


def test_missing_report_allowed_means_no_report_and_collates():
    t = TokenizeReportd(keys="report", allow_missing_report=True)
    with_report = t({"image": "a.png", "report": "lower left lung."})
    without = t({"image": "b.png"})
    assert without["report"] == "" and not without["report_mask"].any()
    batch = list_data_collate([with_report, without])
    assert batch["report_ids"].shape == (2, 24) and batch["report_mask"][1].sum() == 0


def test_swap_sides_keeps_case_and_leaves_other_words():
    from scripts.transforms import swap_sides

    text = "Bilateral: lower LEFT lung and Right base; leftover cleft rt. side"
    assert swap_sides(text) == "Bilateral: lower RIGHT lung and Left base; leftover cleft lt. side"
    assert swap_sides(swap_sides(text)) == text


def test_side_flip_moves_the_lesion_and_swaps_the_report(tmp_path):
    import numpy as np
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
    from PIL import Image

    from scripts.transforms import RandSideFlipd, TokenizeReport

    image = np.zeros((20, 30), np.uint8)
    image[5:10, 2:8] = 255  # a lesion in the image's left half (columns < 15)
    Image.fromarray(image).save(tmp_path / "i.png")
    Image.fromarray(image).save(tmp_path / "m.png")
    load = Compose([LoadImaged(["image", "label"], reader="PILReader"), EnsureChannelFirstd(["image", "label"])])
    tok = TokenizeReportd(keys="report")
    d = tok(load({"image": str(tmp_path / "i.png"), "label": str(tmp_path / "m.png"), "report": "lower left lung."}))
    flipped = RandSideFlipd(prob=1.0)(d)
    # MONAI readers put the image column first: the left half is the first half of spatial axis 0
    assert d["image"][0, :15].sum() > 0 and d["image"][0, 15:].sum() == 0
    assert flipped["image"][0, 15:].sum() > 0 and flipped["image"][0, :15].sum() == 0
    assert flipped["label"][0, 15:].sum() > 0
    assert flipped["report"] == "lower right lung."
    expected_ids, _ = TokenizeReport()("lower right lung.")
    assert torch.equal(flipped["report_ids"], expected_ids)
    unchanged = RandSideFlipd(prob=0.0)(d)
    assert unchanged["report"] == "lower left lung." and torch.equal(unchanged["image"], d["image"])


def test_text_normalisation_options():
    t = TokenizeReport(max_length=16, lowercase=True)
    assert t.normalise("  Lower\u00a0LEFT   lung\uff0e ") == "lower left lung."  # NBSP, full-width stop
    assert torch.equal(t("Lower  LEFT lung.")[0], t("lower left lung.")[0])
    raw = TokenizeReport(max_length=16, unicode_form=None)
    assert raw.normalise("left\u00a0lung") == "left lung"  # white space still collapsed (NBSP is white space)
    assert raw.normalise("ﬁbrosis") == "ﬁbrosis" and t.normalise("ﬁbrosis") == "fibrosis"


def test_channels_follow_the_network():
    from scripts.transforms import ToChannels, ToChannelsd

    rgb = torch.rand(3, 8, 6)
    gray = ToChannels(1)(rgb)
    assert gray.shape == (1, 8, 6)
    torch.testing.assert_close(gray[0], 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])
    assert ToChannels(3)(gray).shape == (3, 8, 6) and ToChannels(1)(torch.rand(4, 8, 6)).shape == (1, 8, 6)
    d = ToChannelsd(["image", "label"], channels=[3, 1])({"image": gray, "label": torch.rand(3, 8, 6)})
    assert d["image"].shape[0] == 3 and d["label"].shape[0] == 1
    with pytest.raises(ValueError, match="2-channel"):
        ToChannels(1)(torch.rand(2, 4, 4))


# without NFKC, full-width letters and ligatures are unknown to MiniLM's vocabulary: the option changes the ids
UNNORMALISED = "Ｌｅｆｔ lower lung, ﬁbrosis."


def _parser(name: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config(name))
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _one(transforms, kind):
    (found,) = [t for t in transforms if isinstance(t, kind)]
    return found


class _Recorder(torch.nn.Module):
    def forward(self, image, text_ids=None, text_mask=None):
        self.text_ids = text_ids
        return image


def test_a_report_typed_in_monai_label_gets_the_ids_the_same_report_in_a_datalist_gets():
    """ReportInferer built its own tokenizer and ignored lowercase/unicode_form: a report typed in MONAI Label's
    client reached the network as other ids than the same report in a datalist."""
    parser = _parser("inference.yaml", report_template=None,  # the report as typed (the template: test_report_template)
                     **{"tokenizer#unicode_form": None, "displayable_configs#report": UNNORMALISED})
    tokenize = _one(parser.get_parsed_content("preprocessing").transforms, TokenizeReportd)
    inferer, net = parser.get_parsed_content("inferer"), _Recorder()
    assert inferer.tokenize is tokenize.tokenize is parser.get_parsed_content("tokenizer")
    inferer(torch.zeros(1, 1, 8, 8), net)
    from_datalist = tokenize({"image": "a.png", "report": UNNORMALISED})["report_ids"]
    assert torch.equal(net.text_ids[0], from_datalist)
    assert not torch.equal(from_datalist, TokenizeReport()(UNNORMALISED)[0])  # the option did reach both


def test_a_side_flip_retokenises_with_the_tokenizer_of_the_preprocessing():
    """The flip also swaps the sides of the text as it is tokenised: a full-width "Ｌｅｆｔ" (NFKC: "left") was left
    unswapped, so a flipped image kept the tokens of "left"."""
    from scripts.transforms import RandSideFlipd

    parser = _parser("train.yaml", side_flip_prob=1.0)
    tokenize = _one(parser.get_parsed_content("train#deterministic_transforms"), TokenizeReportd)
    flip = _one(parser.get_parsed_content("train#random_transforms"), RandSideFlipd)
    assert flip.tokenize is tokenize.tokenize is parser.get_parsed_content("tokenizer")
    flipped = flip(tokenize({"report": "Ｌｅｆｔ lower lung."}))
    assert flipped["report"] == "Right lower lung."
    assert torch.equal(flipped["report_ids"], tokenize({"report": "right lower lung."})["report_ids"])
