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

import math

import torch
import torch.nn.functional as F
from torch import nn

from scripts.networks.blocks import ReportText, TokenPool, TrainingOutput, sincos_positions, zone_flags
from scripts.networks.guidedecoder import STRIDES, GuideDecoder

__all__ = [
    "TMCA", "TMCAOutput", "TMCABankOutput", "TargetEnhancement", "AlignedEnhancement", "ENHANCEMENT_SPACES", "bank_targets",
]

ENHANCEMENT_SPACES = ("feature", "aligned")
POSITION_CHANNELS = 32  # width of the sin-cos position map added to the alignment embeddings (alignment_position)


class _Enhancement(nn.Module):
    """``F · (1 + α·sigmoid(logits))``: α fixed at 1 (``alpha_init`` None), or learned from ``alpha_init`` (0: the
    stage starts as the identity, so an untrained map cannot disturb the backbone)."""

    def __init__(self, alpha_init: float | None) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init))) if alpha_init is not None else None

    def enhance(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        gain = torch.sigmoid(logits)
        return x * (1 + (gain if self.alpha is None else self.alpha * gain))


class TargetEnhancement(_Enhancement):
    """Language-guided target enhancement of one decoder stage, scored in the stage's own feature space.

    The report is pooled into a query ``q`` of the stage's width C (:class:`TokenPool`), and every pixel feature
    ``f(p)`` is scored against it: ``A = sigmoid(⟨f(p), q⟩ / √C + b)``; the features become ``F · (1 + α·A)``.
    The logits of ``A`` are returned so that the mask can supervise them. Scoring in the feature space itself
    (rather than projecting every pixel to a separate space first) keeps the stride-4 stage cheap on CPU.

    Args:
        channels: C of the feature map.
        text_dim: text-encoder hidden size D.
        alpha_init: None: α = 1 fixed; a number: α learned from that value.
    """

    def __init__(self, channels: int, text_dim: int, alpha_init: float | None = None) -> None:
        super().__init__(alpha_init)
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
        return self.enhance(x, logits), logits


class AlignedEnhancement(_Enhancement):
    """Language-guided target enhancement scored in the alignment space: "based on the aligned image–text
    patterns" (*our reading* of the abstract).

    Every pixel feature is projected by the level's alignment head ``P`` (the 1×1 convolution that the
    contrastive loss trains) and scored against the report's aligned embedding ``t`` by cosine:
    ``A = sigmoid(s · cos(P f(p), t) + b)``, s = exp(learned log-scale, from ln 10); the features become
    ``F · (1 + α·A)``. The alignment heads thus act at inference, and the map's supervision trains them too.

    Args:
        alpha_init: None: α = 1 fixed; a number: α learned from that value (0: identity at the start).
    """

    def __init__(self, alpha_init: float | None = 0.0) -> None:
        super().__init__(alpha_init)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, pixels: torch.Tensor, report: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: B×C×H×W features.
            pixels: B×d×H×W their projection into the alignment space.
            report: B×d the report's aligned embedding.

        Returns:
            enhanced features B×C×H×W and the map's logits B×1×H×W.
        """
        cos = torch.einsum("bdhw,bd->bhw", F.normalize(pixels, dim=1), F.normalize(report, dim=1))[:, None]
        logits = cos * self.log_scale.exp() + self.bias
        return self.enhance(x, logits), logits


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


class TMCABankOutput(TMCAOutput, total=False):
    """With a report bank (``TMCA(report_bank=True)`` and :meth:`TMCA.set_report_bank`), also:

    - ``align_bank``: per alignment level, K×d embeddings of the bank's K distinct reports;
    - ``bank_targets``: B×K soft targets of each sample over the bank (rows sum to 1; all 0 for a sample with no
      match, which then takes no part in the bank term).
    """

    align_bank: list[torch.Tensor]
    bank_targets: torch.Tensor


def bank_targets(
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    flags: torch.Tensor | None,
    bank_ids: torch.Tensor,
    bank_mask: torch.Tensor,
    bank_flags: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Soft targets of each sample over a report bank: ``softmax_j(J_ij / temperature)`` over the Jaccard overlap
    ``J`` of the lung zones the sample's report and bank report j name, so that reports naming the same zones in
    other words (a rephrasing, another word order) are positives and reports naming some of them are near ones.

    A sample whose zones are unknown (``flags`` None or all False) is matched by its token ids alone; a sample
    with neither a zone nor an exact match gets an all-zero row (no part in the bank term).

    Args:
        text_ids, text_mask: B×L the batch's reports.
        flags: B×6 bool zones of the batch's reports (:func:`scripts.networks.blocks.zone_flags`), or None.
        bank_ids, bank_mask: K×L the bank's reports.
        bank_flags: K×6 bool their zones.
        temperature: of the softmax over J ∈ [0, 1].

    Returns:
        B×K float.
    """
    keyed = text_ids.long() * text_mask.long()
    bank_keyed = bank_ids.long() * bank_mask.long()
    exact = (keyed[:, None, :] == bank_keyed[None]).all(dim=2)  # B×K
    overlap = exact.float()
    if flags is not None:
        f, g = flags.float(), bank_flags.float()
        inter = f @ g.T
        union = f.sum(1, keepdim=True) + g.sum(1)[None] - inter
        jaccard = inter / union.clamp_min(1.0)
        overlap = torch.where(flags.any(dim=1, keepdim=True), jaccard, overlap)
    has = overlap.amax(dim=1, keepdim=True) > 0
    return torch.softmax(overlap / temperature, dim=1) * has


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
        enhancement_space: ``"feature"``: each stage scores its own features against its own pooled report
            (:class:`TargetEnhancement`); ``"aligned"``: it scores them in the alignment space with the level's
            alignment heads (:class:`AlignedEnhancement`; the heads then exist at every stride, the contrastive
            loss still reads only ``alignment_levels``).
        enhancement_alpha_init: None: ``F · (1 + A)``; a number: ``F · (1 + α·A)`` with α learned from it (0: each
            stage starts as the identity).
        alignment_position: add a learned projection of 2-D sin-cos positions to the image side of the alignment
            space, so that the masked mean (the target embedding) keeps where the lesion lies.
        alignment_detach: encoder strides whose features reach the alignment heads without gradient (the
            contrastive loss then trains the heads there, not the encoder).
        report_bank: contrast each target embedding against every distinct report of the training set (the bank
            :meth:`set_report_bank` fills, ``scripts.engine.ReportBank`` at the start of training) with zone-overlap
            soft targets, rather than against the batch's reports only.
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
        enhancement_space: str = "feature",
        enhancement_alpha_init: float | None = None,
        alignment_position: bool = False,
        alignment_detach: Sequence[int] = (),
        report_bank: bool = False,
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
        if enhancement_space not in ENHANCEMENT_SPACES:
            raise ValueError(f"enhancement_space must be one of {ENHANCEMENT_SPACES}, got {enhancement_space!r}")
        self.enhancement_space = enhancement_space
        self.alignment_detach = tuple(int(s) for s in alignment_detach)
        aligned_enhancement = self.enhancement and enhancement_space == "aligned"
        # the levels with alignment heads: those of the contrastive loss, and every stride for aligned enhancement
        self.head_levels = STRIDES if aligned_enhancement else self.alignment_levels
        self.enhancers = self.align_image = self.align_text = self.align_position = None
        if self.enhancement:
            self.enhancers = nn.ModuleDict(
                {
                    str(s): AlignedEnhancement(enhancement_alpha_init) if aligned_enhancement
                    else TargetEnhancement(ch[s], d_text, enhancement_alpha_init)
                    for s in STRIDES
                }
            )
        if self.head_levels:
            # linear, so it commutes with the masked mean: the target embedding is the projected pooled feature
            self.align_image = nn.ModuleDict({str(s): nn.Conv2d(ch[s], embed_dim, 1) for s in self.head_levels})
            self.align_text = nn.ModuleDict({str(s): TokenPool(d_text, embed_dim) for s in self.head_levels})
        self.report_bank = bool(report_bank) and bool(self.alignment_levels)
        # filled at the start of training (set_report_bank); not saved: the bank is rebuilt from the datalist
        self.register_buffer("bank_ids", None, persistent=False)
        self.register_buffer("bank_mask", None, persistent=False)
        self.register_buffer("bank_flags", None, persistent=False)
        if self.head_levels and alignment_position:
            self.align_position = nn.ModuleDict(
                {str(s): nn.Conv2d(POSITION_CHANNELS, embed_dim, 1, bias=False) for s in self.head_levels}
            )

    def set_report_bank(self, ids: torch.Tensor, mask: torch.Tensor, flags: torch.Tensor) -> None:
        """The bank of distinct reports the alignment contrasts against (``report_bank``).

        Args:
            ids, mask: K×L token ids and attention masks.
            flags: K×6 bool, the lung zones each names (``scripts.zones.report_zones(...).reshape(-1)``).
        """
        device = next(self.parameters()).device
        self.bank_ids, self.bank_mask = ids.to(device), mask.to(device).bool()
        self.bank_flags = flags.to(device).bool()

    def read_zones(self, text: ReportText, zones: torch.Tensor | None, text_ids: torch.Tensor | None,
                   shape: tuple[int, int]) -> None:
        """The report bank's soft targets read the batch's zones (and its token ids); None: ids only."""
        if zones is not None:
            text.aux["zone_flags"] = zone_flags(zones)
        if text_ids is not None:
            text.aux["text_ids"] = text_ids

    def align_pixels(self, stride: int, x: torch.Tensor) -> torch.Tensor:
        """B×C×h×w features of ``stride`` → B×d×h×w in the alignment space (with the position term when on)."""
        out = self.align_image[str(stride)](x)
        if self.align_position is not None:
            h, w = x.shape[-2:]
            pos = sincos_positions((h, w), POSITION_CHANNELS, out)  # (h·w)×P
            out = out + self.align_position[str(stride)](pos.T.reshape(1, POSITION_CHANNELS, h, w))
        return out

    def align_report(self, stride: int, text: ReportText, batch: int) -> torch.Tensor:
        """B×d aligned report embedding of ``stride``, computed once per forward (kept in ``text.aux``)."""
        cache = text.aux.setdefault("aligned_report", {})
        if stride not in cache:
            cache[stride] = self.align_text[str(stride)](text.states, text.mask, batch)
        return cache[stride]

    def stage(self, stride: int, x: torch.Tensor, text: ReportText) -> torch.Tensor:
        """Guide layer, then the language-guided target enhancement, whose map logits go to
        ``text.aux["target_maps"]``."""
        x = super().stage(stride, x, text)
        if self.enhancers is None:
            return x
        enhancer = self.enhancers[str(stride)]
        if isinstance(enhancer, AlignedEnhancement):
            x, logits = enhancer(x, self.align_pixels(stride, x), self.align_report(stride, text, x.shape[0]))
        else:
            x, logits = enhancer(x, text.states, text.mask)
        text.aux.setdefault("target_maps", []).append(logits)
        return x

    def training_output(self, pred: torch.Tensor, feats: dict[int, torch.Tensor], text: ReportText) -> TMCAOutput:
        """The :class:`TMCAOutput`: the alignment levels' projections of the encoder features and of the report,
        and the enhancement maps the stages collected."""
        b, levels = pred.shape[0], self.alignment_levels
        detach = self.alignment_detach
        out = TMCAOutput(
            pred=pred,
            text_present=text.present,
            text_group=text.group,
            align_strides=list(levels),
            align_image=[self.align_pixels(s, feats[s].detach() if s in detach else feats[s]) for s in levels],
            align_text=[self.align_report(s, text, b) for s in levels],
            target_maps=text.aux.get("target_maps", []),
        )
        if self.report_bank and self.bank_ids is not None and text.states is not None:
            k = self.bank_ids.shape[0]
            states, mask = self.text_encoder(self.bank_ids, self.bank_mask)
            # the bank's reports are distinct by construction: each its own group (no K×K comparison per step)
            bank = ReportText(states, mask, mask.any(dim=1), torch.arange(k, device=mask.device))
            out["align_bank"] = [self.align_report(s, bank, k) for s in levels]
            out["bank_targets"] = bank_targets(
                text.aux["text_ids"], text.mask, text.aux.get("zone_flags"), self.bank_ids, self.bank_mask,
                self.bank_flags,
            )
        return out

    @torch.no_grad()
    def alignment_embeddings(
        self, image: torch.Tensor, text_ids: torch.Tensor | None, text_mask: torch.Tensor | None
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Encoder and report in the alignment space, without the decoder (for :mod:`scripts.health`).

        Returns:
            stride → (B×d×h×w image embeddings, B×d report embeddings), for every alignment level.
        """
        feats = dict(zip(STRIDES, self.encoder(image)))
        text = self.encode_text(text_ids, text_mask, image.shape[0], image.device)
        return {
            s: (self.align_pixels(s, feats[s]), self.align_report(s, text, image.shape[0]))
            for s in self.alignment_levels
        }
