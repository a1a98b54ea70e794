"""Building blocks shared by the bundle's text-guided networks."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "TextProjector", "TokenPool", "GuideLayer", "PixelLevelAttention", "cross_attention_kernel", "sincos_positions",
    "ReportText", "TrainingOutput", "report_groups", "report_bookkeeping", "with_fallback_token", "zone_flags",
]


def report_groups(text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Index of each sample's distinct report within the batch (B long): equal reports share an index (that of
    their first sample); padding is ignored. Pairwise comparison rather than ``torch.unique``, which waits for the
    device."""
    keyed = text_ids.long() * text_mask.long()
    same = (keyed[:, None, :] == keyed[None, :, :]).all(dim=2)
    return same.to(torch.uint8).argmax(dim=1)  # the first maximum: the first sample with this report


def report_bookkeeping(
    text_ids: torch.Tensor | None, mask: torch.Tensor | None, batch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples have a report (B bool) and which share one (B long, :func:`report_groups`); without text
    every sample is report-free and in group 0. The contrastive losses read both: samples with the same report are
    positives of each other, report-free samples take no part."""
    if text_ids is None or mask is None:
        return torch.zeros(batch, dtype=torch.bool, device=device), torch.zeros(batch, dtype=torch.long, device=device)
    return mask.any(dim=1), report_groups(text_ids, mask)


def with_fallback_token(valid: torch.Tensor) -> torch.Tensor:
    """A B×L token mask in which rows without any valid token count every token as valid, so that softmax,
    attention and max over the row stay finite. Such rows belong to samples without a report: the losses give
    them zero weight, and finite values keep them in the graph without NaN gradients."""
    return valid | ~valid.any(dim=1, keepdim=True)


def zone_flags(zones: torch.Tensor) -> torch.Tensor:
    """B×6 bool, the lung zones a ``ReportZonesd`` raster (B×1×X×Y, 1 + side·3 + level inside each named zone, 0
    elsewhere) names, in the order of ``scripts.zones.report_zones(...).reshape(-1)``; no host sync."""
    codes = torch.arange(1, 7, device=zones.device, dtype=zones.dtype)
    return (zones.flatten(1)[:, :, None] == codes).any(dim=1)


@dataclass
class ReportText:
    """A batch's reports as the decoder stages read them.

    Attributes:
        states: B×L×D text-encoder token states; None when the network has no text path or the call gave no text.
        mask: B×L bool, True for real tokens (None with ``states``).
        present: B bool, False for samples without a report.
        group: B long, equal for samples with the same report (:func:`report_groups`).
        aux: training outputs the stages add on the way (TMCA's enhancement maps, SSA's transport plan, ...).
    """

    states: torch.Tensor | None
    mask: torch.Tensor | None
    present: torch.Tensor
    group: torch.Tensor
    aux: dict[str, Any] = field(default_factory=dict)


class TrainingOutput(TypedDict):
    """What a text-guided network returns in ``train()`` mode, read by its loss; networks extend it.

    - ``pred``: B×out_channels×H×W logits;
    - ``text_present``: B bool, False for samples without a report;
    - ``text_group``: B long, equal for samples with the same report.
    """

    pred: torch.Tensor
    text_present: torch.Tensor
    text_group: torch.Tensor


@functools.lru_cache(maxsize=64)
def _sincos_table(grid: tuple[int, int], channels: int) -> torch.Tensor:
    return build_sincos_position_embedding(grid, channels, spatial_dims=2).data[0]


def sincos_positions(grid: tuple[int, int], channels: int, ref: torch.Tensor) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (MONAI's), (h·w)×channels on ``ref``'s device and dtype; a (1, L) grid
    gives 1D positions for a token sequence. Built once per grid and width (channels divisible by 4); while
    ``torch.jit.trace`` records, built every call, since a cached table would make the second traced invocation's
    graph differ from the first (the trace check then fails)."""
    key = (tuple(int(g) for g in grid), int(channels))
    table = _sincos_table.__wrapped__(*key) if torch.jit.is_tracing() else _sincos_table(*key)
    return table.to(ref.device, ref.dtype)


class TextProjector(nn.Module):
    """Projects text-encoder token states to ``out_dim`` and prepends a learned "no report" token.

    The extra token is always a valid key: for a sample without a report (all-zero attention mask, or no text at
    all) it is the only key, so the guided layers fall back to a learned image-only behaviour; for a sample with a
    report it lets attention choose "nothing in this text applies here".

    Args:
        in_dim: text-encoder hidden size D.
        out_dim: channels of the guided visual features.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.null_token = nn.Parameter(torch.randn(1, 1, out_dim) * 0.02)

    def forward(
        self, states: torch.Tensor | None, mask: torch.Tensor | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            states: B×L×D token states, or None when no sample has a report.
            mask: B×L bool, True for real tokens; None means all tokens are real.
            batch_size: B, needed when ``states`` is None.

        Returns:
            tokens B×(L+1)×out_dim and ``key_padding_mask`` B×(L+1) bool, True where a key must be ignored
            (the convention of ``nn.MultiheadAttention``).
        """
        null = self.null_token.expand(batch_size, -1, -1)
        valid_null = torch.ones(batch_size, 1, dtype=torch.bool, device=null.device)
        if states is None:
            return null, ~valid_null
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        tokens = torch.cat([null, self.proj(states)], dim=1)
        return tokens, ~torch.cat([valid_null, mask.bool()], dim=1)


class TokenPool(nn.Module):
    """Learned attention pooling of report token states into one B×out_dim vector.

    Frozen sentence encoders pool reports that differ in one word ("left"/"right") into nearly identical vectors
    (cosine 0.98 for MiniLM); a trainable query over the token states can weight the words that matter. Samples
    without a report get a learned "no report" vector.

    Args:
        in_dim: text-encoder hidden size D.
        out_dim: size of the pooled vector.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.key = nn.Linear(in_dim, out_dim)
        self.value = nn.Linear(in_dim, out_dim)
        self.query = nn.Parameter(torch.randn(out_dim) * out_dim**-0.5)
        self.null = nn.Parameter(torch.randn(1, out_dim) * 0.02)

    def forward(self, states: torch.Tensor | None, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """
        Args:
            states: B×L×D token states, or None when no sample has a report.
            mask: B×L bool, True for real tokens.
            batch_size: B.

        Returns:
            B×out_dim pooled reports.
        """
        null = self.null.expand(batch_size, -1)
        if states is None:
            return null
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        mask = mask.bool()
        scores = (self.key(states) @ self.query) * self.query.shape[0] ** -0.5
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1).nan_to_num(0.0)
        pooled = (weights[..., None] * self.value(states)).sum(dim=1)
        return torch.where(mask.any(dim=1, keepdim=True), pooled, null)


def cross_attention_kernel(device: torch.device) -> contextlib.AbstractContextManager:
    """Attention kernels for visual queries over the ~25 report tokens: on the CPU PyTorch's plain math kernel,
    elsewhere PyTorch's choice. The CPU flash kernel is slow for thousands of queries against so few keys (head
    width 8 at stride 4); in an interleaved A/B of the bf16 training step at batch 8 the math kernel took TMCA from
    0.282 s to 0.253 s, while on the visual self-attention it was slower (GuideDecoder 0.224 → 0.328 s), so only
    the cross-attention uses it."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()


class GuideLayer(nn.Module):
    """Language guidance of a visual feature map (GuideDecoder-style).

    Self-attention over the visual tokens, gated cross-attention from visual tokens (queries) to text tokens
    (keys/values, padding masked), then an MLP; each with a pre-norm residual. A fixed 2D sin-cos position
    embedding is added to queries and keys of the visual tokens, so that words such as "left" or "lower" can be
    tied to places in the image.

    Args:
        channels: C of the feature map; the text tokens must have C channels too. Must be divisible by 4.
        num_heads: attention heads.
        self_attention: whether to run the visual self-attention (quadratic in H·W: off for fine levels).
        gate_init: initial value of the learnable gate of the cross-attention branch (before tanh).
    """

    def __init__(self, channels: int, num_heads: int = 4, self_attention: bool = True, gate_init: float = 0.5) -> None:
        super().__init__()
        self.channels = channels
        self.self_attn = nn.MultiheadAttention(channels, num_heads, batch_first=True) if self_attention else None
        self.norm_self = nn.LayerNorm(channels) if self_attention else None
        self.norm_cross = nn.LayerNorm(channels)
        self.cross_attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.norm_mlp = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, x: torch.Tensor, text: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: B×C×H×W visual features.
            text: B×L×C text tokens.
            key_padding_mask: B×L bool, True for keys to ignore.

        Returns:
            B×C×H×W guided features.
        """
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        pos = sincos_positions((h, w), self.channels, tokens)
        if self.self_attn is not None:
            normed = self.norm_self(tokens)
            q = normed + pos
            tokens = tokens + self.self_attn(q, q, normed, need_weights=False)[0]
        q = self.norm_cross(tokens) + pos
        with cross_attention_kernel(tokens.device):
            attended = self.cross_attn(q, text, text, key_padding_mask=key_padding_mask, need_weights=False)[0]
        tokens = tokens + torch.tanh(self.gate) * attended
        tokens = tokens + self.mlp(self.norm_mlp(tokens))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class PixelLevelAttention(nn.Module):
    """LViT's pixel-level attention module (PLAM) on a skip connection.

    Two 1×1 convolutions + ReLU give two feature maps; their channel mean ``a`` and channel max ``m`` and the sum
    ``a + m`` form a 3-vector per pixel, which a per-pixel MLP (3 → 3·``ratio`` → 1) turns into one weight
    ``w(p)``; the output is ``w(p) · x(p)``: every channel of a pixel is scaled by the same weight. As in LViT's
    code the weight is not squashed by a sigmoid, so the module can also amplify or flip a pixel's features.

    Args:
        channels: C of the feature map.
        ratio: expansion of the MLP's hidden layer (LViT: 2).
    """

    def __init__(self, channels: int, ratio: int = 2) -> None:
        super().__init__()
        self.avg_branch = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.ReLU())
        self.max_branch = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.ReLU())
        # 1×1 convolutions over the 3 statistics are the per-pixel MLP
        self.mlp = nn.Sequential(nn.Conv2d(3, 3 * ratio, 1), nn.ReLU(), nn.Conv2d(3 * ratio, 1, 1))

    def weight(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W features → B×1×H×W per-pixel weights."""
        avg = self.avg_branch(x).mean(dim=1, keepdim=True)
        top = self.max_branch(x).amax(dim=1, keepdim=True)
        return self.mlp(torch.cat([avg, top, avg + top], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W → B×C×H×W."""
        return self.weight(x) * x
