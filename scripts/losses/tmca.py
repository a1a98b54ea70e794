"""TMCA's losses: target-sensitive multi-level contrastive alignment and enhancement-map supervision."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from scripts.losses.contrastive import symmetric_batch_nce
from scripts.losses.segmentation import DiceBCELoss

__all__ = ["TMCALoss", "alignment_loss"]


def alignment_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    mask: torch.Tensor,
    group: torch.Tensor,
    present: torch.Tensor,
    temperature: float = 0.07,
    target_sensitive: bool = True,
    bank: torch.Tensor | None = None,
    bank_targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target-sensitive contrastive alignment of one level (TMCA parts 1 and 2).

    The image side is pooled under the ground-truth mask resized to the level (*target* embedding) rather than
    over the whole image, so the distance to the report measures the lesion the report describes. Symmetric
    InfoNCE over the batch: image→text over the batch's reports, text→image over the batch's target embeddings
    plus the image's own *background* embedding as a hard negative. Samples with the same report are positives
    of each other, never negatives (QaTa-COV19 has ~150 distinct reports). Samples without a report or without
    lesion take no part.

    Args:
        image: B×d×h×w projected image features of the level.
        text: B×d projected report embeddings.
        mask: B×1×H×W binary ground truth (any H×W; resized by area to h×w).
        group: B long, equal for equal reports.
        present: B bool, False where the report is missing.
        temperature: τ of the cosine logits.
        target_sensitive: False pools over the whole image and drops the background negative (ablation of part 1).
        bank: K×d embeddings of a report bank (every distinct training report); with it, image → report runs over
            the bank with ``bank_targets`` as soft targets instead of over the batch's reports.
        bank_targets: B×K soft targets (rows sum to 1; an all-zero row takes no part).

    Returns:
        ``(image_to_text, text_to_image)`` losses, zero when fewer than one sample takes part.
    """
    weight = F.interpolate(mask.to(image.dtype), size=image.shape[-2:], mode="area")
    if target_sensitive:
        # masked sums as batched products: no B×d×h×w temporaries (4 of them cost ~10 ms of a 0.3 s CPU step)
        area = weight.sum(dim=(2, 3))
        inside = torch.einsum("bdhw,bhw->bd", image, weight[:, 0])
        target = inside / area.clamp_min(1e-6)
        background = (image.sum(dim=(2, 3)) - inside) / (1 - weight).sum(dim=(2, 3)).clamp_min(1e-6)
        valid = present & (area[:, 0] > 0)
    else:
        target, background = image.mean(dim=(2, 3)), None
        valid = present
    t = F.normalize(text, dim=1)
    logits = F.normalize(target, dim=1) @ t.T / temperature  # rows: images, columns: reports
    hard = None
    if background is not None:
        hard = (F.normalize(background, dim=1) * t).sum(dim=1, keepdim=True) / temperature
    image_to_text, text_to_image = symmetric_batch_nce(logits, group, valid, hard)
    if bank is not None and bank_targets is not None:
        bank_logits = F.normalize(target, dim=1) @ F.normalize(bank, dim=1).T / temperature
        per_row = -(bank_targets.to(bank_logits.dtype) * bank_logits.log_softmax(dim=1)).sum(dim=1)
        rows = (valid & (bank_targets.sum(dim=1) > 0)).to(per_row.dtype)
        image_to_text = (per_row * rows).sum() / rows.sum().clamp_min(1.0)
    return image_to_text, text_to_image


LEVEL_REDUCTIONS = ("sum", "mean")


class TMCALoss(nn.Module):
    """Dice + BCE + w(t) · λ_align · Rₛ wₛ · alignmentₛ + λ_map · Σ map BCE, every term returned by name.

    Rₛ is the sum over the alignment levels, or their mean (``level_reduction``); w(t) ramps linearly from 0 to 1
    over the first ``warmup_epochs`` of training (:meth:`set_progress`, called by
    :class:`scripts.engine.TrainingProgress`), so that an alignment near chance does not pull the encoder against
    the segmentation from the first step.

    Reads the training output of :class:`scripts.networks.TMCA` (a plain logit tensor is accepted too, giving
    Dice + BCE only, so image-only networks can share the loss).

    Args:
        lambda_dice, lambda_bce: weights of the segmentation terms.
        lambda_align: weight of the alignment term.
        lambda_map: weight of the enhancement-map supervision.
        level_weights: stride → weight of that level's alignment (default 1 for every level).
        temperature: τ of the alignment logits.
        target_sensitive: see :func:`alignment_loss`.
        level_reduction: ``"sum"`` or ``"mean"`` over the alignment levels.
        warmup_epochs: epochs over which the alignment weight ramps up from 0 (0: full weight from the start).
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_bce: float = 1.0,
        lambda_align: float = 0.5,
        lambda_map: float = 0.1,
        level_weights: Mapping[int, float] | None = None,
        temperature: float = 0.07,
        target_sensitive: bool = True,
        level_reduction: str = "sum",
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        if level_reduction not in LEVEL_REDUCTIONS:
            raise ValueError(f"level_reduction must be one of {LEVEL_REDUCTIONS}, got {level_reduction!r}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.segmentation = DiceBCELoss(lambda_dice, lambda_bce)
        self.lambda_align, self.lambda_map = float(lambda_align), float(lambda_map)
        self.level_weights = {int(k): float(v) for k, v in (level_weights or {}).items()}
        self.temperature = temperature
        self.target_sensitive = target_sensitive
        self.level_reduction = level_reduction
        self.warmup_epochs = float(warmup_epochs)
        self.progress = 0.0

    def set_progress(self, epochs: float) -> None:
        """Training progress in epochs (fractional), from which the alignment warm-up is computed."""
        self.progress = float(epochs)

    @property
    def align_weight(self) -> float:
        """w(t) · λ_align, the alignment term's weight now."""
        ramp = 1.0 if self.warmup_epochs == 0 else min(1.0, self.progress / self.warmup_epochs)
        return self.lambda_align * ramp

    def forward(self, pred: torch.Tensor | Mapping, target: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = self.segmentation(pred, target)
        if not isinstance(pred, Mapping):
            return terms
        target = target.to(pred["pred"].dtype)
        align = pred["pred"].new_zeros(())
        banks = pred.get("align_bank") or [None] * len(pred["align_strides"])
        for stride, image, text, bank in zip(pred["align_strides"], pred["align_image"], pred["align_text"], banks):
            i2t, t2i = alignment_loss(
                image, text, target, pred["text_group"], pred["text_present"], self.temperature, self.target_sensitive,
                bank, pred.get("bank_targets"),
            )
            level = (i2t + t2i) / 2
            terms[f"loss_align_s{stride}"] = level
            align = align + self.level_weights.get(int(stride), 1.0) * level
        maps = pred["pred"].new_zeros(())
        for logits in pred.get("target_maps", ()):
            resized = F.interpolate(target, size=logits.shape[-2:], mode="area")
            maps = maps + F.binary_cross_entropy_with_logits(logits, (resized > 0.5).to(logits.dtype))
        if pred["align_strides"]:
            if self.level_reduction == "mean":
                align = align / len(pred["align_strides"])
            terms["loss_align"] = align
        if pred.get("target_maps"):
            terms["loss_map"] = maps
        terms["loss"] = terms["loss"] + self.align_weight * align + self.lambda_map * maps
        return terms
