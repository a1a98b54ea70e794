"""A compact text-guided U-Net: MONAI BasicUNet blocks on a stride-4 stem, language guidance at strides 32 and 16."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from monai.networks.blocks import SubpixelUpsample
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

from scripts.networks.blocks import GuideLayer, TextProjector
from scripts.networks.text_encoder import HFTextEncoder

__all__ = ["TextGuidedUNet"]


class TextGuidedUNet(nn.Module):
    """2D U-Net whose bottleneck (stride 32) and first decoder stage (stride 16) attend to the report.

    A 4×4 stride-4 stem (as in ConvNeXt) replaces the full-resolution stage of a plain U-Net, which costs most of
    a U-Net's time on CPU; a ×4 sub-pixel upsample restores full resolution before the head.

    Args:
        in_channels: image channels (1 for radiographs).
        out_channels: logit channels (1: one sigmoid lesion channel).
        features: channels at strides 4, 8, 16, 32.
        text_encoder_dir: local Hugging Face model directory; None uses the bundled MiniLM.
        text_trainable_layers: top text-encoder layers to fine-tune (0: frozen).
        num_heads: attention heads of the guide layers.
        use_text: False gives the same network without any text path (image-only ablation).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256),
        text_encoder_dir: str | os.PathLike | None = None,
        text_trainable_layers: int = 0,
        num_heads: int = 4,
        use_text: bool = True,
    ) -> None:
        super().__init__()
        if len(features) != 4:
            raise ValueError(f"features must give 4 channel counts (strides 4, 8, 16, 32), got {features}")
        f = tuple(int(c) for c in features)
        act = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
        norm = ("instance", {"affine": True})
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, f[0], kernel_size=4, stride=4), TwoConv(2, f[0], f[0], act, norm, True)
        )
        self.downs = nn.ModuleList(Down(2, f[i], f[i + 1], act, norm, True) for i in range(3))
        self.ups = nn.ModuleList(UpCat(2, f[i + 1], f[i], f[i], act, norm, True) for i in reversed(range(3)))
        self.head = nn.Sequential(
            SubpixelUpsample(2, f[0], f[0] // 2, scale_factor=4, apply_pad_pool=False), nn.Conv2d(f[0] // 2, out_channels, kernel_size=1)
        )
        self.use_text = use_text
        if use_text:
            self.text_encoder = HFTextEncoder(text_encoder_dir, trainable_layers=text_trainable_layers)
            d = self.text_encoder.hidden_size
            self.text_proj = nn.ModuleList([TextProjector(d, f[3]), TextProjector(d, f[2])])
            self.guides = nn.ModuleList([GuideLayer(f[3], num_heads), GuideLayer(f[2], num_heads)])

    def forward(
        self, image: torch.Tensor, text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            image: B×C×H×W, H and W divisible by 32.
            text_ids: B×L report token ids, or None for image-only inference.
            text_mask: B×L attention mask (1 = token, 0 = padding); an all-zero row means "no report".

        Returns:
            B×out_channels×H×W logits.
        """
        skips = [self.stem(image)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        texts = self._text_tokens(text_ids, text_mask, image.shape[0]) if self.use_text else None
        if texts:
            x = self.guides[0](x, *texts[0])
        for i, up in enumerate(self.ups):
            x = up(x, skips.pop())
            if texts and i == 0:
                x = self.guides[1](x, *texts[1])
        return self.head(x)

    def _text_tokens(
        self, text_ids: torch.Tensor | None, text_mask: torch.Tensor | None, batch_size: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        states, mask = None, None
        if text_ids is not None:
            if text_mask is None:
                text_mask = torch.ones_like(text_ids)
            states, mask = self.text_encoder(text_ids, text_mask)
        return [proj(states, mask, batch_size) for proj in self.text_proj]
