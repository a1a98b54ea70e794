"""GuideDecoder-style network: shapes, gradients, the report's effect, the no-report path, TMCA as its extension."""

import pytest
import torch

from scripts.losses import DiceBCELoss
from scripts.networks import TMCA, GuideDecoder

REPORTS = ["lower left lung.", "all right lung.", "upper left lung and lower right lung."]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return GuideDecoder().eval()


@pytest.mark.parametrize("size", [(224, 224), (256, 192)])
def test_logits_at_input_size(net, tokens, size):
    with torch.no_grad():
        out = net(torch.rand(3, 1, *size), *tokens)
    assert out.shape == (3, 1, *size) and torch.isfinite(out).all()


def test_guide_layers_at_the_published_strides(net):
    assert sorted(map(int, net.guides)) == [8, 16, 32]
    assert all(g.self_attn is not None for g in net.guides.values())
    assert not hasattr(net, "enhancers") and not hasattr(net, "align_image")


def test_the_report_changes_the_prediction(net, tokens):
    image = torch.rand(1, 1, 64, 64).expand(3, -1, -1, -1)
    with torch.no_grad():
        out = net(image, *tokens)
    assert (out[0] - out[1]).abs().max() > 1e-4 and (out[1] - out[2]).abs().max() > 1e-4


def test_a_sample_without_report_equals_the_image_only_call(net, tokens):
    ids, mask = tokens[0].clone(), tokens[1].clone()
    mask[1] = 0  # sample 1 has no report
    image = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        mixed = net(image, ids, mask)
        image_only = net(image)
    torch.testing.assert_close(mixed[1], image_only[1], atol=1e-5, rtol=1e-5)
    assert (mixed[0] - image_only[0]).abs().max() > 1e-4


def test_gradients_reach_every_trainable_part_and_not_the_frozen_encoder(tokens):
    net = GuideDecoder().train()
    out = net(torch.rand(3, 1, 64, 64), *tokens)
    assert isinstance(out, torch.Tensor)  # no auxiliary outputs: a plain Dice + BCE network
    terms = DiceBCELoss()(out, (torch.rand(3, 1, 64, 64) > 0.7).float())
    assert set(terms) == {"loss", "loss_dice", "loss_bce"} and all(torch.isfinite(v) and v > 0 for v in terms.values())
    terms["loss"].backward()
    for name in ("encoder", "ups", "head", "guides", "token_proj"):
        assert sum(float(p.grad.abs().sum()) for p in getattr(net, name).parameters() if p.grad is not None) > 0, name
    assert all(p.grad is None for p in net.text_encoder.parameters())
    assert not any(k.startswith("text_encoder.model.") for k in net.state_dict())


def test_unknown_guide_stride_is_refused():
    with pytest.raises(ValueError, match="guide_strides"):
        GuideDecoder(guide_strides=(64,))


def test_tmca_is_the_backbone_plus_its_alignment_and_enhancement():
    backbone = GuideDecoder(guide_strides=(4, 8, 16, 32), self_attention_strides=(32, 16))
    extra = set(TMCA().state_dict()) - set(backbone.state_dict())
    assert extra and all(k.split(".")[0] in {"enhancers", "align_image", "align_text"} for k in extra)
    assert set(backbone.state_dict()) <= set(TMCA().state_dict())
