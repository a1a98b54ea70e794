"""The bundle's transforms, one module per job; the configs name them as ``scripts.transforms.<Name>``.

- ``report``: report text → tokens, rewriting into the training template, report dropout, clinical rephrasing, the
  side-aware flip.
- ``geometry``: the image's channel count, a 2D slice or slab from a volume.
- ``zones``: the raster of the lung zones a report names.
- ``checks``: input checks that name the file (non-finite pixels, images too small to segment).

Writing outputs is not here: ``scripts.outputs``.
"""

from scripts.transforms.checks import CheckFinite, CheckFinited, CheckMinSized, CheckSameSized
from scripts.transforms.geometry import SelectSlab, SelectSlabd, ToChannels, ToChannelsd
from scripts.transforms.report import (
    RandDropReportd,
    RandRephraseReportd,
    RandSideFlipd,
    ReportToTemplate,
    ReportToTemplated,
    TokenizeReport,
    TokenizeReportd,
    swap_sides,
)
from scripts.transforms.zones import ReportZonesd

__all__ = [
    "TokenizeReport",
    "TokenizeReportd",
    "ReportToTemplate",
    "ReportToTemplated",
    "RandDropReportd",
    "RandSideFlipd",
    "RandRephraseReportd",
    "swap_sides",
    "ReportZonesd",
    "ToChannels",
    "ToChannelsd",
    "SelectSlab",
    "SelectSlabd",
    "CheckFinite",
    "CheckFinited",
    "CheckMinSized",
    "CheckSameSized",
]
