"""Dice + BCE on one sigmoid channel, returned as named terms."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.losses import DiceLoss
from torch import nn

__all__ = ["DiceBCELoss"]


class DiceBCELoss(nn.Module):
    """Dice + binary cross-entropy on one sigmoid channel, returned as named terms.

    MONAI's ``DiceCELoss`` returns only the sum; the terms are computed separately here so that each reaches
    MLflow on its own (a published baseline silently trained on Dice alone because its BCE term was lost).

    Args:
        lambda_dice: weight of the soft Dice term.
        lambda_bce: weight of the BCE term.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 1.0) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.bce = nn.BCEWithLogitsLoss()
        self.lambda_dice, self.lambda_bce = float(lambda_dice), float(lambda_bce)

    def forward(self, pred: torch.Tensor | Mapping[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            pred: B×1×H×W logits, or a network's training output mapping with the logits under ``"pred"``.
            target: B×1×H×W binary mask.

        Returns:
            ``{"loss": total, "loss_dice": ..., "loss_bce": ...}`` (unweighted terms, weighted total).
        """
        logits = pred["pred"] if isinstance(pred, Mapping) else pred
        target = target.to(logits.dtype)
        dice, bce = self.dice(logits, target), self.bce(logits, target)
        return {"loss": self.lambda_dice * dice + self.lambda_bce * bce, "loss_dice": dice, "loss_bce": bce}
