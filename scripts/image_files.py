"""Which files are images: the suffixes of the formats the configs' readers load, in one place for the datalist
builders (``bundle.datalist``), inference over a folder (``scripts.data``), the DICOM reader and the output writer.

The configs' ``LoadImaged`` tries ``RasterImageReader`` (PIL), ``DicomImageReader`` and ``NibabelReader`` in turn
whatever the suffix, so these lists decide which files are *looked for*; reading is up to the readers. Suffixes are
matched case-insensitively on the whole file name (``.nii.gz`` is one suffix).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "RASTER_SUFFIXES",
    "NIFTI_SUFFIXES",
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "is_image",
    "is_raster",
    "image_stem",
]

RASTER_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""PIL formats (``scripts.dicom.RasterImageReader``); masks predicted for them are written as PNG."""
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
"""Suffixed DICOM files; PACS exports often have none, and ``bundle.datalist``'s ``pacs`` layout reads every file."""
IMAGE_SUFFIXES: tuple[str, ...] = RASTER_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES


def is_image(path: str | os.PathLike) -> bool:
    """Whether the file name ends in one of :data:`IMAGE_SUFFIXES`."""
    return Path(path).name.lower().endswith(IMAGE_SUFFIXES)


def is_raster(path: str | os.PathLike) -> bool:
    """Whether the file name ends in one of :data:`RASTER_SUFFIXES`."""
    return Path(path).name.lower().endswith(RASTER_SUFFIXES)


def image_stem(path: str | os.PathLike) -> str:
    """The file name without its image suffix (``scan.nii.gz`` → ``scan``); a name without one is returned whole."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
