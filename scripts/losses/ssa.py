"""SSA's losses: an OT-distance contrastive alignment over the batch and a penalty on mass outside the named zones."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from scripts.losses.contrastive import graph_zero, symmetric_batch_nce
from scripts.losses.segmentation import DiceBCELoss
from scripts.networks.transport import cosine_cost, sinkhorn, transport_cost

__all__ = ["SSALoss", "ot_alignment_loss", "outside_zones_loss"]


def ot_alignment_loss(
    visual: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    group: torch.Tensor,
    present: torch.Tensor,
    epsilon: float = 0.05,
    temperature: float = 0.07,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric contrastive loss on the optimal-transport distance between every image and every report.

    ``W[i, j] = ⟨P*, C⟩`` with ``C = 1 − cos`` between image i's visual tokens and report j's real tokens and
    ``P*`` their entropic OT plan (ε as in the network). Logits ``−W / τ``; InfoNCE image → report over the batch's
    reports and report → image over the batch's images. Samples with the same report are positives of each other,
    never negatives; samples without a report take no part.

    ``P*`` is solved without gradient: by the envelope theorem the gradient of the entropic OT value with respect to
    the cost is ``P*`` itself, which is what ``⟨P*, C⟩`` with a constant ``P*`` gives, at the memory of one B²×N×L
    cost instead of the unrolled Sinkhorn iterations of B² problems.

    Args:
        visual: B×N×d visual cost embeddings.
        text: B×L×d report token cost embeddings.
        text_mask: B×L bool, True for real tokens.
        group: B long, equal for equal reports.
        present: B bool, False where the report is missing.
        epsilon, max_iter, tol: Sinkhorn settings.
        temperature: τ of the logits (W ∈ [0, 2]).

    Returns:
        ``(image_to_text, text_to_image)``, zero (in the inputs' graph) when no sample has a report.
    """
    # every image against every report of the batch, report-free samples included and masked out of the
    # contrast (symmetric_batch_nce): selecting the present ones would wait for the device at every step
    b = visual.shape[0]
    m = text_mask.bool()
    cost = cosine_cost(visual[:, None], text[None])  # B×B×N×L: image i against report j
    flat = cost.reshape(b * b, *cost.shape[2:])
    mask_y = m[None].expand(b, -1, -1).reshape(b * b, -1)
    with torch.no_grad():
        plan = sinkhorn(flat, None, mask_y, epsilon, max_iter, tol)  # a report-free column: an all-zero plan
    distance = transport_cost(plan, flat.masked_fill(~mask_y[:, None, :], 0.0)).reshape(b, b)
    return symmetric_batch_nce(-distance / temperature, group, present.bool())


def outside_zones_loss(logits: torch.Tensor, guidance: torch.Tensor, guided: torch.Tensor) -> torch.Tensor:
    """Share of predicted probability outside the zones the report names: mean over guided samples of
    ``Σ p·(1 − G) / Σ p`` with ``p = sigmoid(logits)``; zero when no sample is guided.

    Args:
        logits: B×1×H×W.
        guidance: B×1×H×W, 1 inside the named zones, 0 outside.
        guided: B bool, samples whose report names zones.
    """
    p = torch.sigmoid(logits.float())
    outside = (p * (1 - guidance.to(p.dtype))).sum(dim=(1, 2, 3)) / p.sum(dim=(1, 2, 3)).clamp_min(1e-6)
    weight = guided.to(p.dtype)  # a weighted mean rather than logits[guided]: no host sync
    return (outside * weight).sum() / weight.sum().clamp_min(1.0)


class SSALoss(nn.Module):
    """Dice + BCE + λ_ot · OT contrastive alignment + λ_outside · mass outside the named zones, each by name.

    Reads the training output of :class:`scripts.networks.ssa.SSA`; a plain logit tensor gives Dice + BCE only.
    With a dict, ``loss_ot`` (mean of ``loss_ot_i2t`` and ``loss_ot_t2i``, see :func:`ot_alignment_loss`) and
    ``loss_outside`` (:func:`outside_zones_loss`) are always returned, zero when the batch has no report or no
    named zone.

    Args:
        lambda_dice, lambda_bce: weights of the segmentation terms.
        lambda_ot: weight of the OT alignment term.
        lambda_outside: weight of the outside-zones penalty.
        temperature: τ of the OT contrastive logits.
        ot_max_iter, ot_tol: Sinkhorn settings of the batch-wide transport (ε comes from the network's output).
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_bce: float = 1.0,
        lambda_ot: float = 0.5,
        lambda_outside: float = 0.2,
        temperature: float = 0.07,
        ot_max_iter: int = 100,
        ot_tol: float = 1e-4,
    ) -> None:
        super().__init__()
        self.segmentation = DiceBCELoss(lambda_dice, lambda_bce)
        self.lambda_ot, self.lambda_outside = float(lambda_ot), float(lambda_outside)
        self.temperature, self.ot_max_iter, self.ot_tol = float(temperature), int(ot_max_iter), float(ot_tol)

    def forward(self, pred: torch.Tensor | Mapping, target: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = self.segmentation(pred, target)
        if not isinstance(pred, Mapping):
            return terms
        logits = pred["pred"]
        zero = graph_zero(logits)
        if "ot_visual" in pred:
            i2t, t2i = ot_alignment_loss(
                pred["ot_visual"],
                pred["ot_text"],
                pred["ot_text_mask"],
                pred["text_group"],
                pred["text_present"],
                pred.get("ot_epsilon", 0.05),
                self.temperature,
                self.ot_max_iter,
                self.ot_tol,
            )
        else:
            i2t = t2i = zero
        terms["loss_ot_i2t"], terms["loss_ot_t2i"] = i2t, t2i
        terms["loss_ot"] = (i2t + t2i) / 2
        outside = outside_zones_loss(logits, pred["guidance"], pred["guided"]) if "guidance" in pred else zero
        terms["loss_outside"] = outside
        terms["loss"] = terms["loss"] + self.lambda_ot * terms["loss_ot"] + self.lambda_outside * terms["loss_outside"]
        return terms
