"""SSA: spatial-aware symmetric alignment (arXiv 2512.22981), as this bundle reads it.

The paper is known from its abstract only; ``docs/ssa.md`` says how each part is built here and why:

1. symmetric alignment: entropic optimal transport between the stride-16 visual tokens and the report's tokens
   (:class:`SymmetricAlignment`, Sinkhorn in :mod:`scripts.networks.transport`); the transported report is added
   to the visual tokens and the transported visual features to the report tokens, which then guide the finer
   decoder stages;
2. directional guidance: the report's locational phrases become the lung zones it names
   (:func:`scripts.zones.report_zones`), rasterised (:func:`scripts.zones.zone_map`) into a guidance mask that
   softly gates decoder features (:class:`ZoneGate`) and, in training, tells the loss where the lesion may not be.

On the GuideDecoder backbone TMCA uses too (:class:`scripts.networks.guidedecoder.GuideDecoder`): ConvNeXt encoder, frozen text encoder, guide layers (self-attention, gated
cross-attention to the report tokens) at strides 32 → 16 → 8 → 4, UNETR up-blocks, ×4 sub-pixel head.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scripts.networks.blocks import ReportText, TrainingOutput, sincos_positions
from scripts.networks.guidedecoder import STRIDES, GuideDecoder
from scripts.networks.transport import barycentric, cosine_cost, sinkhorn
from scripts.zones import CXR_LEVEL_EDGES, report_zones, zone_map

__all__ = ["SSA", "SSAOutput", "SymmetricAlignment", "ZoneGate", "ZoneGuidance", "guidance_from_zones"]

ALIGN_STRIDE = 16


class SymmetricAlignment(nn.Module):
    """Optimal-transport alignment of visual tokens and report tokens, in both directions.

    Both sides are embedded in a shared d-dimensional space (visual tokens with a fixed 2D sin-cos position added
    first, so that "left" or "lower" can be matched with places); the cost is ``1 − cos``; the plan ``P`` (N×L) is
    the entropic OT plan between uniform distributions over the N visual tokens and the report's real tokens
    (padding excluded). Balanced OT is symmetric: the plan of the reverse problem (report → image) is exactly
    ``Pᵀ``, so one Sinkhorn solve serves both directions:

    - every visual token receives the report features it is matched with, ``Σⱼ Pᵢⱼ tⱼ / Σⱼ Pᵢⱼ``, added through a
      learned projection D → C;
    - every report token receives the visual features matched with it, ``Σᵢ Pᵢⱼ vᵢ / Σᵢ Pᵢⱼ``, added through a
      learned projection C → D.

    Samples without a report are left unchanged.

    Args:
        channels: C of the visual feature map (divisible by 4, for the 2D position embedding).
        text_dim: D of the report token states.
        embed_dim: d of the shared cost space.
        epsilon: entropic regularisation ε of the transport, in units of the cost (1 − cos ∈ [0, 2]).
        max_iter: maximum Sinkhorn iterations.
        tol: Sinkhorn early-stop threshold on the L1 marginal error.
    """

    def __init__(
        self,
        channels: int,
        text_dim: int,
        embed_dim: int = 128,
        epsilon: float = 0.05,
        max_iter: int = 100,
        tol: float = 1e-4,
    ) -> None:
        super().__init__()
        self.channels, self.epsilon, self.max_iter, self.tol = channels, float(epsilon), int(max_iter), float(tol)
        self.norm_visual = nn.LayerNorm(channels)
        self.norm_text = nn.LayerNorm(text_dim)
        self.visual_key = nn.Linear(channels, embed_dim)
        self.text_key = nn.Linear(text_dim, embed_dim)
        self.text_to_visual = nn.Linear(text_dim, channels)
        self.visual_to_text = nn.Linear(channels, text_dim)

    def forward(
        self, x: torch.Tensor, states: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            x: B×C×h×w visual features.
            states: B×L×D report token states.
            mask: B×L bool, True for real tokens; an all-False row is a sample without a report.

        Returns:
            updated visual features B×C×h×w, updated token states B×L×D, and the transport's tensors:
            ``visual`` B×N×d and ``text`` B×L×d cost embeddings (N = h·w), ``plan`` B×N×L (float32).
        """
        b, c, h, w = x.shape
        present = mask.any(dim=1)
        tokens = self.norm_visual(x.flatten(2).transpose(1, 2))
        text = self.norm_text(states)
        visual_emb = self.visual_key(tokens + sincos_positions((h, w), self.channels, tokens))
        text_emb = self.text_key(text)
        plan = sinkhorn(cosine_cost(visual_emb, text_emb), None, mask, self.epsilon, self.max_iter, self.tol)
        to_visual = self.text_to_visual(barycentric(plan, text))  # B×N×C: the report as each place sees it
        to_text = self.visual_to_text(barycentric(plan.transpose(1, 2), tokens))  # B×L×D: each word's image region
        keep = present[:, None, None].to(x.dtype)
        x = x + (keep * to_visual).transpose(1, 2).reshape(b, c, h, w)
        states = states + (keep * mask[..., None].to(states.dtype)) * to_text.to(states.dtype)
        return x, states, {"visual": visual_emb, "text": text_emb, "plan": plan}


class ZoneGate(nn.Module):
    """Soft gating of features by a guidance mask: ``F · (γ + (1 − γ)·G)``.

    ``G`` is 1 inside the zones the report names and 0 outside (all 1 for samples without named zones, which are
    therefore not gated). ``γ = sigmoid(θ)`` ∈ (0, 1) is learned, initialised at ``gamma_init`` (near 1: the coarse
    zones start as a mild hint and the network learns how much to trust them).

    Args:
        gamma_init: initial γ, in (0, 1).
    """

    def __init__(self, gamma_init: float = 0.9) -> None:
        super().__init__()
        if not 0 < gamma_init < 1:
            raise ValueError(f"gamma_init must be in (0, 1), got {gamma_init}")
        self.gamma_logit = nn.Parameter(torch.tensor(math.log(gamma_init / (1 - gamma_init))))

    @property
    def gamma(self) -> torch.Tensor:
        return torch.sigmoid(self.gamma_logit)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: B×C×h×w features.
            guidance: B×1×H×W mask in [0, 1] at any resolution (area-resized to h×w).

        Returns:
            B×C×h×w gated features.
        """
        g = guidance if guidance.shape[-2:] == x.shape[-2:] else F.interpolate(guidance, x.shape[-2:], mode="area")
        gamma = self.gamma
        return x * (gamma + (1 - gamma) * g.to(x.dtype))


class ZoneGuidance:
    """Report token ids → the lung zones the report names → B×1×X×Y guidance mask.

    The network receives token ids only, so the report is rebuilt by decoding them with the text encoder's own
    tokenizer and parsed with :func:`scripts.zones.report_zones`. Zones are cached per distinct id row (reports
    repeat: QaTa-COV19 has ~160 distinct ones); the raster is a lookup of each sample's six zone flags in a cached
    map of zone indices from :func:`scripts.zones.zone_map`.

    Arrays follow the bundle's MONAI layout, as :class:`scripts.transforms.ReportZonesd` does: spatial dim 0 is
    the image's x (columns, split into left and right halves), dim 1 its y (rows from the top, split into levels).

    Args:
        tokenizer_dir: the text encoder's local model directory.
        left_is_image_left: "left" in the report is the image's left half (QaTa-COV19); False: radiological.
        level_edges: fractions of the image height where the upper and lower zones end.
    """

    def __init__(
        self,
        tokenizer_dir: str | os.PathLike,
        left_is_image_left: bool = True,
        level_edges: Sequence[float] = CXR_LEVEL_EDGES,
    ) -> None:
        self.tokenizer_dir = str(tokenizer_dir)
        self.left_is_image_left = bool(left_is_image_left)
        self.level_edges = (float(level_edges[0]), float(level_edges[1]))
        self._tokenizer = None
        self._zones: dict[tuple[int, ...], np.ndarray | None] = {}
        self._cells: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None, "_cells": {}}

    def _tok(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        """The report text of one row of real token ids (special tokens dropped)."""
        return self._tok().decode(list(ids), skip_special_tokens=True)

    def zones(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> list[np.ndarray | None]:
        """Per sample, the 2×3 bool zones [side, level] its report names, or None (no report, no location)."""
        out: list[np.ndarray | None] = []
        for ids, m in zip(text_ids.tolist(), text_mask.bool().tolist()):
            key = tuple(i for i, keep in zip(ids, m) if keep)
            if key not in self._zones:
                self._zones[key] = report_zones(self.decode(key)) if key else None
            out.append(self._zones[key])
        return out

    def _cell_map(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        key = (shape[0], shape[1], device)
        if key not in self._cells:
            every = np.ones((2, 3), dtype=bool)
            cells = zone_map(every, shape, self.left_is_image_left, self.level_edges) - 1  # side·3 + level
            self._cells[key] = torch.as_tensor(cells, device=device)
        return self._cells[key]

    def __call__(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor, shape: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            text_ids: B×L token ids.
            text_mask: B×L attention mask (1 token, 0 padding).
            shape: spatial shape X×Y of the image.

        Returns:
            guidance B×1×X×Y float (1 in named zones, 0 elsewhere; all 1 for samples without named zones), and
            B bool, True for samples with named zones.
        """
        device = text_ids.device
        zones = self.zones(text_ids, text_mask)
        guided = torch.tensor([z is not None for z in zones], dtype=torch.bool, device=device)
        flags = np.stack([z.reshape(-1) if z is not None else np.ones(6, dtype=bool) for z in zones])
        flags_t = torch.as_tensor(flags, device=device, dtype=torch.float32)  # B×6
        cells = self._cell_map(shape, device)
        return flags_t[:, cells][:, None], guided


def guidance_from_zones(zones: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Guidance mask of a ``ReportZonesd`` raster, as :class:`ZoneGuidance` gives it from token ids.

    Args:
        zones: B×1×X×Y raster, 0 outside the named zones (all 0 when the report names none).

    Returns:
        guidance B×1×X×Y float (1 in the named zones, 0 elsewhere; all 1 for samples without named zones) and B
        bool, True for samples with named zones.
    """
    inside = zones > 0
    guided = inside.flatten(1).any(dim=1)
    return (inside | ~guided[:, None, None, None]).float(), guided


class SSAOutput(TrainingOutput, total=False):
    """SSA's training output, read by :class:`scripts.losses.ssa.SSALoss` (with the keys of
    :class:`TrainingOutput`, always there).

    - with alignment and a report in the batch: ``ot_visual`` B×N×d and ``ot_text`` B×L×d cost embeddings,
      ``ot_text_mask`` B×L bool, ``ot_plan`` B×N×L (float32), ``ot_epsilon``;
    - with directional guidance and a report in the batch: ``guidance`` B×1×H×W (1 inside the named zones, 0
      outside, all 1 for samples without named zones) and ``guided`` B bool (samples with named zones).
    """

    ot_visual: torch.Tensor
    ot_text: torch.Tensor
    ot_text_mask: torch.Tensor
    ot_plan: torch.Tensor
    ot_epsilon: float
    guidance: torch.Tensor
    guided: torch.Tensor


class SSA(GuideDecoder):
    """SSA segmentation network: image + optional report → B×1×H×W logits.

    Decoder, coarse to fine: stride 32 guide layer (report tokens as the text encoder gives them); stride 16
    up-block, symmetric OT alignment (:class:`SymmetricAlignment`), guide layer with the updated report tokens;
    strides 8 and 4 up-block and guide layer with the updated tokens. After the guide layers of ``gate_strides``
    the features are gated by the directional guidance mask (:class:`ZoneGate`), at inference as in training.

    The zones come with the batch (``scripts.transforms.ReportZonesd`` on the data path, through
    ``scripts.engine.ReportPrepareBatch``); a caller that gives token ids only (MONAI Label) gets them from the
    decoded report (:class:`ZoneGuidance`).

    In ``eval()`` mode ``forward`` returns the logits only; in ``train()`` mode an :class:`SSAOutput`, which
    :class:`scripts.losses.ssa.SSALoss` reads.

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
        alignment: the symmetric OT alignment on or off (ablation).
        ot_embed_dim: d of the OT cost space.
        ot_epsilon: entropic regularisation ε (cost 1 − cos ∈ [0, 2]).
        ot_max_iter: maximum Sinkhorn iterations.
        ot_tol: Sinkhorn early-stop threshold on the L1 marginal error.
        directional_guidance: the zone guidance on or off (ablation).
        gate_strides: decoder strides whose features the guidance mask gates.
        gate_init: initial γ of the gates (near 1: a mild gate).
        left_is_image_left: "left" in a report is the image's left half (QaTa-COV19); False: radiological.
        level_edges: where the upper and lower lung zones end, as fractions of the image height.
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
        alignment: bool = True,
        ot_embed_dim: int = 128,
        ot_epsilon: float = 0.05,
        ot_max_iter: int = 100,
        ot_tol: float = 1e-4,
        directional_guidance: bool = True,
        gate_strides: Sequence[int] = (16, 8, 4),
        gate_init: float = 0.9,
        left_is_image_left: bool = True,
        level_edges: Sequence[float] = CXR_LEVEL_EDGES,
    ) -> None:
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
            use_text=True,
        )
        ch, d_text = self.channels, self.text_dim
        self.alignment = bool(alignment)
        self.ot_epsilon = float(ot_epsilon)
        self.align = (
            SymmetricAlignment(ch[ALIGN_STRIDE], d_text, ot_embed_dim, ot_epsilon, ot_max_iter, ot_tol)
            if self.alignment
            else None
        )
        self.directional_guidance = bool(directional_guidance)
        self.gate_strides = tuple(int(s) for s in gate_strides) if self.directional_guidance else ()
        if any(s not in STRIDES for s in self.gate_strides):
            raise ValueError(f"gate_strides must be among {STRIDES}, got {gate_strides}")
        self.zone_guidance = self.gates = None
        if self.directional_guidance:
            self.zone_guidance = ZoneGuidance(self.text_encoder.model_dir, left_is_image_left, level_edges)
            self.gates = nn.ModuleDict({str(s): ZoneGate(gate_init) for s in self.gate_strides})

    def stage(self, stride: int, x: torch.Tensor, text: ReportText) -> torch.Tensor:
        """At stride 16 the symmetric OT alignment first (it updates ``text.states`` for this and the finer stages
        and adds its tensors to ``text.aux``), then the guide layer, then the zone gate of the gated strides."""
        if stride == ALIGN_STRIDE and self.align is not None and text.states is not None:
            x, text.states, ot = self.align(x, text.states, text.mask)
            text.aux.update(
                ot_visual=ot["visual"], ot_text=ot["text"], ot_plan=ot["plan"], ot_text_mask=text.mask,
                ot_epsilon=self.ot_epsilon,
            )
        x = super().stage(stride, x, text)
        guidance = text.aux.get("guidance")
        if guidance is not None and stride in self.gate_strides:
            x = self.gates[str(stride)](x, guidance)
        return x

    def training_output(self, pred: torch.Tensor, feats: dict[int, torch.Tensor], text: ReportText) -> SSAOutput:
        """The :class:`SSAOutput`: the logits, the report bookkeeping and what the stages added."""
        return SSAOutput(pred=pred, text_present=text.present, text_group=text.group, **text.aux)

    def read_zones(self, text: ReportText, zones: torch.Tensor | None, text_ids: torch.Tensor | None,
                   shape: tuple[int, int]) -> None:
        """The guidance mask: from the batch's zone raster, or, without one (MONAI Label), from the decoded
        token ids (:class:`ZoneGuidance`)."""
        if self.zone_guidance is None or text.states is None:
            return
        if zones is not None:
            text.aux["guidance"], text.aux["guided"] = guidance_from_zones(zones)
        else:
            text.aux["guidance"], text.aux["guided"] = self.zone_guidance(text_ids, text.mask, shape)
