"""SSA network and loss: shapes, gradients, loss terms, no-report paths, OT alignment, directional guidance."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, lesion_masks, tokenize_reports
from PIL import Image

from scripts.losses.ssa import SSALoss, ot_alignment_loss, outside_zones_loss
from scripts.networks.ssa import SSA, SymmetricAlignment, ZoneGate, ZoneGuidance
from scripts.text import default_text_encoder_dir
from scripts.zones import report_zones

# sample 3 has a report without a location: OT alignment yes, zone guidance no
REPORTS = ["lower left lung.", "upper right lung.", "lower left lung.", "pulmonary infection."]
TERMS = {"loss", "loss_dice", "loss_bce", "loss_ot", "loss_ot_i2t", "loss_ot_t2i", "loss_outside"}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SSA()


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_eval_mode_returns_plain_logits(net, tokens, size):
    net.eval()
    with torch.no_grad():
        out = net(torch.rand(4, 1, *size), *tokens)
        image_only = net(torch.rand(1, 1, *size))
    assert isinstance(out, torch.Tensor) and out.shape == (4, 1, *size) and torch.isfinite(out).all()
    assert isinstance(image_only, torch.Tensor) and image_only.shape == (1, 1, *size)


def test_training_output_plan_and_every_loss_term(net, tokens):
    net.train()
    out = net(torch.rand(4, 1, 64, 96), *tokens)
    assert out["pred"].shape == (4, 1, 64, 96)
    assert out["guidance"].shape == (4, 1, 64, 96) and out["guided"].tolist() == [True, True, True, False]
    assert (out["guidance"][3] == 1).all()  # no location named: no gating, no penalty
    group = out["text_group"].tolist()
    assert group[0] == group[2] != group[1]
    # the forward plan: stride-16 tokens (4×6) against each report's real tokens, uniform marginals
    plan, text_mask = out["ot_plan"], tokens[1].bool()
    assert plan.shape == (4, 24, 24) and plan.dtype == torch.float32
    torch.testing.assert_close(plan.sum(2), torch.full((4, 24), 1 / 24), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(1), text_mask.float() / text_mask.sum(1, keepdim=True), atol=1e-5, rtol=0)
    terms = SSALoss()(out, lesion_masks(4, (64, 96)))
    assert set(terms) == TERMS
    for name, value in terms.items():
        assert torch.isfinite(value) and value > 0, name
    expected = terms["loss_dice"] + terms["loss_bce"] + 0.5 * terms["loss_ot"] + 0.2 * terms["loss_outside"]
    torch.testing.assert_close(terms["loss"], expected)


def test_gradients_reach_every_trainable_part(tokens):
    torch.manual_seed(0)
    model = SSA(text_trainable_layers=1).train()
    SSALoss()(model(torch.rand(4, 1, 64, 64), *tokens), lesion_masks(4))["loss"].backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and not n.startswith("text_encoder.") and (p.grad is None or not p.grad.any())]
    assert missing == []
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None} >= {
        "encoder", "ups", "head", "guides", "token_proj", "align", "gates"}
    assert all(g.gamma_logit.grad.abs() > 0 for g in model.gates.values())
    assert any(p.grad is not None and p.grad.any() for p in model.text_encoder._layers()[-1].parameters())
    assert all(p.grad is None for p in model.text_encoder._layers()[0].parameters())


def test_no_report_paths(net, tokens):
    net.train()
    out = net(torch.rand(2, 1, 64, 64))
    assert not out["text_present"].any() and "ot_plan" not in out and "guidance" not in out
    terms = SSALoss()(out, lesion_masks(2))
    assert set(terms) == TERMS and terms["loss_ot"] == 0 and terms["loss_outside"] == 0 and terms["loss_dice"] > 0
    # an all-zero mask row in a batch with reports: that sample is segmented exactly as without any text
    ids, mask = tokens[0].clone(), tokens[1].clone()
    mask[1] = 0
    image = torch.rand(4, 1, 64, 64)
    net.eval()
    with torch.no_grad():
        mixed = net(image, ids, mask)
        alone = net(image, None, None)
    torch.testing.assert_close(mixed[1], alone[1], atol=1e-5, rtol=1e-4)
    assert (mixed[0] - alone[0]).abs().max() > 1e-3  # while the report of sample 0 changes its mask
    net.train()
    terms = SSALoss()(net(image, ids, mask), lesion_masks(4))
    assert all(torch.isfinite(v) for v in terms.values())


def test_guidance_mask_geometry_conventions_and_cache():
    guide = ZoneGuidance(default_text_encoder_dir(), level_edges=(0.25, 0.5))
    ids, mask = tokenize_reports(["lower left lung.", "pulmonary infection.", "lower left lung.", "lower left lung."])
    mask[3] = 0
    g, guided = guide(ids, mask, (40, 80))  # X = columns (halves), Y = rows from the top (levels)
    assert g.shape == (4, 1, 40, 80) and guided.tolist() == [True, False, True, False]
    assert (g[0, 0, :20, 40:] == 1).all() and g[0].sum() == 20 * 40  # left half, below half the height
    assert (g[1] == 1).all() and (g[3] == 1).all()  # no location / no report: no gating
    assert len(guide._zones) == 3  # one parse per distinct id row
    radiological, _ = ZoneGuidance(default_text_encoder_dir(), False, (0.25, 0.5))(ids, mask, (40, 80))
    assert (radiological[0, 0, 20:, 40:] == 1).all() and radiological[0].sum() == 20 * 40


def test_decoded_token_ids_parse_like_the_report_text(demo_dir):
    """The network sees token ids only: decoding them with the encoder's tokenizer must name the same zones."""
    texts = {e["report"] for e in json.loads((demo_dir / "datalist.json").read_text())["training"]}
    reports = SHARED_DATA / "qata" / "reports"
    if reports.is_dir():
        texts |= {p.read_text().strip() for p in reports.glob("*.txt")}
    texts = sorted(texts)
    ids, mask = tokenize_reports(texts)
    parsed = ZoneGuidance(default_text_encoder_dir()).zones(ids, mask)
    wrong = [t for t, z in zip(texts, parsed) if not np.array_equal(z, report_zones(t))]
    assert wrong == [] and all(z is not None for z in parsed)


def test_zone_gate_is_soft_and_learnable():
    gate = ZoneGate(0.9)
    assert gate.gamma.item() == pytest.approx(0.9)
    guidance = torch.zeros(1, 1, 8, 8)
    guidance[..., :4, :] = 1
    out = gate(torch.ones(1, 3, 4, 4), guidance)  # area-resized to the features' grid
    assert (out[..., :2, :] == 1).all()
    torch.testing.assert_close(out[..., 2:, :], torch.full((1, 3, 2, 4), 0.9))
    with pytest.raises(ValueError, match="gamma_init"):
        ZoneGate(1.0)


def test_gating_acts_at_inference_on_guided_samples_only(tokens):
    torch.manual_seed(0)
    model = SSA().eval()
    image = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        gated = model(image, *tokens)
        for gate in model.gates.values():
            gate.gamma_logit.fill_(30.0)  # γ = 1: the gates let everything through
        open_ = model(image, *tokens)
    assert (gated[0] - open_[0]).abs().max() > 1e-4  # "lower left lung": gated
    torch.testing.assert_close(gated[3], open_[3])  # "pulmonary infection": nothing to gate


def test_outside_zones_loss_value():
    logits = torch.zeros(3, 1, 4, 6)  # p = 0.5 everywhere
    guidance = torch.ones(3, 1, 4, 6)
    guidance[0, :, :, :2] = 0  # a third of sample 0 lies outside its zones
    guidance[1, :, 2:] = 0
    logits[1, :, 2:] = -30  # sample 1 puts (almost) nothing outside
    guided = torch.tensor([True, True, False])
    guidance[2] = 0  # not guided: ignored whatever its mask says
    loss = outside_zones_loss(logits, guidance, guided)
    assert loss.item() == pytest.approx((1 / 3 + 0) / 2, abs=1e-6)
    assert outside_zones_loss(logits, guidance, torch.zeros(3, dtype=torch.bool)) == 0


def test_ot_alignment_loss_same_report_positives_and_absent_reports():
    torch.manual_seed(0)
    visual, text = torch.randn(4, 6, 8), torch.randn(4, 5, 8)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[:, 3:] = False
    present = torch.ones(4, dtype=torch.bool)
    i2t, t2i = ot_alignment_loss(visual, text, mask, torch.zeros(4, dtype=torch.long), present)
    assert i2t.item() == pytest.approx(0.0, abs=1e-6) and t2i.item() == pytest.approx(0.0, abs=1e-6)
    i2t, t2i = ot_alignment_loss(visual, text, mask, torch.arange(4), present)
    assert i2t > 0.1 and t2i > 0.1  # different reports are negatives
    # aligned pairs (each report's tokens are its own image's tokens) score better than random ones
    aligned = ot_alignment_loss(visual, visual[:, :5], mask, torch.arange(4), present)
    assert sum(aligned) < i2t + t2i
    # a sample without a report takes no part
    present = torch.tensor([True, True, False, True])
    full = ot_alignment_loss(visual, text, mask, torch.arange(4), present)
    subset = ot_alignment_loss(visual[present], text[present], mask[present], torch.arange(3), present[present])
    for a, b in zip(full, subset):
        torch.testing.assert_close(a, b)
    # the loss reaches the embeddings through the costs
    visual.requires_grad_(True)
    sum(ot_alignment_loss(visual, text, mask, torch.arange(4), torch.ones(4, dtype=torch.bool))).backward()
    assert visual.grad.abs().sum() > 0 and torch.isfinite(visual.grad).all()


def test_symmetric_alignment_moves_information_both_ways():
    torch.manual_seed(0)
    align = SymmetricAlignment(16, 8, embed_dim=12)
    x = torch.randn(3, 16, 4, 4, requires_grad=True)
    states = torch.randn(3, 5, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    new_x, new_states, ot = align(x, states, mask)
    assert (ot["plan"][2] == 0).all() and (ot["plan"][0, :, 3:] == 0).all()
    torch.testing.assert_close(new_x[2], x[2])  # no report: the image is left as it is
    torch.testing.assert_close(new_states[2], states[2])
    torch.testing.assert_close(new_states[0, 3:], states[0, 3:])  # padding tokens stay padding
    # report → image and image → report: each side's update depends on the other side
    (d_states,) = torch.autograd.grad(new_x[0].sum(), states, retain_graph=True)
    (d_x,) = torch.autograd.grad(new_states[0, :3].sum(), x)
    assert d_states[0, :3].abs().sum() > 0 and (d_states[0, 3:] == 0).all() and (d_states[1:] == 0).all()
    assert d_x[0].abs().sum() > 0 and (d_x[1:] == 0).all()


@pytest.mark.parametrize(
    "switch, gone, keys",
    [({"alignment": False}, "align.", "ot_plan"), ({"directional_guidance": False}, "gates.", "guidance")],
)
def test_each_switch_removes_its_part(tokens, switch, gone, keys):
    model = SSA(**switch).train()
    assert not any(n.startswith(gone) for n, _ in model.named_parameters())
    out = model(torch.rand(4, 1, 64, 64), *tokens)
    assert keys not in out
    terms = SSALoss()(out, lesion_masks(4))
    assert set(terms) == TERMS
    assert (terms["loss_ot"] if "align" in gone else terms["loss_outside"]) == 0
    terms["loss"].backward()
    for n, p in model.named_parameters():
        if p.requires_grad and not n.startswith("text_encoder."):
            assert p.grad is not None, n


def test_loss_on_plain_logits_is_dice_and_bce():
    terms = SSALoss()(torch.randn(2, 1, 16, 16), lesion_masks(2, (16, 16)))
    assert set(terms) == {"loss", "loss_dice", "loss_bce"}


def test_alignment_and_outside_terms_fall_on_demo_data(demo_dir):
    entries = json.loads((demo_dir / "datalist.json").read_text())["training"][:8]
    images, masks = [], []
    for e in entries:
        # PIL gives rows × columns; the bundle's MONAI loader gives columns × rows, which the zones assume
        img = np.asarray(Image.open(demo_dir / e["image"]).resize((64, 64), Image.BILINEAR), np.float32).T / 255
        msk = np.asarray(Image.open(demo_dir / e["label"]).resize((64, 64), Image.NEAREST)).T > 0
        images.append(torch.from_numpy(img.copy())[None])
        masks.append(torch.from_numpy(msk.astype(np.float32))[None])
    x, y = torch.stack(images), torch.stack(masks)
    ids, tmask = tokenize_reports([e["report"] for e in entries])
    torch.manual_seed(0)
    model = SSA().train()
    loss = SSALoss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(25):
        terms = loss(model(x, ids, tmask), y)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in terms.items()})
    first, last = ({k: np.mean([h[k] for h in part]) for k in TERMS} for part in (history[:5], history[-5:]))
    assert math.isfinite(last["loss"])
    assert last["loss_ot"] < 0.9 * first["loss_ot"] and last["loss_outside"] < 0.5 * first["loss_outside"], history
