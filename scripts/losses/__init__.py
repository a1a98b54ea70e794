"""Losses of the bundle's networks; each returns ``{"loss": total, "loss_<term>": ...}`` so every term is logged."""

from scripts.losses.contrastive import graph_zero, multi_positive_nce
from scripts.losses.reclmis import RecLMISLoss
from scripts.losses.segmentation import DiceBCELoss
from scripts.losses.ssa import SSALoss
from scripts.losses.tmca import TMCALoss, alignment_loss

__all__ = ["DiceBCELoss", "TMCALoss", "SSALoss", "RecLMISLoss", "alignment_loss", "multi_positive_nce", "graph_zero"]
