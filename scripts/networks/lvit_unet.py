"""LViT's CNN U-Net as an encoder / decoder pair, shared by :class:`scripts.networks.LViTStyle` and
:class:`scripts.networks.RecLMIS`.

Five levels of widths C_1…C_5 built from MONAI's ``basic_unet`` blocks: a ``Convolution`` stem, four ``Down``
(max-pool + two convolutions), four ``UpCat`` with nearest upsampling and LViT's narrowing decoder (level k outputs
the width of level k−1, level 1 keeps C_1), LViT's pixel-level attention on the skips and a 1×1 head. The pair is
split where the two networks differ: LViT adds its ViT branch to the skips, RecLMIS runs its cross-modal
interactor on the bottleneck, each between :class:`LViTUNetEncoder` and :class:`LViTUNetDecoder`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, SubpixelUpsample
from monai.networks.nets.basic_unet import Down, UpCat
from torch import nn

from scripts.networks.blocks import PixelLevelAttention

__all__ = ["NUM_LEVELS", "LViTUNetDecoder", "LViTUNetEncoder", "decoder_widths"]

NUM_LEVELS = 4  # levels with a skip (LViT: strides 1, 2, 4, 8); a fifth, the bottleneck, has none


def _check_widths(channels: Sequence[int]) -> list[int]:
    ch = [int(c) for c in channels]
    if len(ch) != NUM_LEVELS + 1:
        raise ValueError(f"channels needs {NUM_LEVELS + 1} widths (four skip levels and the bottleneck), got {ch}")
    return ch


def _check_stem_stride(stem_stride: int) -> int:
    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
    return int(stem_stride)


def decoder_widths(channels: Sequence[int]) -> list[int]:
    """Output widths of the decoder's levels 1…4 (fine to coarse): C_1, C_1, C_2, C_3 for encoder widths
    C_1…C_5. LViT's rule: level k outputs the width of level k−1, so the deep decoder levels stay thin."""
    ch = _check_widths(channels)
    return [ch[0]] + ch[: NUM_LEVELS - 1]


class LViTUNetEncoder(nn.Module):
    """The contracting half: image → four skips and the bottleneck.

    Level 1 is a 3×3 ``Convolution`` (stride ``stem_stride``), levels 2–5 are MONAI ``Down`` blocks (2×2 max-pool,
    two 3×3 convolutions), so level k runs at stride ``stem_stride`` · 2^(k−1).

    Args:
        in_channels: image channels.
        channels: C_1…C_5, the widths of the five levels (LViT: 64, 128, 256, 512, 512).
        stem_stride: 1 (LViT: level 1 at full resolution) or 2 (level 1 at half resolution; pair it with the
            decoder's sub-pixel head).
        act: activation of the convolutions (MONAI name or (name, args)).
        norm: normalisation of the convolutions.
        dropout: dropout of the convolutions.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        stem_stride: int = 1,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        dropout: float | tuple = 0.0,
    ) -> None:
        super().__init__()
        ch = _check_widths(channels)
        # every spatial size must survive the stem and four poolings exactly: UpCat does not pad
        self.divisor = _check_stem_stride(stem_stride) << NUM_LEVELS
        self.stem = Convolution(
            2, in_channels, ch[0], strides=stem_stride, kernel_size=3, act=act, norm=norm, dropout=dropout
        )
        self.downs = nn.ModuleList(Down(2, ch[k], ch[k + 1], act, norm, True, dropout) for k in range(NUM_LEVELS))

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """
        Args:
            image: B×in_channels×H×W, H and W divisible by ``divisor`` (16 · ``stem_stride``).

        Returns:
            the skips x_1…x_4, B×C_k×(H/s_k)×(W/s_k) with s_k = ``stem_stride`` · 2^(k−1), and the bottleneck
            B×C_5×(H/(16·``stem_stride``))×(W/(16·``stem_stride``)).
        """
        if image.shape[-2] % self.divisor or image.shape[-1] % self.divisor:
            raise ValueError(f"image height and width must be divisible by {self.divisor}, got {tuple(image.shape)}")
        feats = [self.stem(image)]
        for down in self.downs:
            feats.append(down(feats[-1]))
        return feats[:NUM_LEVELS], feats[NUM_LEVELS]


class LViTUNetDecoder(nn.Module):
    """The expanding half: four skips and the bottleneck → logits at the image's resolution.

    From the bottleneck up, each level attends to its skip (:class:`PixelLevelAttention`, or nothing), then a MONAI
    ``UpCat`` upsamples (nearest, no channel halving), concatenates the skip and runs two 3×3 convolutions to the
    width :func:`decoder_widths` gives. The head is a 1×1 convolution; with ``stem_stride`` 2 a ×2 MONAI
    ``SubpixelUpsample`` before it undoes the encoder's strided stem.

    Args:
        channels: C_1…C_5, the encoder's widths.
        out_channels: logit channels.
        stem_stride: the encoder's ``stem_stride`` (1 or 2).
        skip_attention: LViT's pixel-level attention on each skip (False: skips enter unchanged).
        act: activation of the convolutions.
        norm: normalisation of the convolutions.
        dropout: dropout of the convolutions.
    """

    def __init__(
        self,
        channels: Sequence[int],
        out_channels: int,
        stem_stride: int = 1,
        skip_attention: bool = True,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        dropout: float | tuple = 0.0,
    ) -> None:
        super().__init__()
        ch = _check_widths(channels)
        stem_stride = _check_stem_stride(stem_stride)
        outs = decoder_widths(ch)
        ins = outs[1:] + [ch[NUM_LEVELS]]  # level k reads level k+1's output (the bottleneck at level 4)
        self.skip_attention = nn.ModuleList(
            PixelLevelAttention(c) if skip_attention else nn.Identity() for c in ch[:NUM_LEVELS]
        )
        self.ups = nn.ModuleList(
            UpCat(2, ins[k], ch[k], outs[k], act, norm, True, dropout, upsample="nontrainable", pre_conv=None,
                  interp_mode="nearest", align_corners=None, is_pad=False)
            for k in range(NUM_LEVELS)
        )
        self.head: nn.Module = nn.Conv2d(ch[0], out_channels, kernel_size=1)
        if stem_stride > 1:
            self.head = nn.Sequential(
                SubpixelUpsample(2, ch[0], ch[0], scale_factor=stem_stride, apply_pad_pool=False),
                nn.Conv2d(ch[0], out_channels, kernel_size=1),
            )

    def forward(self, skips: Sequence[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        """
        Args:
            skips: x_1…x_4 as :class:`LViTUNetEncoder` returns them (fine to coarse), possibly modified.
            bottleneck: B×C_5×h×w, possibly modified.

        Returns:
            B×out_channels×(h·16·``stem_stride``)×(w·16·``stem_stride``) logits.
        """
        x = bottleneck
        for k in range(NUM_LEVELS - 1, -1, -1):
            x = self.ups[k](x, self.skip_attention[k](skips[k]))
        return self.head(x)
