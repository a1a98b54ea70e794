"""RecLMIS's losses: segmentation, token-wise max-similarity contrast, and the two cross-modal reconstructions."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from scripts.losses.contrastive import symmetric_batch_nce
from scripts.losses.segmentation import DiceBCELoss
from scripts.networks.blocks import with_fallback_token

__all__ = ["RecLMISLoss", "token_contrastive_loss", "token_max_similarity"]


def token_max_similarity(
    image: torch.Tensor,
    text: torch.Tensor,
    text_valid: torch.Tensor,
    image_weight: torch.Tensor | None = None,
    text_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-wise max-similarity between every report and every image of a batch (FILIP-like).

    For report a and image b with token cosine similarities ``s[t, v]``: each report token takes its best image
    token, ``t2v = Σ_t w_text[a, t] · max_v s[t, v]``; each image token its best report token,
    ``v2t = Σ_v w_image[b, v] · max_t s[t, v]`` (padding tokens excluded); the score is ``(t2v + v2t) / 2``.

    Args:
        image: B×N×C image tokens.
        text: B×L×C report tokens.
        text_valid: B×L bool, True for real tokens; every row needs one.
        image_weight: B×N weights summing to 1 per row (None: uniform).
        text_weight: B×L weights summing to 1 over the valid tokens (None: uniform over the valid tokens).

    Returns:
        B×B scores in [-1, 1], rows reports, columns images.
    """
    valid = text_valid.bool()
    if image_weight is None:
        image_weight = torch.full(image.shape[:2], 1.0 / image.shape[1], dtype=image.dtype, device=image.device)
    if text_weight is None:
        text_weight = valid.to(text.dtype) / valid.sum(dim=1, keepdim=True).clamp_min(1)
    sim = torch.einsum("atc,bvc->abtv", F.normalize(text, dim=-1), F.normalize(image, dim=-1))
    t2v = torch.einsum("abt,at->ab", sim.amax(dim=3), text_weight * valid)
    best_word = sim.masked_fill(~valid[:, None, :, None], float("-inf")).amax(dim=2)
    v2t = torch.einsum("abv,bv->ab", best_word, image_weight)
    return (t2v + v2t) / 2


def token_contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    text_valid: torch.Tensor,
    group: torch.Tensor,
    present: torch.Tensor,
    image_weight: torch.Tensor | None = None,
    text_weight: torch.Tensor | None = None,
    temperature: float = 0.01,
) -> torch.Tensor:
    """Symmetric InfoNCE over the batch on :func:`token_max_similarity` scores.

    Samples with the same report (same ``group``) are positives of each other, never negatives (QaTa-COV19 repeats
    ~150 reports). Samples without a report take no part; with none the result is a zero still connected to the
    inputs' graph (DDP needs every parameter to get a gradient).

    Args:
        image, text, text_valid, image_weight, text_weight: see :func:`token_max_similarity`.
        group: B long, equal for equal reports.
        present: B bool, False where the report is missing.
        temperature: τ of the logits (the published code uses CLIP's frozen scale, 100, i.e. τ = 0.01).

    Returns:
        the mean of report → image and image → report losses (a scalar).
    """
    # every pair is scored and report-free samples are masked out of the contrast (symmetric_batch_nce) rather
    # than selected, which would wait for the device; their rows count every token as real so that the maxima
    # stay finite (their weight is 0, so no gradient is NaN), and with no report at all the result is a zero
    # still connected to every input
    scores = token_max_similarity(image, text, with_fallback_token(text_valid.bool()), image_weight, text_weight)
    to_image, to_report = symmetric_batch_nce(scores / temperature, group, present.bool())
    return (to_image + to_report) / 2


def _present_mean(per_sample: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean over the samples with a report; an all-absent batch gives a graph-connected zero."""
    weight = present.to(per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


class RecLMISLoss(nn.Module):
    """RecLMIS's loss: segmentation, token-wise contrast and the two reconstructions, every term by name.

    ``λ_seg · (λ_dice · Dice + λ_bce · BCE) + λ_con · contrastive + λ_img · MSE_image + λ_txt · MSE_text``.
    Defaults are the published weights: ``5 · (Dice + BCE) / 2 + 0.2 · contrastive + MSE_text + MSE_image``.
    Every term is returned by name (``loss_dice``, ``loss_bce``, ``loss_contrastive``, ``loss_rec_image``,
    ``loss_rec_text``, unweighted) with the weighted total under ``loss``. Reads the training output of
    :class:`scripts.networks.reclmis.RecLMIS`; a plain logit tensor gives the segmentation terms only.

    The reconstruction errors are mean squared errors over all tokens (image) and all real tokens (report) of
    each sample, averaged over the samples that have a report; samples without one take no part in the
    contrastive and reconstruction terms.

    Args:
        lambda_seg: weight of the segmentation loss (published 5).
        lambda_dice, lambda_bce: weights inside it (published 0.5 each).
        lambda_contrastive: weight of the token-wise contrastive loss (published 0.2).
        lambda_rec_image: weight of the image reconstruction (published 1).
        lambda_rec_text: weight of the report reconstruction (published 1).
        temperature: τ of the contrastive logits.
        importance_weighted: weight the token-wise maxima by the network's token importances (False: plain means).
    """

    def __init__(
        self,
        lambda_seg: float = 5.0,
        lambda_dice: float = 0.5,
        lambda_bce: float = 0.5,
        lambda_contrastive: float = 0.2,
        lambda_rec_image: float = 1.0,
        lambda_rec_text: float = 1.0,
        temperature: float = 0.01,
        importance_weighted: bool = True,
    ) -> None:
        super().__init__()
        self.segmentation = DiceBCELoss(lambda_dice, lambda_bce)
        self.lambda_seg = float(lambda_seg)
        self.lambda_contrastive = float(lambda_contrastive)
        self.lambda_rec_image, self.lambda_rec_text = float(lambda_rec_image), float(lambda_rec_text)
        self.temperature = float(temperature)
        self.importance_weighted = bool(importance_weighted)

    def forward(self, pred: torch.Tensor | Mapping, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            pred: B×1×H×W logits, or the training output mapping of ``RecLMIS``.
            target: B×1×H×W binary mask.

        Returns:
            ``{"loss": total, "loss_dice": ..., "loss_bce": ...}`` plus, for a mapping, ``loss_contrastive``,
            ``loss_rec_image`` and ``loss_rec_text``.
        """
        terms = self.segmentation(pred, target)
        terms["loss"] = self.lambda_seg * terms["loss"]
        if not isinstance(pred, Mapping):
            return terms
        present, valid = pred["text_present"], pred["text_valid"]
        weights = (pred["image_importance"], pred["text_importance"]) if self.importance_weighted else (None, None)
        terms["loss_contrastive"] = token_contrastive_loss(
            pred["image_tokens"], pred["text_tokens"], valid, pred["text_group"], present, *weights, self.temperature
        )
        image_err = (pred["rec_image"] - pred["rec_image_target"]).pow(2).mean(dim=(1, 2))
        terms["loss_rec_image"] = _present_mean(image_err, present)
        token_err = (pred["rec_text"] - pred["rec_text_target"]).pow(2).mean(dim=2) * valid
        text_err = token_err.sum(dim=1) / valid.sum(dim=1).clamp_min(1)
        terms["loss_rec_text"] = _present_mean(text_err, present)
        terms["loss"] = (
            terms["loss"]
            + self.lambda_contrastive * terms["loss_contrastive"]
            + self.lambda_rec_image * terms["loss_rec_image"]
            + self.lambda_rec_text * terms["loss_rec_text"]
        )
        return terms
