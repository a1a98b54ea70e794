"""The shared contrastive pieces (scripts/losses/contrastive.py) and the host-sync-free batch losses built on them.

Every batch loss masks the samples out of play instead of indexing them out (indexing waits for the device at
every step): loss and gradients must be those of the batch with those samples removed."""

import math

import pytest
import torch

from scripts.losses.contrastive import (
    graph_zero,
    multi_positive_nce,
    symmetric_batch_nce,
)
from scripts.losses.reclmis import token_contrastive_loss
from scripts.losses.ssa import ot_alignment_loss, outside_zones_loss


def test_multi_positive_nce_counts_every_positive_and_weights_rows():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    pos = torch.tensor([[True, True, False], [False, False, True]])
    row0 = -math.log((math.exp(2) + math.exp(1)) / (math.exp(2) + math.exp(1) + 1))
    row1 = math.log(3)
    assert multi_positive_nce(logits, pos).item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    assert multi_positive_nce(logits, pos, torch.tensor([True, False])).item() == pytest.approx(row0, rel=1e-5)
    assert multi_positive_nce(logits, pos, torch.tensor([False, False])).item() == 0.0


def test_graph_zero_reaches_every_input():
    a, b = torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    z = graph_zero(a, None, b)
    assert z.item() == 0.0
    ga, gb = torch.autograd.grad(z, [a, b])
    assert ga.abs().max() == 0 and gb.abs().max() == 0
    with pytest.raises(ValueError, match="at least one"):
        graph_zero(None)


def test_symmetric_batch_nce_equal_reports_are_never_negatives():
    logits = torch.tensor([[5.0, 5.0], [5.0, 5.0]])
    i2t, t2i = symmetric_batch_nce(logits, torch.tensor([0, 0]), torch.tensor([True, True]))
    assert i2t.item() == pytest.approx(0.0, abs=1e-6) and t2i.item() == pytest.approx(0.0, abs=1e-6)
    i2t, _ = symmetric_batch_nce(logits, torch.tensor([0, 1]), torch.tensor([True, True]))
    assert i2t.item() == pytest.approx(math.log(2), rel=1e-5)


def _ot(present, keep=None):
    torch.manual_seed(0)
    visual = torch.randn(5, 6, 8, requires_grad=True)
    text = torch.randn(5, 4, 8, requires_grad=True)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[:, 3] = False
    mask[2] = False  # sample 2 has no report
    group = torch.tensor([0, 1, 2, 3, 0])
    inputs = [visual, text]
    args = (visual, text, mask, group, present)
    if keep is not None:
        args = tuple(x[keep] for x in args)
    return ot_alignment_loss(*args), inputs


def _token(present, keep=None):
    torch.manual_seed(0)
    image = torch.randn(5, 6, 8, requires_grad=True)
    text = torch.randn(5, 4, 8, requires_grad=True)
    valid = torch.ones(5, 4, dtype=torch.bool)
    valid[2] = False
    group = torch.tensor([0, 1, 2, 3, 0])
    image_w = torch.softmax(torch.randn(5, 6), 1).requires_grad_()
    text_w = (torch.softmax(torch.randn(5, 4), 1) * valid).requires_grad_()
    args = (image, text, valid, group, present, image_w, text_w)
    if keep is not None:
        args = tuple(x[keep] for x in args)
    return (token_contrastive_loss(*args),), [image, text, image_w, text_w]


@pytest.mark.parametrize("loss", [_ot, _token], ids=["ssa_ot_alignment", "reclmis_token_contrast"])
def test_report_free_samples_leave_loss_and_gradients_as_if_removed(loss):
    present = torch.tensor([True, True, False, True, False])
    keep = torch.tensor([0, 1, 3])
    full, inputs = loss(present)
    sub, sub_inputs = loss(present, keep)
    for a, b in zip(full, sub):
        torch.testing.assert_close(a, b)
    g_full = torch.autograd.grad(sum(full), inputs, allow_unused=True)
    g_sub = torch.autograd.grad(sum(sub), sub_inputs, allow_unused=True)
    for gf, gs in zip(g_full, g_sub):
        torch.testing.assert_close(gf[keep], gs[keep])
        assert torch.isfinite(gf).all() and gf[[2, 4]].abs().max() == 0
    nobody, inputs = loss(torch.zeros(5, dtype=torch.bool))
    assert all(float(x) == 0.0 for x in nobody)
    grads = torch.autograd.grad(sum(nobody), inputs)  # in the graph of every input (DDP), all zero and finite
    assert all(torch.isfinite(g).all() and g.abs().max() == 0 for g in grads)


def test_outside_zones_loss_weights_guided_samples_as_if_selected():
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 8, 8, requires_grad=True)
    guidance = (torch.rand(4, 1, 8, 8) > 0.5).float()
    guided = torch.tensor([True, False, True, False])
    full = outside_zones_loss(logits, guidance, guided)
    p = torch.sigmoid(logits[guided])
    expected = ((p * (1 - guidance[guided])).sum((1, 2, 3)) / p.sum((1, 2, 3))).mean()
    torch.testing.assert_close(full, expected)
    (g,) = torch.autograd.grad(full, [logits])
    assert g[~guided].abs().max() == 0
    none = outside_zones_loss(logits, guidance, torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
