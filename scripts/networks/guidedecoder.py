"""GuideDecoder-style network (Zhong et al., "Ariadne's Thread", MICCAI 2023), the backbone TMCA extends.

ConvNeXt encoder, frozen text encoder, and a decoder that, before each up-sampling step, lets the visual tokens
attend to the report: visual self-attention, then cross-attention from visual tokens (queries) to projected report
tokens (keys/values) through a learnable gate. MONAI ``UnetrUpBlock`` skips and a ×4 sub-pixel head restore full
resolution. ``docs/guidedecoder.md`` compares it with the published code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from monai.networks.blocks import SubpixelUpsample, UnetrUpBlock
from torch import nn

from scripts.networks.blocks import (
    GuideLayer,
    ReportText,
    TextProjector,
    TrainingOutput,
    report_bookkeeping,
)
from scripts.networks.image_encoder import ConvNeXtEncoder
from scripts.networks.text_encoder import HFTextEncoder

__all__ = ["STRIDES", "GuideDecoder"]

STRIDES = (4, 8, 16, 32)


class GuideDecoder(nn.Module):
    """Language-guided decoder on a ConvNeXt encoder: image + optional report → B×out_channels×H×W logits.

    The decoder runs from stride 32 to stride 4; at every stride in ``guide_strides`` a :class:`GuideLayer` guides
    the features with the report before the next up-block. The published model guides at strides 32, 16 and 8
    with visual self-attention at each, which are the defaults here.

    Args:
        in_channels: image channels.
        out_channels: logit channels.
        encoder_size: ConvNeXt size (``tiny``, ``nano``, ``atto`` or ``cpu``), see
            :data:`scripts.networks.image_encoder.CONVNEXT_SIZES`.
        image_encoder_dir: local pretrained ConvNeXt folder (None: random init).
        text_encoder_dir: local Hugging Face text encoder folder (None: the bundled MiniLM).
        text_trainable_layers: top text-encoder layers to fine-tune (0: frozen).
        num_heads: attention heads of the guide layers.
        guide_strides: decoder strides with a guide layer.
        self_attention_strides: those of them whose guide layer runs visual self-attention (quadratic in H·W).
        use_text: False removes every text path (the same network, image only).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        encoder_size: str = "cpu",
        image_encoder_dir: str | os.PathLike | None = None,
        text_encoder_dir: str | os.PathLike | None = None,
        text_trainable_layers: int = 0,
        num_heads: int = 4,
        guide_strides: Sequence[int] = (32, 16, 8),
        self_attention_strides: Sequence[int] = (32, 16, 8),
        use_text: bool = True,
    ) -> None:
        super().__init__()
        self.guide_strides = tuple(int(s) for s in guide_strides)
        if any(s not in STRIDES for s in self.guide_strides):
            raise ValueError(f"guide_strides must be among {STRIDES}, got {guide_strides}")
        self.encoder = ConvNeXtEncoder(encoder_size, image_encoder_dir, in_channels)
        self.channels = dict(zip(STRIDES, self.encoder.channels))
        ch = self.channels
        self.use_text = bool(use_text)
        self.ups = nn.ModuleDict(
            {str(s): UnetrUpBlock(2, ch[s * 2], ch[s], 3, 2, norm_name="instance", res_block=True) for s in STRIDES[:-1]}
        )
        self.head = nn.Sequential(
            SubpixelUpsample(2, ch[4], ch[4] // 2, scale_factor=4, apply_pad_pool=False),
            nn.Conv2d(ch[4] // 2, out_channels, kernel_size=1),
        )
        # None when off, so that every attribute exists whatever the switches (subclasses test them, not hasattr)
        self.text_encoder = HFTextEncoder(text_encoder_dir, trainable_layers=text_trainable_layers) if use_text else None
        self.token_proj = self.guides = None
        if self.use_text:
            d_text = self.text_encoder.hidden_size
            self.token_proj = nn.ModuleDict({str(s): TextProjector(d_text, ch[s]) for s in self.guide_strides})
            self.guides = nn.ModuleDict(
                {
                    str(s): GuideLayer(ch[s], num_heads, self_attention=s in tuple(self_attention_strides))
                    for s in self.guide_strides
                }
            )

    @property
    def text_dim(self) -> int:
        """D of the text encoder's token states (0 without a text path)."""
        return self.text_encoder.hidden_size if self.text_encoder is not None else 0

    def encode_text(
        self, text_ids: torch.Tensor | None, text_mask: torch.Tensor | None, batch: int, device: torch.device
    ) -> ReportText:
        """The batch's reports for the decoder: token states B×L×D and bool mask B×L (None without text), which
        samples have a report and which share one."""
        if self.text_encoder is None or text_ids is None:
            return ReportText(None, None, *report_bookkeeping(None, None, batch, device))
        if text_mask is None:
            text_mask = torch.ones_like(text_ids)
        states, mask = self.text_encoder(text_ids, text_mask)
        return ReportText(states, mask, *report_bookkeeping(text_ids, mask, batch, device))

    def stage(self, stride: int, x: torch.Tensor, text: ReportText) -> torch.Tensor:
        """Language guidance of the decoder features at one stride, before the next up-block; the hook subclasses
        extend (TMCA's target enhancement, SSA's alignment and zone gates).

        Args:
            stride: the features' stride.
            x: B×C×h×w decoder features.
            text: the batch's reports; a stage may update ``text.states`` for the finer stages and add training
                outputs to ``text.aux``.

        Returns:
            B×C×h×w guided features.
        """
        if self.guides is not None and stride in self.guide_strides:
            x = self.guides[str(stride)](x, *self.token_proj[str(stride)](text.states, text.mask, x.shape[0]))
        return x

    def decode(self, feats: dict[int, torch.Tensor], text: ReportText) -> torch.Tensor:
        """The one decoder loop, from the stride-32 features to logits: up-block (with the encoder's skip), then
        :meth:`stage`, at strides 32 → 16 → 8 → 4, then the ×4 head.

        Args:
            feats: stride → B×C×h×w encoder features.
            text: the batch's reports, passed to every :meth:`stage`.

        Returns:
            B×out_channels×H×W logits.
        """
        x = feats[32]
        for s in STRIDES[::-1]:
            if s != 32:
                x = self.ups[str(s)](x, feats[s])
            x = self.stage(s, x, text)
        return self.head(x)

    def segment(self, image: torch.Tensor, text: ReportText) -> torch.Tensor | TrainingOutput:
        """Encoder, decoder and, in ``train()`` mode, :meth:`training_output`.

        Args:
            image: B×C×H×W, H and W divisible by 32.
            text: the batch's reports (:meth:`encode_text`).
        """
        feats = dict(zip(STRIDES, self.encoder(image)))
        pred = self.decode(feats, text)
        return self.training_output(pred, feats, text) if self.training else pred

    def training_output(
        self, pred: torch.Tensor, feats: dict[int, torch.Tensor], text: ReportText
    ) -> torch.Tensor | TrainingOutput:
        """What ``train()`` mode returns: the logits here (GuideDecoder's loss is Dice + BCE); subclasses with
        their own loss terms return their :class:`TrainingOutput`."""
        return pred

    def read_zones(self, text: ReportText, zones: torch.Tensor | None, text_ids: torch.Tensor | None,
                   shape: tuple[int, int]) -> None:
        """Hook for the networks that read the lung zones a report names (SSA's guidance, TMCA's report bank):
        they put what they need into ``text.aux``. GuideDecoder does not read them.

        Args:
            text: the batch's reports.
            zones: B×1×H'×W' zone raster of ``ReportZonesd``, or None.
            text_ids: B×L token ids, or None.
            shape: H×W of the image.
        """

    def forward(
        self,
        image: torch.Tensor,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        zones: torch.Tensor | None = None,
    ) -> torch.Tensor | TrainingOutput:
        """
        Args:
            image: B×C×H×W, H and W divisible by 32.
            text_ids: B×L report token ids, or None for image-only use.
            text_mask: B×L attention mask (1 token, 0 padding); an all-zero row means "no report".
            zones: B×1×H'×W' zone raster of ``ReportZonesd`` (0 outside the named zones, 1 + side·3 + level inside;
                all 0 for a report that names none), for the subclasses that read it (:meth:`read_zones`).

        Returns:
            B×out_channels×H×W logits (in ``train()`` mode, subclasses return their training output).
        """
        text = self.encode_text(text_ids, text_mask, image.shape[0], image.device)
        self.read_zones(text, zones, text_ids, tuple(image.shape[2:]))
        return self.segment(image, text)
