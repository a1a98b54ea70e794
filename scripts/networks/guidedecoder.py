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

from scripts.networks.blocks import GuideLayer, TextProjector
from scripts.networks.image_encoder import ConvNeXtEncoder
from scripts.networks.text_encoder import HFTextEncoder

__all__ = ["GuideDecoder", "STRIDES"]

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
        if not self.use_text:
            return
        self.text_encoder = HFTextEncoder(text_encoder_dir, trainable_layers=text_trainable_layers)
        d_text = self.text_encoder.hidden_size
        self.token_proj = nn.ModuleDict({str(s): TextProjector(d_text, ch[s]) for s in self.guide_strides})
        self.guides = nn.ModuleDict(
            {
                str(s): GuideLayer(ch[s], num_heads, self_attention=s in tuple(self_attention_strides))
                for s in self.guide_strides
            }
        )

    def encode_text(
        self, text_ids: torch.Tensor | None, text_mask: torch.Tensor | None, batch: int, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Token states B×L×D (None without text), bool token mask B×L, and which samples have a report (B bool)."""
        if not self.use_text or text_ids is None:
            return None, None, torch.zeros(batch, dtype=torch.bool, device=device)
        if text_mask is None:
            text_mask = torch.ones_like(text_ids)
        states, mask = self.text_encoder(text_ids, text_mask)
        return states, mask, mask.any(dim=1)

    def stage(
        self, stride: int, x: torch.Tensor, states: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Language guidance of the decoder features at one stride (before the next up-block).

        Args:
            stride: the features' stride.
            x: B×C×h×w decoder features.
            states: B×L×D report token states, or None.
            mask: B×L bool token mask, or None.

        Returns:
            the guided features and an optional auxiliary B×1×h×w map (None here; see TMCA).
        """
        if self.use_text and stride in self.guide_strides:
            x = self.guides[str(stride)](x, *self.token_proj[str(stride)](states, mask, x.shape[0]))
        return x, None

    def decode(
        self, feats: dict[int, torch.Tensor], states: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decoder from the stride-32 features to logits.

        Args:
            feats: stride → B×C×h×w encoder features.
            states, mask: as in :meth:`stage`.

        Returns:
            B×out_channels×H×W logits and the auxiliary maps :meth:`stage` returned, coarse to fine.
        """
        maps: list[torch.Tensor] = []
        x = feats[32]
        for s in STRIDES[::-1]:
            if s != 32:
                x = self.ups[str(s)](x, feats[s])
            x, aux = self.stage(s, x, states, mask)
            if aux is not None:
                maps.append(aux)
        return self.head(x), maps

    def forward(
        self, image: torch.Tensor, text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            image: B×C×H×W, H and W divisible by 32.
            text_ids: B×L report token ids, or None for image-only use.
            text_mask: B×L attention mask (1 token, 0 padding); an all-zero row means "no report".

        Returns:
            B×out_channels×H×W logits.
        """
        feats = dict(zip(STRIDES, self.encoder(image)))
        states, mask, _ = self.encode_text(text_ids, text_mask, image.shape[0], image.device)
        return self.decode(feats, states, mask)[0]
