"""Contrastive pieces shared by the networks' losses: a multi-positive InfoNCE and a graph-keeping zero."""

from __future__ import annotations

import torch

__all__ = ["multi_positive_nce", "graph_zero"]


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
