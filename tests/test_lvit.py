"""LViT-style network: shapes, gradients, loss terms, the no-report path, PLAM, report-to-patch injection."""

import pytest
import torch
import torch.nn.functional as F
from conftest import lesion_masks

from scripts.losses.segmentation import DiceBCELoss
from scripts.networks.blocks import PixelLevelAttention
from scripts.networks.lvit import LViTStyle, TextToPatches, ViTBranch, add_upsampled

REPORTS = ["lower left lung.", "upper right lung.", "Bilateral pulmonary infection, two infected areas, all left lung.",
           "middle right lung."]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return LViTStyle()


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_logits_shape_in_eval_and_train_mode(net, tokens, size):
    x = torch.rand(4, 1, *size)
    net.eval()
    with torch.no_grad():
        out, image_only = net(x, *tokens), net(x[:1])
    assert isinstance(out, torch.Tensor) and out.shape == (4, 1, *size) and torch.isfinite(out).all()
    assert image_only.shape == (1, 1, *size)
    net.train()
    out = net(x, *tokens)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 1, *size)  # no auxiliary outputs: plain logits


def test_lvit_layout_runs_at_full_resolution(tokens):
    small = LViTStyle(channels=(8, 16, 32, 64, 64), stem_stride=1, vit_channels=None).eval()
    assert small.vit.patch_size == 16  # LViT's patches: 16, 8, 4, 2 at strides 1, 2, 4, 8
    assert [m.kernel_size[0] for m in small.vit.embed] == [16, 8, 4, 2]
    with torch.no_grad():
        assert small(torch.rand(2, 1, 48, 32), *(t[:2] for t in tokens)).shape == (2, 1, 48, 32)


def test_loss_terms_are_lvits_half_dice_half_bce(net, tokens):
    net.train()
    terms = DiceBCELoss(0.5, 0.5)(net(torch.rand(4, 1, 64, 64), *tokens), lesion_masks(4))
    assert set(terms) == {"loss", "loss_dice", "loss_bce"}
    for name, value in terms.items():
        assert torch.isfinite(value) and value > 0, name
    torch.testing.assert_close(terms["loss"], 0.5 * terms["loss_dice"] + 0.5 * terms["loss_bce"])


def test_config_uses_half_dice_half_bce_and_lvitstyle():
    from conftest import config
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([config("train.yaml"), config("networks/lvit.yaml")])
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss, DiceBCELoss) and (loss.lambda_dice, loss.lambda_bce) == (0.5, 0.5)
    assert parser["network_def"]["_target_"] == "scripts.networks.LViTStyle"


def test_gradients_reach_every_trainable_part(tokens):
    torch.manual_seed(0)
    net = LViTStyle(text_trainable_layers=1).train()
    ids, mask = (t.clone() for t in tokens)
    mask[3] = 0  # one sample without a report: the "no report" token is trained too
    DiceBCELoss(0.5, 0.5)(net(torch.rand(4, 1, 64, 64), ids, mask), lesion_masks(4))["loss"].backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name

    def grad(module):
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    parts = {"stem": net.encoder.stem, "downs": net.encoder.downs, "vit": net.vit,
             "skip_attention": net.decoder.skip_attention, "ups": net.decoder.ups, "head": net.decoder.head,
             "text_proj": net.text_proj, "text_to_patches": net.text_to_patches}
    for part, module in parts.items():
        assert grad(module) > 0, part
    for stage in range(4):
        assert grad(net.vit.down[stage]) > 0 and grad(net.vit.up[stage]) > 0 and grad(net.vit.to_map[stage]) > 0
    assert float(net.text_proj.null_token.grad.abs().sum()) > 0
    assert grad(net.text_encoder._layers()[-1]) > 0
    assert all(p.grad is None for p in net.text_encoder._layers()[0].parameters())


def test_no_report_path(net, tokens):
    x = torch.rand(4, 1, 64, 64)
    ids, mask = (t.clone() for t in tokens)
    mask[1] = 0
    net.eval()
    with torch.no_grad():
        mixed, image_only, all_empty = net(x, ids, mask), net(x), net(x, ids, torch.zeros_like(mask))
    # an all-zero mask row is exactly the image-only forward for that sample, whatever its token ids
    torch.testing.assert_close(mixed[1], image_only[1])
    torch.testing.assert_close(all_empty, image_only)
    # ... while a report does change the prediction
    assert (mixed[0] - image_only[0]).abs().max() > 1e-4
    net.train()
    out = net(x, ids, mask)
    assert torch.isfinite(out).all()
    DiceBCELoss(0.5, 0.5)(net(x), lesion_masks(4))["loss"].backward()  # text_ids=None trains too


def test_padding_tokens_have_no_influence_and_long_reports_are_cut(net, tokens):
    ids, mask = tokens
    x = torch.rand(4, 1, 64, 64)
    noisy = ids.masked_fill(~mask.bool(), 1234)  # other ids under the padding
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x, noisy, mask), net(x, ids, mask))
        longer = net(x, torch.cat([ids, ids], 1), torch.cat([mask, mask], 1))  # 48 tokens: cut to the first 24
        torch.testing.assert_close(longer, net(x, ids, mask))


def test_report_changes_only_through_the_level_one_patch_embedding(net, tokens):
    """The report reaches the network only as an addition to the ViT's stage-1 patch embeddings (as in LViT)."""
    x = torch.rand(2, 1, 64, 64)
    net.eval()
    captured = []
    hook = net.vit.register_forward_pre_hook(lambda module, args: captured.append(args[1]))
    with torch.no_grad():
        net(x, *(t[:2] for t in tokens))
        net(x)
    hook.remove()
    with_report, without = captured
    assert with_report.shape == (2, 4 * 4, net.vit.dims[0])  # 64 / 16 = 4×4 patches, stage-1 width
    # no report: the same learned "no report" token on every patch
    torch.testing.assert_close(without, net.text_proj.null_token.expand_as(without))
    assert not torch.allclose(with_report[0], with_report[1])  # two reports, two embeddings


def test_text_to_patches_mixes_only_real_tokens_and_resizes():
    torch.manual_seed(0)
    t2p = TextToPatches(num_slots=5, base_grid=(3, 3))
    torch.nn.init.normal_(t2p.logits)
    tokens = torch.randn(2, 5, 8)
    ignore = torch.tensor([[False, False, False, True, True], [False, True, True, True, True]])
    out = t2p(tokens, ignore, (3, 3))
    assert out.shape == (2, 9, 8)
    # sample 1 has only the "no report" slot: every patch gets exactly that token
    torch.testing.assert_close(out[1], tokens[1, :1].expand(9, -1))
    # sample 0 is a convex mixture of its three valid slots, learned per patch
    w = torch.softmax(t2p.logits[:3].flatten(1).T, dim=-1)
    torch.testing.assert_close(out[0], w @ tokens[0, :3])
    assert t2p(tokens, ignore, (5, 7)).shape == (2, 35, 8)  # another image size: interpolated logits


def test_plam_scales_each_pixel_by_one_weight_shared_by_its_channels():
    torch.manual_seed(0)
    plam = PixelLevelAttention(6)
    x = torch.randn(2, 6, 8, 8)
    y = plam(x)
    # pixel-level: y(p) = w(p)·x(p), parallel to x(p), with |cos| = 1 at every pixel
    cos = F.cosine_similarity(y, x, dim=1)
    torch.testing.assert_close(cos.abs(), torch.ones_like(cos))
    # and no spatial mixing: changing one pixel changes the output at that pixel only
    x2 = x.clone()
    x2[:, :, 3, 5] += 1.0
    diff = (plam(x2) - y).abs().sum(dim=(0, 1))
    assert diff[3, 5] > 0 and diff.sum() == diff[3, 5]


def test_add_upsampled_is_a_nearest_upsample_and_add():
    x, low = torch.randn(2, 3, 32, 48), torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(add_upsampled(x, low), x + F.interpolate(low, size=(32, 48), mode="nearest"))


def test_vit_branch_maps_and_width_checks():
    vit = ViTBranch(channels=(4, 8, 16, 32), vit_channels=(8, 16, 32, 64), patch_size=8)
    feats = [torch.randn(2, c, 32 >> k, 48 >> k) for k, c in enumerate((4, 8, 16, 32))]
    maps = vit(feats, torch.randn(2, 4 * 6, 8))
    assert [tuple(m.shape) for m in maps] == [(2, c, 4, 6) for c in (4, 8, 16, 32)]
    with pytest.raises(ValueError, match="strictly increasing"):
        ViTBranch(channels=(4, 8, 16, 32), vit_channels=(16, 16, 32, 64))
    with pytest.raises(ValueError, match="divisible"):
        LViTStyle(use_text=False)(torch.rand(1, 1, 48, 48))


def test_image_only_ablation_has_no_text_parameters():
    net = LViTStyle(use_text=False)
    names = [n for n, _ in net.named_parameters()]
    assert not any(n.startswith(("text_encoder.", "text_proj.", "text_to_patches.")) for n in names)
    # the constructor runs to its end: the text modules exist, as None
    assert (net.text_encoder, net.text_proj, net.text_to_patches) == (None, None, None)
    assert net(torch.rand(2, 1, 64, 64)).shape == (2, 1, 64, 64)
