"""TMCA: target-informed multi-level contrastive alignment (Li et al., arXiv 2412.13533), as this bundle reads it.

The paper's abstract names three parts and nothing more; ``docs/tmca.md`` says how each is built here and why:

1. target-sensitive semantic distance: image embeddings pooled under the lesion mask (target) and its complement
   (background) at each level, compared with the report's embedding (:func:`scripts.losses.alignment_loss`);
2. multi-level alignment: that comparison at strides 4, 8, 16 and 32 of the image encoder (training only);
3. language-guided target enhancement: per decoder stage a text–pixel similarity map ``A`` re-weights the
   features, ``F · (1 + A)``, and ``A`` is supervised by the mask (:class:`TargetEnhancement`).

On top of the GuideDecoder backbone (:class:`scripts.networks.guidedecoder.GuideDecoder`): ConvNeXt encoder, frozen
text encoder, guide layers (self-attention, gated cross-attention to the report tokens), here at strides
32 → 16 → 8 → 4, UNETR up-blocks, ×4 sub-pixel head.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from scripts.networks.blocks import ReportText, TokenPool, TrainingOutput
from scripts.networks.guidedecoder import STRIDES, GuideDecoder

__all__ = ["TMCA", "TMCAOutput", "TargetEnhancement"]


class TargetEnhancement(nn.Module):
    """Language-guided target enhancement of one decoder stage.

    The report is pooled into a query ``q`` of the stage's width C (:class:`TokenPool`), and every pixel feature
    ``f(p)`` is scored against it: ``A = sigmoid(⟨f(p), q⟩ / √C + b)``; the features become ``F · (1 + A)``. The
    logits of ``A`` are returned so that the mask can supervise them. Scoring in the feature space itself (rather
    than projecting every pixel to a separate space first) keeps the stride-4 stage cheap on CPU.

    Args:
        channels: C of the feature map.
        text_dim: text-encoder hidden size D.
    """

    def __init__(self, channels: int, text_dim: int) -> None:
        super().__init__()
        self.text = TokenPool(text_dim, channels)
        self.scale = channels**-0.5
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: torch.Tensor, states: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: B×C×H×W features.
            states: B×L×D report token states (None: no report in the batch).
            mask: B×L bool token mask.

        Returns:
            enhanced features B×C×H×W and the map's logits B×1×H×W.
        """
        query = self.text(states, mask, x.shape[0])
        logits = torch.einsum("bchw,bc->bhw", x, query)[:, None] * self.scale + self.bias
        return x * (1 + torch.sigmoid(logits)), logits


class TMCAOutput(TrainingOutput):
    """TMCA's training output, read by :class:`scripts.losses.TMCALoss` (and the keys of :class:`TrainingOutput`).

    - ``align_image``: per alignment level, B×d×h×w projected encoder features;
    - ``align_text``: per alignment level, B×d projected report embeddings;
    - ``align_strides``: the strides of those levels;
    - ``target_maps``: per decoder stage, coarse to fine, the B×1×h×w logits of the enhancement map.
    """

    align_image: list[torch.Tensor]
    align_text: list[torch.Tensor]
    align_strides: list[int]
    target_maps: list[torch.Tensor]


class TMCA(GuideDecoder):
    """TMCA segmentation network: image + optional report → B×1×H×W logits.

    In ``eval()`` mode ``forward`` returns the logits only; in ``train()`` mode a :class:`TMCAOutput`, which
    :class:`scripts.losses.TMCALoss` reads.

    Args:
        in_channels: image channels.
        out_channels: logit channels.
        encoder_size: ConvNeXt size (``tiny``, ``nano``, ``atto`` or ``cpu``), see
            :data:`scripts.networks.image_encoder.CONVNEXT_SIZES`.
        image_encoder_dir: local pretrained ConvNeXt folder (None: random init).
        text_encoder_dir: local Hugging Face text encoder folder (None: the bundled MiniLM).
        text_trainable_layers: top text-encoder layers to fine-tune (0: frozen).
        num_heads: attention heads of the guide layers.
        self_attention_strides: decoder strides whose guide layers run visual self-attention (quadratic in H·W).
        use_text: False removes every text path (the image-only ablation of the same network).
        alignment_levels: encoder strides with contrastive alignment (part 2); ``[]`` switches alignment off,
            ``[32]`` keeps only the deepest level.
        enhancement: language-guided target enhancement (part 3) on or off.
        embed_dim: d of the alignment space.
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
        self_attention_strides: Sequence[int] = (32, 16),
        use_text: bool = True,
        alignment_levels: Sequence[int] = STRIDES,
        enhancement: bool = True,
        embed_dim: int = 128,
    ) -> None:
        # guidance at every stride, stride 4 included: "text guidance onto low-level image features"
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            encoder_size=encoder_size,
            image_encoder_dir=image_encoder_dir,
            text_encoder_dir=text_encoder_dir,
            text_trainable_layers=text_trainable_layers,
            num_heads=num_heads,
            guide_strides=STRIDES,
            self_attention_strides=self_attention_strides,
            use_text=use_text,
        )
        ch, d_text = self.channels, self.text_dim
        self.alignment_levels = tuple(int(s) for s in alignment_levels) if self.use_text else ()
        if any(s not in STRIDES for s in self.alignment_levels):
            raise ValueError(f"alignment_levels must be among {STRIDES}, got {alignment_levels}")
        self.enhancement = bool(enhancement) and self.use_text
        self.enhancers = self.align_image = self.align_text = None
        if self.enhancement:
            self.enhancers = nn.ModuleDict({str(s): TargetEnhancement(ch[s], d_text) for s in STRIDES})
        if self.alignment_levels:
            # linear, so it commutes with the masked mean: the target embedding is the projected pooled feature
            self.align_image = nn.ModuleDict({str(s): nn.Conv2d(ch[s], embed_dim, 1) for s in self.alignment_levels})
            self.align_text = nn.ModuleDict({str(s): TokenPool(d_text, embed_dim) for s in self.alignment_levels})

    def stage(self, stride: int, x: torch.Tensor, text: ReportText) -> torch.Tensor:
        """Guide layer, then the language-guided target enhancement, whose map logits go to
        ``text.aux["target_maps"]``."""
        x = super().stage(stride, x, text)
        if self.enhancers is None:
            return x
        x, logits = self.enhancers[str(stride)](x, text.states, text.mask)
        text.aux.setdefault("target_maps", []).append(logits)
        return x

    def training_output(self, pred: torch.Tensor, feats: dict[int, torch.Tensor], text: ReportText) -> TMCAOutput:
        """The :class:`TMCAOutput`: the alignment levels' projections of the encoder features and of the report,
        and the enhancement maps the stages collected."""
        b, levels = pred.shape[0], self.alignment_levels
        return TMCAOutput(
            pred=pred,
            text_present=text.present,
            text_group=text.group,
            align_strides=list(levels),
            align_image=[self.align_image[str(s)](feats[s]) for s in levels],
            align_text=[self.align_text[str(s)](text.states, text.mask, b) for s in levels],
            target_maps=text.aux.get("target_maps", []),
        )
