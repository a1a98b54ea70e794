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

from scripts.networks.blocks import TokenPool
from scripts.networks.guidedecoder import STRIDES, GuideDecoder

__all__ = ["TMCA", "TargetEnhancement", "report_groups"]


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


def report_groups(text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Index of each sample's distinct report within the batch (B long): equal reports share an index (that of
    their first sample). Pairwise comparison rather than ``torch.unique``, which waits for the device."""
    keyed = text_ids.long() * text_mask.long()
    same = (keyed[:, None, :] == keyed[None, :, :]).all(dim=2)
    return same.to(torch.uint8).argmax(dim=1)  # the first maximum: the first sample with this report


class TMCA(GuideDecoder):
    """TMCA segmentation network: image + optional report → B×1×H×W logits.

    In ``eval()`` mode ``forward`` returns the logits only. In ``train()`` mode it returns a dict that
    :class:`scripts.losses.TMCALoss` reads:

    - ``"pred"``: B×1×H×W logits;
    - ``"align_image"``: per alignment level, B×d×h×w projected encoder features;
    - ``"align_text"``: per alignment level, B×d projected report embeddings;
    - ``"align_strides"``: the strides of those levels;
    - ``"target_maps"``: per decoder stage, the B×1×h×w logits of the enhancement map;
    - ``"text_present"``: B bool, False for samples without a report;
    - ``"text_group"``: B long, equal for samples with the same report.

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
            in_channels, out_channels, encoder_size, image_encoder_dir, text_encoder_dir, text_trainable_layers,
            num_heads, guide_strides=STRIDES, self_attention_strides=self_attention_strides, use_text=use_text,
        )
        ch = self.channels
        self.alignment_levels = tuple(int(s) for s in alignment_levels) if self.use_text else ()
        if any(s not in STRIDES for s in self.alignment_levels):
            raise ValueError(f"alignment_levels must be among {STRIDES}, got {alignment_levels}")
        self.enhancement = bool(enhancement) and self.use_text
        if not self.use_text:
            return
        d_text = self.text_encoder.hidden_size
        if self.enhancement:
            self.enhancers = nn.ModuleDict({str(s): TargetEnhancement(ch[s], d_text) for s in STRIDES})
        if self.alignment_levels:
            # linear, so it commutes with the masked mean: the target embedding is the projected pooled feature
            self.align_image = nn.ModuleDict({str(s): nn.Conv2d(ch[s], embed_dim, 1) for s in self.alignment_levels})
            self.align_text = nn.ModuleDict({str(s): TokenPool(d_text, embed_dim) for s in self.alignment_levels})

    def stage(
        self, stride: int, x: torch.Tensor, states: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Guide layer, then the language-guided target enhancement; returns the features and the map's logits."""
        x, _ = super().stage(stride, x, states, mask)
        if not self.enhancement:
            return x, None
        return self.enhancers[str(stride)](x, states, mask)

    def forward(
        self, image: torch.Tensor, text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor | dict:
        """
        Args:
            image: B×C×H×W, H and W divisible by 32.
            text_ids: B×L report token ids, or None for image-only use.
            text_mask: B×L attention mask (1 token, 0 padding); an all-zero row means "no report".

        Returns:
            B×out_channels×H×W logits in eval mode; the dict described in the class docstring in train mode.
        """
        b = image.shape[0]
        feats = dict(zip(STRIDES, self.encoder(image)))
        states, mask, present = self.encode_text(text_ids, text_mask, b, image.device)
        pred, maps = self.decode(feats, states, mask)
        if not self.training:
            return pred
        out: dict = {"pred": pred, "target_maps": maps, "align_strides": list(self.alignment_levels)}
        out["align_image"] = [self.align_image[str(s)](feats[s]) for s in self.alignment_levels]
        out["align_text"] = [self.align_text[str(s)](states, mask, b) for s in self.alignment_levels]
        if self.use_text:
            out["text_present"] = present
            no_text = torch.zeros(b, dtype=torch.long, device=image.device)
            out["text_group"] = no_text if mask is None else report_groups(text_ids, mask)
        return out
