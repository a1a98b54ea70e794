"""RecLMIS: cross-modal conditioned reconstruction (Huang et al., IEEE TMI 2024), as this bundle builds it.

A CNN U-Net (LViT's CNN branch: four max-pool stages, pixel-level attention on the skips) whose stride-16
bottleneck meets the report in a bidirectional cross-attention *interactor*; the interactor's image tokens feed the
decoder. Training adds what inference never runs:

- importance scores of image and text tokens (a small MLP on the interactor outputs, softmax over tokens);
- importance-weighted masking: a fraction of each modality's tokens, drawn without replacement with probability
  equal to the importance, is replaced by a learned mask token;
- two small transformer decoders that reconstruct the masked image tokens from the report and the masked report
  tokens from the image, their cross-attention re-weighted by the importance of the conditioning tokens;
- the tokens and importances that :class:`scripts.losses.reclmis.RecLMISLoss` needs for its token-wise
  max-similarity contrastive term.

``docs/reclmis.md`` states what follows the published code and what is our reading.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from scripts.networks.blocks import (
    GuideLayer,
    TextProjector,
    TrainingOutput,
    report_bookkeeping,
    sincos_positions,
    with_fallback_token,
)
from scripts.networks.lvit_unet import LViTUNetDecoder, LViTUNetEncoder
from scripts.networks.text_encoder import HFTextEncoder

__all__ = ["RecLMIS", "RecLMISOutput", "CrossModalInteractor", "ReconstructionDecoder", "importance_mask"]


def importance_mask(scores: torch.Tensor, valid: torch.Tensor, rate: float) -> torch.Tensor:
    """Draws the tokens to mask, without replacement, with probability ``softmax(scores)`` (Gumbel top-k).

    Every row with n valid tokens gets ``max(1, floor(rate · n))`` masked tokens, rows without valid tokens none.
    Top-k of ``scores + Gumbel noise`` is a draw without replacement from ``softmax(scores)``; computing it from
    the scores (not the probabilities) keeps tokens whose probability underflows to zero drawable.

    Args:
        scores: B×N importance logits (no gradient flows through the draw).
        valid: B×N bool, True for real tokens.
        rate: fraction of the valid tokens to mask.

    Returns:
        B×N bool, True for masked tokens (always within ``valid``).
    """
    scores = scores.detach().float()
    gumbel = -torch.log(-torch.log(torch.rand_like(scores).clamp(1e-12, 1.0 - 1e-7)))
    keys = (scores + gumbel).masked_fill(~valid, float("-inf"))
    ranks = keys.argsort(dim=1, descending=True).argsort(dim=1)
    n = valid.sum(dim=1, keepdim=True)
    k = torch.where(n > 0, (n * rate).floor().clamp_min(1), torch.zeros_like(n))
    return (ranks < k) & valid


class CrossModalInteractor(nn.Module):
    """Bidirectional cross-attention at the bottleneck: text tokens attend to image tokens, then image tokens
    attend to the updated text tokens.

    Both directions are pre-norm residual blocks with fixed 2D sin-cos positions on the image tokens. The image
    direction is a :class:`scripts.networks.blocks.GuideLayer` (gated cross-attention, MLP) whose keys include
    the learned "no report" token, so a sample without a report keeps its image features (the published
    interactor has no residual and would lose them).

    Args:
        channels: C of the bottleneck and of the projected text tokens.
        num_heads: attention heads.
    """

    def __init__(self, channels: int, num_heads: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.norm_text = nn.LayerNorm(channels)
        self.norm_image = nn.LayerNorm(channels)
        self.text_attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))
        self.image_guide = GuideLayer(channels, num_heads, self_attention=False)

    def forward(
        self, x: torch.Tensor, text: torch.Tensor, key_padding_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: B×C×h×w bottleneck features.
            text: B×T×C text tokens (the "no report" token first).
            key_padding_mask: B×T bool, True for padding.

        Returns:
            image features B×C×h×w conditioned on the text, and text tokens B×T×C conditioned on the image.
        """
        h, w = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)
        normed = self.norm_image(tokens)
        keys = normed + sincos_positions((h, w), self.channels, tokens)
        text = text + self.text_attn(self.norm_text(text), keys, normed, need_weights=False)[0]
        text = text + self.mlp(self.norm_mlp(text))
        return self.image_guide(x, text, key_padding_mask), text


class ReconstructionDecoder(nn.Module):
    """Reconstructs one modality's tokens from a masked copy, conditioned on the other modality's tokens.

    Masked tokens are replaced by a learned mask token, positions are added, then ``num_layers`` transformer
    decoder layers (self-attention, cross-attention to the condition, MLP) and a linear head. The cross-attention
    is re-weighted by the importance of the condition's tokens: adding ``log w`` to the attention logits turns
    ``softmax(s)`` into ``softmax(s) · w`` renormalised, as the published decoder does.

    Args:
        channels: C of the tokens and the condition.
        out_dim: size of the reconstructed features.
        num_layers: decoder layers.
        num_heads: attention heads.
    """

    def __init__(self, channels: int, out_dim: int, num_layers: int = 2, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.mask_token = nn.Parameter(torch.randn(channels) * 0.02)
        layer = nn.TransformerDecoderLayer(channels, num_heads, 2 * channels, dropout=0.1, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers)
        self.head = nn.Linear(channels, out_dim)

    def forward(
        self,
        tokens: torch.Tensor,
        masked: torch.Tensor,
        pos: torch.Tensor,
        condition: torch.Tensor,
        condition_log_weight: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            tokens: B×N×C tokens to reconstruct (unmasked values).
            masked: B×N bool, True where the token is hidden.
            pos: N×C positions.
            condition: B×S×C tokens of the other modality.
            condition_log_weight: B×S log-importance of the condition tokens (−inf for padding).
            key_padding_mask: B×N bool, True for padded query tokens (ignored in self-attention).

        Returns:
            B×N×out_dim reconstruction.
        """
        b, n, _ = tokens.shape
        x = torch.where(masked[..., None], self.mask_token.to(tokens.dtype), tokens) + pos
        # one additive bias per (sample, head, query, key): the condition's log-importance
        bias = condition_log_weight[:, None, None, :].expand(b, self.num_heads, n, -1)
        bias = bias.reshape(b * self.num_heads, n, -1)
        x = self.decoder(x, condition, memory_mask=bias.to(x.dtype), tgt_key_padding_mask=key_padding_mask)
        return self.head(x)


class RecLMISOutput(TrainingOutput):
    """What :class:`RecLMIS` returns in ``train()`` mode, read by :class:`scripts.losses.reclmis.RecLMISLoss`:
    ``pred``, ``text_present`` and ``text_group`` as :class:`scripts.networks.blocks.TrainingOutput`, and

    - ``"image_tokens"``: B×N×C bottleneck tokens before the interactor (N = H·W / 256);
    - ``"text_tokens"``: B×L×C projected report tokens before the interactor;
    - ``"text_valid"``: B×L bool, True for real tokens;
    - ``"image_importance"``, ``"text_importance"``: B×N and B×L token importances (rows sum to 1; padding 0);
    - ``"image_masked"``, ``"text_masked"``: B×N and B×L bool, the tokens hidden from the decoders;
    - ``"rec_image"``, ``"rec_image_target"``: B×N×C reconstructed image tokens and their (detached) target, the
      interactor's image tokens;
    - ``"rec_text"``, ``"rec_text_target"``: B×L×D reconstructed report tokens and their (detached) target, the
      text encoder's token states.
    """

    image_tokens: torch.Tensor
    text_tokens: torch.Tensor
    text_valid: torch.Tensor
    image_importance: torch.Tensor
    text_importance: torch.Tensor
    image_masked: torch.Tensor
    text_masked: torch.Tensor
    rec_image: torch.Tensor
    rec_image_target: torch.Tensor
    rec_text: torch.Tensor
    rec_text_target: torch.Tensor


class RecLMIS(nn.Module):
    """RecLMIS segmentation network: image + optional report → B×1×H×W logits.

    LViT's CNN U-Net (``encoder``: :class:`scripts.networks.lvit_unet.LViTUNetEncoder`, ``decoder``:
    :class:`scripts.networks.lvit_unet.LViTUNetDecoder`, full-resolution stem, ReLU, no dropout) with the
    :class:`CrossModalInteractor` on the bottleneck between the two. In ``eval()`` mode ``forward`` returns the
    logits only: no importance, masking or reconstruction runs. In ``train()`` mode it returns a
    :class:`RecLMISOutput`.

    Args:
        in_channels: image channels.
        out_channels: logit channels.
        features: U-Net widths at strides 1, 2, 4, 8 and 16 (the bottleneck, which is also the width of the
            interactor and the reconstruction decoders); the published network uses (64, 128, 256, 512, 512).
        text_encoder_dir: local Hugging Face text encoder folder (None: the bundled MiniLM).
        text_trainable_layers: top text-encoder layers to fine-tune (0: frozen, as published).
        num_heads: attention heads of the interactor and the reconstruction decoders.
        skip_attention: LViT's pixel-level attention on the skip connections.
        image_mask_rate: fraction of image tokens masked for reconstruction (published 0.5).
        text_mask_rate: fraction of report tokens masked for reconstruction (published 0.3).
        rec_layers: transformer layers of each reconstruction decoder.
        norm: normalisation of the convolutions (MONAI name; the published network uses batch norm).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (12, 24, 48, 96, 96),
        text_encoder_dir: str | os.PathLike | None = None,
        text_trainable_layers: int = 0,
        num_heads: int = 4,
        skip_attention: bool = True,
        image_mask_rate: float = 0.5,
        text_mask_rate: float = 0.3,
        rec_layers: int = 2,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        if len(features) != 5:
            raise ValueError(f"features must give 5 widths (strides 1, 2, 4, 8, 16), got {features}")
        f = tuple(int(c) for c in features)
        if f[4] % 4:
            raise ValueError(f"the bottleneck width must be divisible by 4 (sin-cos positions), got {f[4]}")
        self.features = f
        self.image_mask_rate, self.text_mask_rate = float(image_mask_rate), float(text_mask_rate)
        act = ("relu", {"inplace": True})
        # one convolution at full resolution before the first pooling, as LViT's (the costliest level on CPU)
        self.encoder = LViTUNetEncoder(in_channels, f, stem_stride=1, act=act, norm=norm)
        self.decoder = LViTUNetDecoder(
            f, out_channels, stem_stride=1, skip_attention=skip_attention, act=act, norm=norm
        )

        self.text_encoder = HFTextEncoder(text_encoder_dir, trainable_layers=text_trainable_layers)
        d_text = self.text_encoder.hidden_size
        c = f[4]
        self.text_proj = TextProjector(d_text, c)
        self.interactor = CrossModalInteractor(c, num_heads)
        # training only
        self.image_importance = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, 1))
        self.text_importance = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, 1))
        self.rec_image = ReconstructionDecoder(c, c, rec_layers, num_heads)
        self.rec_text = ReconstructionDecoder(c, d_text, rec_layers, num_heads)

    def _encode_text(
        self, text_ids: torch.Tensor | None, text_mask: torch.Tensor | None, batch: int, ref: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Token states B×L×D and bool mask B×L; (None, None) without text at inference.

        In training a missing report becomes one padding token, so that the training-only modules run (with zero
        weight in the loss) and every parameter stays in the graph.
        """
        if text_ids is None:
            if not self.training:
                return None, None
            d = self.text_encoder.hidden_size
            return ref.new_zeros(batch, 1, d), torch.zeros(batch, 1, dtype=torch.bool, device=ref.device)
        if text_mask is None:
            text_mask = torch.ones_like(text_ids)
        return self.text_encoder(text_ids, text_mask)

    def forward(
        self, image: torch.Tensor, text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor | RecLMISOutput:
        """
        Args:
            image: B×C×H×W, H and W divisible by 16.
            text_ids: B×L report token ids, or None for image-only use.
            text_mask: B×L attention mask (1 token, 0 padding); an all-zero row means "no report".

        Returns:
            B×out_channels×H×W logits in eval mode, a :class:`RecLMISOutput` in train mode.
        """
        b = image.shape[0]
        skips, bottleneck = self.encoder(image)
        states, mask = self._encode_text(text_ids, text_mask, b, image)
        text, key_padding = self.text_proj(states, mask, b)
        fused, text_fused = self.interactor(bottleneck, text, key_padding)
        pred = self.decoder(skips, fused)
        if not self.training:
            return pred
        present, group = report_bookkeeping(text_ids, mask, b, image.device)
        reconstruction = self._reconstruct(bottleneck, fused, text[:, 1:], text_fused[:, 1:], states, mask)
        return RecLMISOutput(pred=pred, text_present=present, text_group=group, **reconstruction)

    def _reconstruct(
        self,
        bottleneck: torch.Tensor,
        fused: torch.Tensor,
        words: torch.Tensor,
        words_fused: torch.Tensor,
        states: torch.Tensor,
        mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Importance, masking and the two reconstructions (training only): the :class:`RecLMISOutput` keys
        other than ``pred``, ``text_present`` and ``text_group``.

        Args:
            bottleneck: B×C×h×w encoder features before the interactor.
            fused: B×C×h×w interactor image features.
            words: B×L×C projected report tokens before the interactor.
            words_fused: B×L×C interactor report tokens.
            states: B×L×D text-encoder token states.
            mask: B×L bool token mask.
        """
        h, w = bottleneck.shape[-2:]
        c = bottleneck.shape[1]
        image_tokens = bottleneck.flatten(2).transpose(1, 2)
        image_pos = sincos_positions((h, w), c, image_tokens)
        text_pos = sincos_positions((1, words.shape[1]), c, words)
        image_valid = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=image_tokens.device)
        text_valid = with_fallback_token(mask)

        # importance from the interactor outputs: the tokens each modality found relevant to the other
        image_scores = self.image_importance(fused.flatten(2).transpose(1, 2))[..., 0]
        text_scores = self.text_importance(words_fused)[..., 0].masked_fill(~text_valid, float("-inf"))
        image_log_w, text_log_w = image_scores.log_softmax(dim=1), text_scores.log_softmax(dim=1)
        image_masked = importance_mask(image_scores, image_valid, self.image_mask_rate)
        text_masked = importance_mask(text_scores, mask, self.text_mask_rate)

        rec_image = self.rec_image(image_tokens, image_masked, image_pos, words + text_pos, text_log_w)
        rec_text = self.rec_text(words, text_masked, text_pos, image_tokens + image_pos, image_log_w, ~text_valid)
        return {
            "image_tokens": image_tokens,
            "text_tokens": words,
            "text_valid": mask,
            "image_importance": image_log_w.exp(),
            "text_importance": text_log_w.exp() * mask,
            "image_masked": image_masked,
            "text_masked": text_masked,
            "rec_image": rec_image,
            "rec_image_target": fused.flatten(2).transpose(1, 2).detach(),
            "rec_text": rec_text,
            "rec_text_target": states.detach(),
        }
