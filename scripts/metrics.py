"""Report-consistency metrics: does a predicted mask stay in the lung zones its report names, and cover them?"""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

__all__ = ["ReportConsistencyMetric", "report_consistency"]


def report_consistency(y_pred: torch.Tensor, zones: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image report consistency of binary predictions.

    Args:
        y_pred: B×1×X×Y binary prediction.
        zones: B×1×X×Y zone raster of each image's report (``ReportZonesd``: 1 + zone index where the report names
            the zone, 0 elsewhere).

    Returns:
        ``outside``: B, the fraction of predicted foreground pixels outside the named zones (NaN when nothing is
        predicted or the report names no zone); ``missed``: B, the fraction of named zones without a single
        predicted foreground pixel (NaN when the report names no zone).
    """
    if y_pred.shape != zones.shape:
        raise ValueError(f"prediction {tuple(y_pred.shape)} and zone raster {tuple(zones.shape)} differ in shape")
    pred = y_pred.bool().flatten(1)
    z = zones.to(pred.device).long().flatten(1)
    nan = torch.tensor(float("nan"), device=pred.device)
    named = z > 0
    has_zones = named.any(1)
    fg = pred.sum(1).float()
    outside = (pred & ~named).sum(1).float() / fg.clamp_min(1)
    outside = torch.where(has_zones & (fg > 0), outside, nan)
    one_hot = torch.nn.functional.one_hot(z, num_classes=7)[..., 1:].bool()  # B×N×6
    zone_named = one_hot.any(1)
    zone_hit = (one_hot & pred[..., None]).any(1)
    n_named = zone_named.sum(1).float()
    missed = (zone_named & ~zone_hit).sum(1).float() / n_named.clamp_min(1)
    missed = torch.where(has_zones, missed, nan)
    return outside, missed


class ReportConsistencyMetric(CumulativeIterationMetric):
    """MONAI metric of :func:`report_consistency`, mean over the images where it is defined (NaN where it is defined
    for none).

    Use it with ``IgniteMetricHandler`` and ``output_transform=from_engine(['pred', 'zones'])``.

    Args:
        kind: ``"outside"`` (predicted foreground outside the named zones) or ``"missed"`` (named zones left empty).
    """

    def __init__(self, kind: str = "outside", reduction: MetricReduction | str = MetricReduction.MEAN) -> None:
        super().__init__()
        if kind not in ("outside", "missed"):
            raise ValueError(f"kind must be 'outside' or 'missed', not {kind!r}")
        self.kind, self.reduction = kind, reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("ReportConsistencyMetric needs the zone raster as y")
        outside, missed = report_consistency(y_pred, y)
        return (outside if self.kind == "outside" else missed)[:, None]

    def aggregate(self, reduction: MetricReduction | str | None = None) -> torch.Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        # MONAI reduces an all-NaN buffer to 0, which would read as "perfectly consistent" where nothing could be
        # measured (no report names a zone: MONAI Label's report-less validation lists, say)
        return torch.where(not_nans > 0, f, torch.full_like(f, float("nan")))
