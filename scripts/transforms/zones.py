"""The lung-zone raster of a report, on the image's grid (the report-consistency metrics read it)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.zones import CXR_LEVEL_EDGES, report_zones, zone_map

__all__ = ["ReportZonesd"]


class ReportZonesd(MapTransform):
    """Raster of the lung zones a report names (``scripts.zones``), on the grid of the reference image.

    Writes ``output_key``: a 1×X×Y uint8 tensor, 1 + side·3 + level inside each named zone, 0 elsewhere; all 0 when
    the report is missing or names no location. Place it after the spatial transforms of the reference image.

    Args:
        keys: the report text key.
        ref_key: the image whose spatial shape (C×X×Y) the raster takes.
        output_key: where the raster goes.
        left_is_image_left: "left" in the report is the image's left half (QaTa-COV19); False for the
            radiological convention.
        level_edges: where the upper and lower zones end, as fractions of the image height (default: the lung
            fields of a frontal chest film, ``scripts.zones.CXR_LEVEL_EDGES``).
    """

    def __init__(
        self,
        keys: KeysCollection = "report",
        ref_key: str = "image",
        output_key: str = "zones",
        left_is_image_left: bool = True,
        level_edges: Sequence[float] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.ref_key, self.output_key, self.left_is_image_left = ref_key, output_key, left_is_image_left
        self.level_edges = tuple(level_edges) if level_edges is not None else CXR_LEVEL_EDGES

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        texts = [d.get(key) for key in self.keys]
        text = " . ".join(t for t in texts if isinstance(t, str) and t)
        shape = tuple(d[self.ref_key].shape[1:])
        if len(shape) != 2:
            raise ValueError(f"ReportZonesd needs a 2D image (C×X×Y); got spatial shape {shape}")
        raster = zone_map(report_zones(text), shape, self.left_is_image_left, self.level_edges)  # type: ignore[arg-type]
        d[self.output_key] = torch.as_tensor(raster.astype(np.uint8))[None]  # uint8: cached per sample
        return d
