"""Losses of the bundle's networks; each returns ``{"loss": total, "loss_<term>": ...}`` so every term is logged."""

from scripts.losses.segmentation import DiceBCELoss
from scripts.losses.tmca import TMCALoss, alignment_loss

__all__ = ["DiceBCELoss", "TMCALoss", "alignment_loss"]
