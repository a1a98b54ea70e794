"""Contrastive pieces shared by the networks' losses: a multi-positive InfoNCE and a graph-keeping zero."""

from __future__ import annotations

import torch

__all__ = ["graph_zero", "multi_positive_nce", "symmetric_batch_nce"]


def multi_positive_nce(
    logits: torch.Tensor, positives: torch.Tensor, row_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over rows of ``-log(Σ_pos exp(logit) / Σ_all exp(logit))``; every row needs one positive.

    Args:
        logits: R×K scores (``-inf`` for candidates a row must not see).
        positives: R×K bool, the positives of each row (samples with the same report are positives of each other).
        row_weight: R bool or float; the mean runs over the weighted rows only (0 when no row counts). Weighting
            rather than selecting rows keeps the loss free of host syncs.

    Returns:
        a scalar.
    """
    pos = logits.masked_fill(~positives, float("-inf")).logsumexp(dim=1)
    per_row = logits.logsumexp(dim=1) - pos
    if row_weight is None:
        return per_row.mean()
    w = row_weight.to(per_row.dtype)
    return (per_row * w).sum() / w.sum().clamp_min(1.0)


def symmetric_batch_nce(
    logits: torch.Tensor,
    group: torch.Tensor,
    valid: torch.Tensor,
    extra_column: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE over a batch in both directions, among the samples that take part (``valid``), with samples of the
    same report as positives of each other, never negatives.

    Every row is computed and the rows out of play are masked, rather than selected with ``valid.any()`` and
    boolean indexing: those wait for the device at every step. A row out of play keeps only its diagonal logit as
    both candidate and positive, so its loss is exactly 0 with zero gradient; other rows never see it.

    Args:
        logits: B×B scores, rows images, columns reports.
        group: B long, equal for equal reports.
        valid: B bool, the samples that take part.
        extra_column: B×1 extra negative of each report's row in the report → image direction (TMCA's background
            embedding of the report's own image), or None.

    Returns:
        ``(image_to_report, report_to_image)`` losses; zero when no sample takes part.
    """
    eye = torch.eye(len(valid), dtype=torch.bool, device=valid.device)
    pair = valid[:, None] & valid[None, :]
    alone = eye & ~valid[:, None]
    same = (group[:, None] == group[None, :]) & pair | alone
    logits = logits.masked_fill(~(pair | alone), float("-inf"))
    report_logits, report_pos = logits.T, same.T
    if extra_column is not None:
        report_logits = torch.cat([report_logits, extra_column.masked_fill(~valid[:, None], float("-inf"))], dim=1)
        report_pos = torch.cat([report_pos, torch.zeros_like(extra_column, dtype=torch.bool)], dim=1)
    return multi_positive_nce(logits, same, valid), multi_positive_nce(report_logits, report_pos, valid)


def graph_zero(*tensors: torch.Tensor | None) -> torch.Tensor:
    """A scalar 0 connected to the graph of every given tensor (None skipped).

    A loss term that is zero for a batch (no report, no named zone) must still reach the parameters that produced
    its inputs: DistributedDataParallel waits for a gradient of every parameter, and a term built from a constant
    would leave them without one.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        raise ValueError("graph_zero needs at least one tensor")
    return sum((t.sum() * 0.0 for t in present[1:]), present[0].sum() * 0.0)
