import pytest
import torch

from scripts.networks import TextGuidedUNet
from scripts.transforms import TokenizeReport

FEATURES = (16, 32, 32, 64)


@pytest.fixture(scope="module")
def tokens():
    t = TokenizeReport(max_length=24)
    pairs = [t("lower left lung."), t("upper right lung.")]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@pytest.mark.parametrize("size", [(224, 224), (256, 192)])
def test_logits_have_the_input_size(tokens, size):
    net = TextGuidedUNet(features=FEATURES).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, *size), *tokens)
    assert out.shape == (2, 1, *size) and torch.isfinite(out).all()


def test_report_changes_the_prediction_and_no_report_still_segments(tokens):
    torch.manual_seed(0)
    net = TextGuidedUNet(features=FEATURES).eval()
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a = net(image, *tokens)
        b = net(image.flip(0).flip(0), tokens[0].flip(0), tokens[1].flip(0))
        none = net(image)
        empty = net(image, tokens[0], torch.zeros_like(tokens[1]))
    assert not torch.allclose(a, b)  # same image, swapped reports
    assert none.shape == a.shape
    torch.testing.assert_close(none, empty)  # an all-padding report is "no report"


def test_gradients_reach_trainable_parts_only(tokens):
    net = TextGuidedUNet(features=FEATURES)
    net(torch.rand(2, 1, 64, 64), *tokens).mean().backward()
    for name, p in net.named_parameters():
        if name.startswith("text_encoder."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None, name
    assert net.text_proj[0].proj[0].weight.grad.abs().sum() > 0
    assert net.guides[1].cross_attn.in_proj_weight.grad.abs().sum() > 0


def test_fine_tuned_text_layers_get_gradients_and_are_saved(tokens):
    net = TextGuidedUNet(features=FEATURES, text_trainable_layers=1)
    net(torch.rand(2, 1, 64, 64), *tokens).mean().backward()
    top = net.text_encoder._layers()[-1]
    bottom = net.text_encoder._layers()[0]
    assert all(p.grad is not None for p in top.parameters())
    assert all(p.grad is None for p in bottom.parameters())
    keys = net.state_dict().keys()
    assert any(k.startswith("text_encoder.model.encoder.layer.5.") for k in keys)
    assert not any(k.startswith("text_encoder.model.encoder.layer.0.") for k in keys)


def test_checkpoint_leaves_out_the_frozen_encoder_and_loads_strictly():
    net = TextGuidedUNet(features=FEATURES)
    state = net.state_dict()
    assert not any(k.startswith("text_encoder.") for k in state)
    other = TextGuidedUNet(features=FEATURES)
    other.load_state_dict(state, strict=True)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, state[k])
    broken = dict(state)
    broken.pop("head.1.weight")
    with pytest.raises(RuntimeError, match="head.1.weight"):
        other.load_state_dict(broken, strict=True)


def test_image_only_variant_has_no_text_parameters():
    net = TextGuidedUNet(features=FEATURES, use_text=False)
    assert not any("text" in n or "guide" in n for n, _ in net.named_parameters())
    assert net(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)
