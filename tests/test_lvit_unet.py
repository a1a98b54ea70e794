"""LViT's CNN U-Net (encoder / decoder pair): shapes, widths, the stride-2 stem, and that LViTStyle and RecLMIS
both build theirs from it."""

import pytest
import torch
from monai.networks.nets.basic_unet import Down, UpCat

from scripts.networks import LViTStyle, RecLMIS
from scripts.networks.blocks import PixelLevelAttention
from scripts.networks.lvit_unet import LViTUNetDecoder, LViTUNetEncoder, decoder_widths

CHANNELS = (4, 8, 16, 32, 24)


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_encoder_skips_and_bottleneck_and_decoder_back_to_the_image_size(stem_stride):
    torch.manual_seed(0)
    encoder = LViTUNetEncoder(1, CHANNELS, stem_stride)
    decoder = LViTUNetDecoder(CHANNELS, 3, stem_stride)
    image = torch.rand(2, 1, 64, 96)
    skips, bottleneck = encoder(image)
    assert [tuple(s.shape) for s in skips] == [
        (2, c, 64 // (stem_stride << k), 96 // (stem_stride << k)) for k, c in enumerate(CHANNELS[:4])
    ]
    assert bottleneck.shape == (2, 24, 64 // (16 * stem_stride), 96 // (16 * stem_stride))
    assert decoder(skips, bottleneck).shape == (2, 3, 64, 96)


def test_decoder_narrows_as_lvits():
    assert decoder_widths((64, 128, 256, 512, 512)) == [64, 64, 128, 256]
    decoder = LViTUNetDecoder(CHANNELS, 1)
    assert [up.convs.conv_1.conv.out_channels for up in decoder.ups] == [4, 4, 8, 16]
    assert decoder.ups[3].convs.conv_0.conv.in_channels == 24 + 32  # the bottleneck + the level-4 skip


def test_skip_attention_off_passes_the_skips_unchanged():
    torch.manual_seed(0)
    skips = [torch.randn(1, c, 32 >> k, 32 >> k) for k, c in enumerate(CHANNELS[:4])]
    bottleneck = torch.randn(1, CHANNELS[4], 2, 2)
    plain = LViTUNetDecoder(CHANNELS, 1, skip_attention=False).eval()
    assert not any(isinstance(m, PixelLevelAttention) for m in plain.modules())
    attended = LViTUNetDecoder(CHANNELS, 1).eval()
    attended.load_state_dict(plain.state_dict(), strict=False)  # same UpCats and head, PLAMs on top
    with torch.no_grad():
        assert not torch.allclose(attended(skips, bottleneck), plain(skips, bottleneck))
        for plam in attended.skip_attention:  # a PLAM with weight 1 everywhere is the identity
            torch.nn.init.zeros_(plam.mlp[-1].weight)
            torch.nn.init.ones_(plam.mlp[-1].bias)
        torch.testing.assert_close(attended(skips, bottleneck), plain(skips, bottleneck))


def test_sizes_the_unet_cannot_halve_four_times_and_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="divisible by 32"):
        LViTUNetEncoder(1, CHANNELS, stem_stride=2)(torch.rand(1, 1, 48, 64))
    with pytest.raises(ValueError, match="divisible by 16"):
        LViTUNetEncoder(1, CHANNELS)(torch.rand(1, 1, 64, 40))
    with pytest.raises(ValueError, match="5 widths"):
        LViTUNetEncoder(1, CHANNELS[:4])
    with pytest.raises(ValueError, match="stem_stride"):
        LViTUNetDecoder(CHANNELS, 1, stem_stride=4)


def test_lvit_and_reclmis_share_one_unet():
    """Both networks build their CNN from this module's pair and nowhere else (no second U-Net in either)."""
    for net in (LViTStyle(use_text=False), RecLMIS()):
        assert type(net.encoder) is LViTUNetEncoder and type(net.decoder) is LViTUNetDecoder
        unet_blocks = [n for n, m in net.named_modules() if isinstance(m, (Down, UpCat, PixelLevelAttention))]
        assert len(unet_blocks) == 12, unet_blocks
        assert all(n.startswith(("encoder.", "decoder.")) for n in unet_blocks), unet_blocks
