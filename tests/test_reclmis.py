"""RecLMIS network and loss: shapes, gradients, loss terms, no-report path, masking, reconstruction, contrast."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import lesion_masks

from scripts.losses.reclmis import (
    RecLMISLoss,
    token_contrastive_loss,
    token_max_similarity,
)
from scripts.networks.reclmis import (
    RecLMIS,
    RecLMISOutput,
    ReconstructionDecoder,
    importance_mask,
)

TERMS = {"loss", "loss_dice", "loss_bce", "loss_contrastive", "loss_rec_image", "loss_rec_text"}
AUX = ("image_importance", "text_importance", "rec_image", "rec_text")


def _grad(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_eval_mode_returns_plain_logits(tokens, size):
    net = RecLMIS().eval()
    with torch.no_grad():
        out = net(torch.rand(4, 1, *size), *tokens)
        image_only = net(torch.rand(2, 1, *size))
    assert isinstance(out, torch.Tensor) and out.shape == (4, 1, *size) and torch.isfinite(out).all()
    assert isinstance(image_only, torch.Tensor) and image_only.shape == (2, 1, *size)


def test_training_output_and_every_loss_term(tokens):
    torch.manual_seed(0)
    out = RecLMIS().train()(torch.rand(4, 1, 64, 96), *tokens)
    assert set(out) == RecLMISOutput.__required_keys__  # every key the TypedDict declares, and no other
    n, c = (64 // 16) * (96 // 16), 96
    assert out["pred"].shape == (4, 1, 64, 96)
    assert out["image_tokens"].shape == out["rec_image"].shape == out["rec_image_target"].shape == (4, n, c)
    assert out["rec_text"].shape == out["rec_text_target"].shape == (4, 24, 384)
    assert not out["rec_image_target"].requires_grad and not out["rec_text_target"].requires_grad
    torch.testing.assert_close(out["image_importance"].sum(1), torch.ones(4))
    torch.testing.assert_close(out["text_importance"].sum(1), torch.ones(4))
    assert (out["text_importance"][~out["text_valid"]] == 0).all()
    g = out["text_group"].tolist()
    assert g[0] == g[2] != g[1]
    terms = RecLMISLoss()(out, _masks_rect(4))
    assert set(terms) == TERMS
    for name, value in terms.items():
        assert torch.isfinite(value) and value > 0, name
    expected = (
        5 * (terms["loss_dice"] + terms["loss_bce"]) / 2
        + 0.2 * terms["loss_contrastive"]
        + terms["loss_rec_image"]
        + terms["loss_rec_text"]
    )
    torch.testing.assert_close(terms["loss"], expected)


def _masks_rect(b: int) -> torch.Tensor:
    y = torch.zeros(b, 1, 64, 96)
    for i in range(b):
        y[i, :, 8 * i : 8 * i + 20, 10 + 10 * i : 40 + 10 * i] = 1
    return y


def test_plain_logits_give_the_weighted_segmentation_terms_only():
    logits, y = torch.randn(2, 1, 32, 32), lesion_masks(2, 32)
    terms = RecLMISLoss()(logits, y)
    assert set(terms) == {"loss", "loss_dice", "loss_bce"}
    torch.testing.assert_close(terms["loss"], 2.5 * terms["loss_dice"] + 2.5 * terms["loss_bce"])
    assert terms["loss_bce"] > 0


def test_gradients_reach_every_trainable_part(tokens):
    torch.manual_seed(0)
    net = RecLMIS(text_trainable_layers=1).train()
    RecLMISLoss()(net(torch.rand(4, 1, 64, 64), *tokens), lesion_masks(4))["loss"].backward()
    for name, child in net.named_children():
        if name != "text_encoder":
            assert _grad(child) > 0, name
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert _grad(net.text_encoder._layers()[-1]) > 0
    assert all(p.grad is None for p in net.text_encoder._layers()[0].parameters())
    # the importance scorers learn through the re-weighted reconstruction attention and the contrast
    assert _grad(net.image_importance) > 0 and _grad(net.text_importance) > 0


def test_masking_and_reconstruction_run_only_in_training(tokens):
    net = RecLMIS()
    calls = []
    for name in AUX:
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    x = torch.rand(2, 1, 64, 64)
    net.eval()
    with torch.no_grad():
        a, b = net(x, tokens[0][:2], tokens[1][:2]), net(x, tokens[0][:2], tokens[1][:2])
    assert calls == [] and torch.equal(a, b)  # nothing random at inference
    net.train()
    out = net(x, tokens[0][:2], tokens[1][:2])
    assert sorted(calls) == sorted(AUX)
    # the published rates: half of the image tokens, 30 % (at least one) of each report's real tokens
    assert (out["image_masked"].sum(1) == out["image_tokens"].shape[1] // 2).all()
    n_words = out["text_valid"].sum(1)
    assert (out["text_masked"].sum(1) == (n_words * 0.3).floor().clamp_min(1)).all()
    assert not (out["text_masked"] & ~out["text_valid"]).any()


def test_importance_mask_draws_in_proportion_to_importance():
    valid = torch.tensor([[True] * 6 + [False] * 2, [True] * 8, [False] * 8])
    scores = torch.randn(3, 8)
    m = importance_mask(scores, valid, 0.5)
    assert m.sum(1).tolist() == [3, 4, 0] and not (m & ~valid).any()
    # one token of four, drawn 20,000 times: frequencies follow softmax(scores)
    torch.manual_seed(0)
    s = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, -1)
    freq = importance_mask(s, torch.ones_like(s, dtype=torch.bool), 0.25).float().mean(0)
    torch.testing.assert_close(freq, s[0].softmax(0), atol=0.015, rtol=0)
    # a dominant token is always drawn
    dominant = torch.tensor([[0.0, 50.0, 0.0, 0.0, 0.0, 0.0]]).expand(100, -1)
    assert importance_mask(dominant, torch.ones_like(dominant, dtype=torch.bool), 0.34)[:, 1].all()


def test_reconstruction_attention_ignores_zero_importance_condition_tokens():
    torch.manual_seed(0)
    dec = ReconstructionDecoder(16, 8, num_layers=2, num_heads=4).eval()
    tokens, pos = torch.randn(2, 5, 16), torch.randn(5, 16)
    masked = torch.tensor([[True, False, False, True, False]] * 2)
    cond = torch.randn(2, 3, 16)
    log_w = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]]))
    out = dec(tokens, masked, pos, cond, log_w)
    changed = cond.clone()
    changed[:, 2] = 100.0
    torch.testing.assert_close(dec(tokens, masked, pos, changed, log_w), out)
    # a masked token's value does not reach the output, an unmasked one's does
    t2 = tokens.clone()
    t2[:, 0] += 5.0
    torch.testing.assert_close(dec(t2, masked, pos, cond, log_w), out)
    t2[:, 1] += 5.0
    assert not torch.allclose(dec(t2, masked, pos, cond, log_w), out)


def test_token_max_similarity_matches_a_loop():
    torch.manual_seed(0)
    image, text = torch.randn(3, 5, 8), torch.randn(3, 4, 8)
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    wi = torch.rand(3, 5).softmax(1)
    wt = torch.rand(3, 4).masked_fill(~valid, -math.inf).softmax(1)
    got = token_max_similarity(image, text, valid, wi, wt)
    uniform = token_max_similarity(image, text, valid)
    for a in range(3):
        for b in range(3):
            t = F.normalize(text[a][valid[a]], dim=1)
            s = t @ F.normalize(image[b], dim=1).T  # words × image tokens
            expected = ((wt[a][valid[a]] * s.amax(1)).sum() + (wi[b] * s.amax(0)).sum()) / 2
            torch.testing.assert_close(got[a, b], expected)
            torch.testing.assert_close(uniform[a, b], (s.amax(1).mean() + s.amax(0).mean()) / 2)


def test_same_report_samples_are_positives_never_negatives():
    torch.manual_seed(0)
    image, text = torch.randn(4, 6, 8), torch.randn(4, 5, 8)
    valid = torch.ones(4, 5, dtype=torch.bool)
    present = torch.ones(4, dtype=torch.bool)
    same = token_contrastive_loss(image, text, valid, torch.zeros(4, dtype=torch.long), present, temperature=0.1)
    assert float(same) == pytest.approx(0.0, abs=1e-6)  # every pair is positive: nothing to push apart
    distinct = token_contrastive_loss(image, text, valid, torch.arange(4), present, temperature=0.1)
    logits = token_max_similarity(image, text, valid) / 0.1
    target = torch.arange(4)
    torch.testing.assert_close(distinct, (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2)
    # samples 0 and 2 share a report: their pair leaves the denominators' negatives
    paired = token_contrastive_loss(image, text, valid, torch.tensor([0, 1, 0, 2]), present, temperature=0.1)
    assert float(paired) < float(distinct)


def test_samples_without_report_take_no_part_and_all_zero_row_means_no_report(tokens):
    torch.manual_seed(0)
    ids, mask = tokens[0].clone(), tokens[1].clone()
    mask[1] = 0
    net = RecLMIS().train()
    out = net(torch.rand(4, 1, 64, 64), ids, mask)
    assert out["text_present"].tolist() == [True, False, True, True]
    loss = RecLMISLoss()
    full = loss(out, lesion_masks(4))
    keep = torch.tensor([0, 2, 3])
    subset = {k: v[keep] if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    without = loss(subset, lesion_masks(4)[keep])
    for name in ("loss_contrastive", "loss_rec_image", "loss_rec_text"):
        torch.testing.assert_close(full[name], without[name])
    full["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    # at inference an all-zero row gives exactly the image-only prediction (batch norm uses running statistics)
    net.eval()
    with torch.no_grad():
        x = torch.rand(4, 1, 64, 64)
        mixed = net(x, ids, mask)
        alone = net(x[1:2])
    torch.testing.assert_close(mixed[1:2], alone, atol=1e-5, rtol=1e-5)


def test_no_report_batch_gives_graph_connected_zero_terms(tokens):
    net = RecLMIS().train()
    for text in ((), (tokens[0][:2], torch.zeros_like(tokens[1][:2]))):
        net.zero_grad()
        out = net(torch.rand(2, 1, 64, 64), *text)
        assert not out["text_present"].any()
        terms = RecLMISLoss()(out, lesion_masks(2))
        for name in ("loss_contrastive", "loss_rec_image", "loss_rec_text"):
            assert terms[name] == 0 and terms[name].requires_grad, name
        terms["loss"].backward()
        # every trainable parameter is in the graph (DDP waits for all of them), and nothing turns NaN
        for n, p in net.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_published_widths_are_configurable():
    net = RecLMIS(features=(64, 128, 256, 512, 512), rec_layers=1)
    assert net.features == (64, 128, 256, 512, 512)
    assert net.interactor.channels == 512 and net.decoder.head.in_channels == 64
    with pytest.raises(ValueError):
        RecLMIS(features=(8, 16, 32, 64))


def test_imports_no_sibling_network():
    """Shared pieces come from blocks / lvit_unet, never from another network's module."""
    import ast
    import inspect

    import scripts.networks.reclmis as module

    tree = ast.parse(inspect.getsource(module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    siblings = {f"scripts.networks.{name}" for name in ("tmca", "ssa", "guidedecoder", "lvit")}
    assert not imported & siblings, imported & siblings
