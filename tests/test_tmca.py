"""TMCA network and loss: shapes, gradients, loss terms, same-report positives, switches."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import lesion_masks
from PIL import Image

from scripts.losses import TMCALoss, alignment_loss
from scripts.networks import TMCA
from scripts.networks.blocks import report_groups
from scripts.transforms import RandDropReportd, TokenizeReport


@pytest.mark.parametrize("size", [(224, 224), (256, 192)])
def test_eval_mode_returns_plain_logits(tokens, size):
    net = TMCA().eval()
    with torch.no_grad():
        out = net(torch.rand(4, 1, *size), *tokens)
        image_only = net(torch.rand(1, 1, *size))
    assert isinstance(out, torch.Tensor) and out.shape == (4, 1, *size) and torch.isfinite(out).all()
    assert image_only.shape == (1, 1, *size)


def test_training_output_and_every_loss_term(tokens):
    torch.manual_seed(0)
    net = TMCA().train()
    out = net(torch.rand(4, 1, 64, 64), *tokens)
    assert out["pred"].shape == (4, 1, 64, 64)
    assert out["align_strides"] == [4, 8, 16, 32] and len(out["target_maps"]) == 4
    assert out["text_group"].tolist()[0] == out["text_group"].tolist()[2] != out["text_group"].tolist()[1]
    terms = TMCALoss()(out, lesion_masks(4))
    expected = {"loss", "loss_dice", "loss_bce", "loss_align", "loss_map"} | {f"loss_align_s{s}" for s in (4, 8, 16, 32)}
    assert set(terms) == expected
    for name, value in terms.items():
        assert torch.isfinite(value) and value > 0, name


def test_gradients_reach_encoder_decoder_and_projections(tokens):
    net = TMCA(text_trainable_layers=1).train()
    TMCALoss()(net(torch.rand(4, 1, 64, 64), *tokens), lesion_masks(4))["loss"].backward()

    def grad(module):
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    assert grad(net.encoder) > 0
    assert grad(net.ups) > 0 and grad(net.head) > 0 and grad(net.guides) > 0
    assert grad(net.align_image) > 0 and grad(net.align_text) > 0
    assert grad(net.enhancers) > 0 and grad(net.token_proj) > 0
    assert grad(net.text_encoder._layers()[-1]) > 0
    assert all(p.grad is None for p in net.text_encoder._layers()[0].parameters())


def test_same_report_samples_are_positives_never_negatives():
    torch.manual_seed(0)
    image, text = torch.randn(4, 16, 8, 8), torch.randn(4, 16)
    mask = lesion_masks(4, 32)
    present = torch.ones(4, dtype=torch.bool)
    same = torch.zeros(4, dtype=torch.long)
    i2t, t2i = alignment_loss(image, text, mask, same, present, temperature=0.1)
    assert float(i2t) == pytest.approx(0.0, abs=1e-6)  # every report in the batch is a positive
    # text->image: only the image's own background is a negative
    w = F.interpolate(mask, size=(8, 8), mode="area")
    target = F.normalize((image * w).sum((2, 3)) / w.sum((2, 3)), dim=1)
    background = F.normalize((image * (1 - w)).sum((2, 3)) / (1 - w).sum((2, 3)), dim=1)
    t = F.normalize(text, dim=1)
    pos = (t @ target.T / 0.1).logsumexp(1)
    hard = (t * background).sum(1) / 0.1
    expected = (torch.logaddexp(pos, hard) - pos).mean()
    torch.testing.assert_close(t2i, expected)
    # with four different reports the other samples become negatives and the loss rises
    i2t_distinct, _ = alignment_loss(image, text, mask, torch.arange(4), present, temperature=0.1)
    assert float(i2t_distinct) > 0.1


def test_samples_without_report_or_lesion_take_no_part():
    image, text = torch.randn(3, 8, 4, 4), torch.randn(3, 8)
    mask = lesion_masks(3, 16)
    mask[2] = 0
    present = torch.tensor([True, False, True])
    full = alignment_loss(image, text, mask, torch.arange(3), present)
    only_first = alignment_loss(image[:1], text[:1], mask[:1], torch.arange(1), present[:1])
    for a, b in zip(full, only_first):
        torch.testing.assert_close(a, b)


def test_report_groups_ignore_padding():
    ids = torch.tensor([[101, 5, 102, 7], [101, 5, 102, 9], [101, 6, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]])
    g = report_groups(ids, mask)
    assert g[0] == g[1] != g[2]


def test_no_report_path_runs_and_report_dropout_empties_tokens(tokens):
    net = TMCA().train()
    out = net(torch.rand(2, 1, 64, 64))
    assert not out["text_present"].any()
    terms = TMCALoss()(out, lesion_masks(2))
    assert terms["loss_align"] == 0 and terms["loss_map"] > 0  # the maps still learn where the lesion is
    drop = RandDropReportd(keys="report", prob=1.0)
    d = drop({"report": "lower left lung.", "report_ids": tokens[0][0], "report_mask": tokens[1][0]})
    assert d["report"] == "" and not d["report_mask"].any()
    keep = RandDropReportd(keys="report", prob=0.0)({"report": "x", "report_ids": tokens[0][0], "report_mask": tokens[1][0]})
    assert keep["report_mask"].any()


def _trainable(net):
    return {n for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "switch, gone",
    [
        ({"enhancement": False}, ("enhancers.",)),
        ({"alignment_levels": [32]}, ("align_image.4.", "align_image.8.", "align_image.16.", "align_text.4.")),
        ({"alignment_levels": []}, ("align_image.", "align_text.")),
        ({"use_text": False}, ("text_encoder.", "guides.", "token_proj.", "align_", "enhancers.")),
    ],
)
def test_each_switch_removes_its_parameters(tokens, switch, gone):
    full, reduced = _trainable(TMCA()), TMCA(**switch)
    names = _trainable(reduced)
    assert any(n.startswith(gone) for n in full)
    assert not any(n.startswith(gone) for n in names)
    reduced.train()
    out = reduced(torch.rand(4, 1, 64, 64), *tokens)
    TMCALoss()(out, lesion_masks(4))["loss"].backward()
    for n, p in reduced.named_parameters():
        if p.requires_grad and not n.startswith("text_encoder."):
            assert p.grad is not None, n


def test_target_sensitive_switch_changes_the_alignment_objective(tokens):
    torch.manual_seed(0)
    out = TMCA().train()(torch.rand(4, 1, 64, 64), *tokens)
    with_target = TMCALoss(target_sensitive=True)(out, lesion_masks(4))
    whole_image = TMCALoss(target_sensitive=False)(out, lesion_masks(4))
    assert not torch.isclose(with_target["loss_align"], whole_image["loss_align"])


def test_alignment_loss_falls_on_demo_data(demo_dir):
    import json

    entries = json.loads((demo_dir / "datalist.json").read_text())["training"][:8]
    t = TokenizeReport(max_length=24)
    images, masks, ids, tmask = [], [], [], []
    for e in entries:
        img = Image.open(demo_dir / e["image"]).resize((64, 64), Image.BILINEAR)
        msk = Image.open(demo_dir / e["label"]).resize((64, 64), Image.NEAREST)
        images.append(torch.from_numpy(np.asarray(img, np.float32) / 255)[None])
        masks.append(torch.from_numpy((np.asarray(msk) > 0).astype(np.float32))[None])
        i, m = t(e["report"])
        ids.append(i)
        tmask.append(m)
    x, y, ids, tmask = torch.stack(images), torch.stack(masks), torch.stack(ids), torch.stack(tmask)
    torch.manual_seed(0)
    net = TMCA().train()
    loss = TMCALoss(lambda_align=1.0)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(30):
        terms = loss(net(x, ids, tmask), y)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        history.append(terms["loss_align"].item())
    assert math.isfinite(history[-1])
    assert np.mean(history[-5:]) < 0.9 * np.mean(history[:5]), history


def test_out_of_play_rows_leave_the_loss_and_its_gradient_as_if_removed():
    """Rows without report or lesion are masked, not indexed out (no host sync): loss and gradients must equal
    those of the batch with the rows removed, and stay finite when no row takes part."""
    torch.manual_seed(1)
    image = torch.randn(5, 8, 4, 4, requires_grad=True)
    text = torch.randn(5, 8, requires_grad=True)
    mask = lesion_masks(5, 16)
    mask[3] = 0
    present = torch.tensor([True, True, False, True, True])
    group = torch.tensor([0, 1, 2, 3, 0])
    keep = torch.tensor([0, 1, 4])
    for target_sensitive in (True, False):
        # without the target a lesion-free image still takes part: row 3 then leaves through its report
        p = present if target_sensitive else present & (torch.arange(5) != 3)
        full = alignment_loss(image, text, mask, group, p, target_sensitive=target_sensitive)
        sub = alignment_loss(image[keep], text[keep], mask[keep], group[keep], p[keep],
                             target_sensitive=target_sensitive)
        for a, b in zip(full, sub):
            torch.testing.assert_close(a, b)
        g_full = torch.autograd.grad(sum(full), [image, text])
        g_sub = torch.autograd.grad(sum(sub), [image, text])
        for gf, gs in zip(g_full, g_sub):
            torch.testing.assert_close(gf[keep], gs[keep])
            assert gf[[2, 3]].abs().max() == 0
    nobody = alignment_loss(image, text, mask, group, torch.zeros(5, dtype=torch.bool))
    assert all(float(x) == 0.0 for x in nobody)
    grads = torch.autograd.grad(sum(nobody), [image, text])
    assert all(torch.isfinite(g).all() and g.abs().max() == 0 for g in grads)
