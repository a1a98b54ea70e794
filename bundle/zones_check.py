"""How well the report zone grid fits a data set: report consistency of its ground-truth masks.

``python -m bundle zones-check --datalist DATALIST [--split validation]`` prints, for the ground-truth masks, the
two report-consistency figures the evaluate workflow reports for predictions (``val_outside_named``,
``val_missed_zones``): the floor a perfect segmentation would score with the configured zone grid.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["ground_truth_consistency"]


def ground_truth_consistency(
    datalist: str | Path, split: str = "validation", left_is_image_left: bool = True,
    level_edges: tuple[float, float] | None = None,
) -> dict:
    """Report consistency of the masks of ``split``; mean and median over the images where it is defined."""
    from monai.data import load_decathlon_datalist
    from monai.transforms import EnsureChannelFirst, LoadImage

    from scripts.metrics import report_consistency
    from scripts.zones import CXR_LEVEL_EDGES, report_zones, zone_map

    load = LoadImage(image_only=True)
    channel = EnsureChannelFirst()
    outside, missed, unlocated = [], [], 0
    for item in load_decathlon_datalist(str(datalist), True, split):
        zones = report_zones(item.get("report"))
        if zones is None:
            unlocated += 1
            continue
        mask = channel(load(item["label"]))[:1] > 0
        raster = zone_map(zones, tuple(mask.shape[1:]), left_is_image_left, level_edges or CXR_LEVEL_EDGES)
        o, m = report_consistency(mask[None], torch.as_tensor(raster)[None, None])
        outside.append(o.item())
        missed.append(m.item())

    def stats(values: list[float]) -> dict:
        v = np.array([x for x in values if not math.isnan(x)])
        return {"mean": float(v.mean()) if v.size else math.nan, "median": float(np.median(v)) if v.size else math.nan}

    return {"split": split, "images": len(outside), "no_location": unlocated,
            "outside_named": stats(outside), "missed_zones": stats(missed)}
