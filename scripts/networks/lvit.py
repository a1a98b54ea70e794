"""LViT-style network: a CNN U-Net with a parallel light ViT branch fed by the report (Li et al., IEEE TMI 2023).

LViT ("Language meets Vision Transformer in Medical Image Segmentation") runs a ViT branch beside a U-Net: the
features of the U-Net's first four levels are patch-embedded to one common token grid (the image / 16), the
report's token embeddings are added to the level-1 patch embeddings, a down and an up chain of transformer stacks
pass information between levels, and the result is brought back to each level's resolution and added to the
U-Net's skip features. Pixel-level attention modules (PLAM) weight the skips before the decoder concatenates them.
``docs/lvit.md`` says what is LViT's and what is this bundle's reading. LViT's semi-supervised part (exponential
pseudo-label iteration, LV loss) is not built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, TransformerBlock
from torch import nn

from scripts.networks.blocks import TextProjector, sincos_positions
from scripts.networks.lvit_unet import NUM_LEVELS, LViTUNetDecoder, LViTUNetEncoder
from scripts.networks.text_encoder import HFTextEncoder

__all__ = ["LViTStyle", "TextToPatches", "ViTBranch", "add_upsampled"]

TOKEN_STRIDE = 16  # every ViT stage works on the same H/16 × W/16 token grid (LViT: 14×14 at 224²)


class TextToPatches(nn.Module):
    """Spreads report tokens over the ViT's patch grid, for adding to the level-1 patch embeddings.

    LViT maps its 10 BERT token embeddings to the 196 patches of a 14×14 grid with a 1D convolution whose input
    channels are the token positions: each patch receives a learned, content-independent mixture of the token
    slots. Here each patch has learned logits over the token slots (the learned "no report" slot of
    :class:`TextProjector` first); a softmax over the slots that hold real tokens makes the mixture independent of
    the report's length and of padding, and a sample without a report receives the "no report" token everywhere.
    The logits live on the grid of ``base_grid``; other grids (other image sizes) interpolate them bilinearly.

    Args:
        num_slots: token slots, the "no report" slot included (``max_report_tokens + 1``).
        base_grid: token grid (h, w) the logits are learned on (the training size / 16).
    """

    def __init__(self, num_slots: int, base_grid: Sequence[int]) -> None:
        super().__init__()
        # zeros: every patch starts with the plain mean of the report's tokens
        self.logits = nn.Parameter(torch.zeros(num_slots, *base_grid))

    def forward(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """
        Args:
            tokens: B×S×D projected tokens, slot 0 the "no report" token (S ≤ ``num_slots``).
            key_padding_mask: B×S bool, True for slots to ignore.
            grid: (h, w) of the patch grid.

        Returns:
            B×(h·w)×D text embedding of every patch (row-major, as ``flatten(2)`` orders patches).
        """
        logits = self.logits[: tokens.shape[1]]
        if tuple(logits.shape[1:]) != tuple(grid):
            logits = F.interpolate(logits[None], size=tuple(grid), mode="bilinear", align_corners=False)[0]
        scores = logits.flatten(1).T[None]  # 1×N×S
        weights = torch.softmax(scores.masked_fill(key_padding_mask[:, None, :], float("-inf")), dim=-1)
        return weights @ tokens


class _TokenProjection(nn.Sequential):
    """B×N×D_in tokens → B×N×D_out: linear, layer norm, ReLU (LViT: 1D conv over the token sequence, BN, ReLU).

    LViT's kernel-3 convolution runs along the row-major patch sequence, where neighbours wrap from one image row
    to the next; a per-token projection leaves spatial mixing to the attention.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.ReLU())


def _vit_block(dim: int, mlp_dim: int, num_heads: int) -> TransformerBlock:
    """MONAI's pre-norm ViT block (self-attention, MLP), as LViT's blocks (qkv bias on)."""
    block = TransformerBlock(dim, mlp_dim, num_heads, qkv_bias=True, use_flash_attention=True)
    # MONAI builds this norm even without cross-attention; an unused parameter would break DistributedDataParallel
    del block.norm_cross_attn
    return block


class ViTBranch(nn.Module):
    """LViT's transformer branch over the U-Net's first four levels.

    Stage k (k = 1…4) embeds the U-Net feature x_k as patches of side ``patch_size`` / 2^(k-1) (LViT: 16, 8, 4, 2
    at strides 1, 2, 4, 8), so every stage has the same token grid; a fixed 2D sin-cos position embedding is
    added, and at stage 1 the report's patch embedding too. Down chain: ``t_k = blocks(embed(x_k))``; stages 2–4
    concatenate a projection of ``t_k`` (D_k − D_{k−1} channels) with the previous stage's output,
    ``y_k = [proj(t_k), y_{k−1}]``. Up chain: ``u_4 = blocks(y_4)``, ``u_k = blocks(y_k) + proj(u_{k+1})``. Each
    ``u_k`` is turned back into a map and 1×1-convolved to C_k channels (norm, activation); nearest-upsampled to
    x_k's size, it is added to the U-Net's skip (LViT's "reconstruct" step).

    Args:
        channels: C_1…C_4 of the U-Net features.
        patch_size: patch side at stage 1 (16 / stride of x_1); halved at each further stage, so at least 8.
        vit_channels: D_1…D_4, strictly increasing, each divisible by ``num_heads`` and by 4.
        depth: transformer blocks per stack (8 stacks: 4 down, 4 up).
        num_heads: attention heads.
        mlp_ratio: MLP width of a block relative to D_k.
        dropout: dropout on the patch embeddings.
        act: activation of the map heads (MONAI name or (name, args)).
        norm: normalisation of the map heads.
    """

    def __init__(
        self,
        channels: Sequence[int],
        vit_channels: Sequence[int],
        patch_size: int = TOKEN_STRIDE,
        depth: int = 1,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
    ) -> None:
        super().__init__()
        dims = [int(d) for d in vit_channels]
        if len(channels) != NUM_LEVELS or len(dims) != NUM_LEVELS:
            raise ValueError(f"need {NUM_LEVELS} CNN and ViT widths, got {list(channels)} and {dims}")
        if any(b <= a for a, b in zip(dims, dims[1:])):
            raise ValueError(f"vit_channels must be strictly increasing (stages concatenate), got {dims}")
        if any(d % num_heads or d % 4 for d in dims):
            raise ValueError(f"each of vit_channels {dims} must be divisible by num_heads={num_heads} and by 4")
        if patch_size >> (NUM_LEVELS - 1) < 1 or patch_size % (1 << (NUM_LEVELS - 1)):
            raise ValueError(f"patch_size must be a multiple of {1 << (NUM_LEVELS - 1)}, got {patch_size}")
        self.dims = dims
        self.patch_size = int(patch_size)
        self.embed = nn.ModuleList(
            nn.Conv2d(c, d, kernel_size=patch_size >> k, stride=patch_size >> k)
            for k, (c, d) in enumerate(zip(channels, dims))
        )
        self.drop = nn.Dropout(dropout)

        def stack(d: int) -> nn.Sequential:
            return nn.Sequential(*(_vit_block(d, int(d * mlp_ratio), num_heads) for _ in range(depth)))

        self.down = nn.ModuleList(stack(d) for d in dims)
        self.up = nn.ModuleList(stack(d) for d in dims)
        self.down_fuse = nn.ModuleList(_TokenProjection(dims[k], dims[k] - dims[k - 1]) for k in range(1, NUM_LEVELS))
        self.up_fuse = nn.ModuleList(_TokenProjection(dims[k + 1], dims[k]) for k in range(NUM_LEVELS - 1))
        self.to_map = nn.ModuleList(
            Convolution(2, d, c, kernel_size=1, act=act, norm=norm) for c, d in zip(channels, dims)
        )

    def forward(self, feats: Sequence[torch.Tensor], text: torch.Tensor | None) -> list[torch.Tensor]:
        """
        Args:
            feats: x_1…x_4, B×C_k×(H_1/2^(k−1))×(W_1/2^(k−1)); H_1 and W_1 divisible by ``patch_size``.
            text: B×(h·w)×D_1 report embedding of each patch (h = H_1 / ``patch_size``), or None (image only).

        Returns:
            four maps B×C_k×h×w, to be nearest-upsampled and added to the skips (:func:`add_upsampled`).
            The 1×1 conv, norm and activation commute with nearest upsampling by an integer factor (instance and
            batch statistics of a replicated map are the same), so they run on the small grid.
        """
        h, w = feats[0].shape[-2] // self.patch_size, feats[0].shape[-1] // self.patch_size
        ys: list[torch.Tensor] = []
        for k, x in enumerate(feats):
            tokens = self.embed[k](x).flatten(2).transpose(1, 2) + sincos_positions((h, w), self.dims[k], x)
            if k == 0 and text is not None:
                tokens = tokens + text
            tokens = self.down[k](self.drop(tokens))
            ys.append(tokens if k == 0 else torch.cat([self.down_fuse[k - 1](tokens), ys[-1]], dim=-1))
        us: list[torch.Tensor] = [self.up[-1](ys[-1])]
        for k in range(NUM_LEVELS - 2, -1, -1):
            us.insert(0, self.up[k](ys[k]) + self.up_fuse[k](us[0]))
        return [self.to_map[k](u.transpose(1, 2).reshape(u.shape[0], -1, h, w)) for k, u in enumerate(us)]


def add_upsampled(x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``x + nearest_upsample(low)`` for B×C×(h·p)×(w·p) ``x`` and B×C×h×w ``low`` (integer factor p).

    Written as a broadcast add over a B×C×h×p×w×p view: the same values, without materialising the upsampled map
    (its backward, a sum over the broadcast axes, is ~5× faster than that of ``F.interpolate`` on CPU).
    """
    b, c, hp, wp = x.shape
    h, w = low.shape[-2:]
    return (x.view(b, c, h, hp // h, w, wp // w) + low[:, :, :, None, :, None]).view(b, c, hp, wp)


class LViTStyle(nn.Module):
    """LViT-style segmentation network: image + optional report → B×1×H×W logits (both modes).

    LViT's CNN U-Net (``encoder``: :class:`scripts.networks.lvit_unet.LViTUNetEncoder`, ``decoder``:
    :class:`scripts.networks.lvit_unet.LViTUNetDecoder`; LViT's layout: five levels, widths C, 2C, 4C, 8C, 8C,
    decoder widths 4C, 2C, C, C, nearest upsampling, LViT's pixel-level attention on each skip), a parallel
    :class:`ViTBranch` whose output is added to the skips of the first four levels between the two, and the frozen
    text encoder's token states projected to the ViT's level-1 width and spread over the patches
    (:class:`TextToPatches`). Trained with 0.5 Dice + 0.5 BCE (:class:`scripts.losses.DiceBCELoss`); it has no
    auxiliary outputs, so ``train()`` mode returns logits too.

    Args:
        in_channels: image channels.
        out_channels: logit channels.
        text_encoder_dir: local Hugging Face text encoder folder (None: the bundled MiniLM).
        text_trainable_layers: top text-encoder layers to fine-tune (0: frozen, as LViT's BERT).
        text_tokens: report token slots read (LViT: 10 BERT tokens; the tokenizer's length here); longer inputs
            are cut.
        img_size: (H, W) of training images; the report-to-patch map is learned on its H/16 × W/16 grid and
            interpolated for other sizes.
        channels: U-Net widths of its five levels (LViT: 64, 128, 256, 512, 512).
        stem_stride: stride of the first level. 1 is LViT's layout (first level at full resolution, a 1×1 head);
            2 starts with a stride-2 convolution and ends with a ×2 sub-pixel upsample (MONAI
            ``SubpixelUpsample``), which cuts the cost of the two full-resolution levels by ~4× for CPU training.
        vit_channels: ViT widths of stages 1–4, strictly increasing, divisible by ``vit_heads`` and 4 (None:
            ``channels[:4]``, LViT's tie). Wider than the CNN by default: the report enters at the stage-1 width.
        vit_depth: transformer blocks per stack (LViT: 1).
        vit_heads: attention heads (LViT: 8).
        vit_dropout: dropout on the patch embeddings (LViT: 0.1).
        use_text: False drops the text encoder and the report path (the image-only ablation, CNN + ViT);
            ``text_encoder``, ``text_proj`` and ``text_to_patches`` are then None.
        act: activation of the convolution blocks (LViT: ReLU).
        norm: normalisation of the convolution blocks (LViT: batch norm; instance norm here does not depend on
            the batch size).
        dropout: dropout of the convolution blocks.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        text_encoder_dir: str | os.PathLike | None = None,
        text_trainable_layers: int = 0,
        text_tokens: int = 24,
        img_size: Sequence[int] = (224, 224),
        channels: Sequence[int] = (16, 32, 64, 128, 128),
        stem_stride: int = 2,
        vit_channels: Sequence[int] | None = (32, 64, 128, 256),
        vit_depth: int = 1,
        vit_heads: int = 4,
        vit_dropout: float = 0.1,
        use_text: bool = True,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        ch = [int(c) for c in channels]
        self.stem_stride = int(stem_stride)
        dims = [int(d) for d in (vit_channels if vit_channels is not None else ch[:NUM_LEVELS])]
        self.use_text = bool(use_text)
        self.text_tokens = int(text_tokens)

        # the encoder's divisor, 16 · stem_stride, also makes level 1 a whole number of ViT patches
        self.encoder = LViTUNetEncoder(in_channels, ch, stem_stride, act=act, norm=norm, dropout=dropout)
        self.vit = ViTBranch(
            ch[:NUM_LEVELS], dims, TOKEN_STRIDE // self.stem_stride, vit_depth, vit_heads, dropout=vit_dropout,
            act=act, norm=norm,
        )
        self.decoder = LViTUNetDecoder(
            ch, out_channels, stem_stride, skip_attention=True, act=act, norm=norm, dropout=dropout
        )
        self.text_encoder: HFTextEncoder | None = None
        self.text_proj: TextProjector | None = None
        self.text_to_patches: TextToPatches | None = None
        if self.use_text:
            self.text_encoder = HFTextEncoder(text_encoder_dir, trainable_layers=text_trainable_layers)
            self.text_proj = TextProjector(self.text_encoder.hidden_size, dims[0])
            grid = [int(s) // TOKEN_STRIDE for s in img_size]
            self.text_to_patches = TextToPatches(self.text_tokens + 1, grid)

    def _report_patches(
        self, text_ids: torch.Tensor | None, text_mask: torch.Tensor | None, batch: int, grid: Sequence[int]
    ) -> torch.Tensor:
        """B×(h·w)×D_1 report embedding of every patch; samples without a report get the "no report" token."""
        states = mask = None
        if text_ids is not None:
            text_ids = text_ids[:, : self.text_tokens]
            text_mask = torch.ones_like(text_ids) if text_mask is None else text_mask[:, : self.text_tokens]
            # a batch without any report skips the encoder; torch.export (MLflow's model format) cannot branch on
            # the data and runs it always: rows without a report take the "no report" token either way
            if torch.compiler.is_exporting() or text_mask.any():
                states, mask = self.text_encoder(text_ids, text_mask)
                # padding states get zero weight; zeroing them keeps that weight from meeting a non-finite value
                states = states.masked_fill(~mask[..., None], 0.0)
        tokens, key_padding_mask = self.text_proj(states, mask, batch)
        return self.text_to_patches(tokens, key_padding_mask, grid)

    def forward(
        self, image: torch.Tensor, text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            image: B×C×H×W, H and W divisible by 16 · ``stem_stride`` (the bundle uses multiples of 32).
            text_ids: B×L report token ids, or None for image-only use.
            text_mask: B×L attention mask (1 token, 0 padding); an all-zero row means "no report".

        Returns:
            B×out_channels×H×W logits.
        """
        skips, bottleneck = self.encoder(image)
        text = None
        if self.use_text:
            grid = (image.shape[-2] // TOKEN_STRIDE, image.shape[-1] // TOKEN_STRIDE)
            text = self._report_patches(text_ids, text_mask, image.shape[0], grid)
        skips = [add_upsampled(x, m) for x, m in zip(skips, self.vit(skips, text))]
        return self.decoder(skips, bottleneck)
