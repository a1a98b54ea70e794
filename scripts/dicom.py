"""Reading single-frame DICOM images (DX/CR radiographs, one CT or MR slice) as the networks expect them."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.utils import ensure_tuple

__all__ = ["DicomImageReader"]

logger = logging.getLogger(__name__)

_DICOM_SUFFIXES = (".dcm", ".dicom")
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


class _FolderError:
    def __init__(self, error: ValueError) -> None:
        self.error = error


class DicomImageReader(ImageReader):
    """MONAI image reader for single-frame DICOM files, returning display-ready 2D arrays.

    What MONAI's ``PydicomReader`` leaves out for radiographs is done here, with pydicom's own functions:
    the modality LUT (RescaleSlope/Intercept), the VOI LUT or window of the file (``apply_voi_lut``), inversion of
    ``MONOCHROME1`` images so that dense tissue is bright, and the pixel spacing from ``PixelSpacing`` or, for
    projection radiographs, ``ImagerPixelSpacing``. The array follows MONAI's reader convention (first axis =
    image column, x), and the meta data keep the study/series/instance UIDs so results can be written back.

    Args:
        apply_window: apply the file's VOI LUT / window (True) or keep modality values such as CT Hounsfield units.
    """

    def __init__(self, apply_window: bool = True) -> None:
        super().__init__()
        self.apply_window = apply_window

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        names = ensure_tuple(filename)
        if len(names) != 1:
            return False
        name = str(names[0])
        return name.lower().endswith(_DICOM_SUFFIXES) or os.path.isdir(name)

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs: Any) -> Any:
        import pydicom
        from pydicom.errors import InvalidDicomError

        paths = ensure_tuple(data)
        if len(paths) != 1:
            raise ValueError(f"{paths[0]}: DicomImageReader reads one file; index a series by SeriesInstanceUID first")
        path = str(paths[0])
        if os.path.isdir(path):
            try:
                path = self._single_file_of(path)
            except ValueError as e:
                # raised from get_data: an error in read() makes LoadImage fall back to readers that would
                # silently pick or interleave series
                return _FolderError(e)
        try:
            ds = pydicom.dcmread(path, **kwargs)
        except (InvalidDicomError, OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path}: unreadable or corrupt DICOM file ({e})") from e
        ds.filename = path
        return ds

    @staticmethod
    def _single_file_of(folder: str) -> str:
        """The one DICOM image file of a folder; a folder mixing series, or holding a multi-slice series, is an
        error naming the folder (MONAI's readers would silently interleave or pick one series)."""
        import pydicom
        from pydicom.errors import InvalidDicomError

        series: dict[str, list[str]] = {}
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, EOFError):
                continue
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path)
        if len(series) > 1:
            raise ValueError(
                f"{folder}: folder mixes {len(series)} DICOM series ({', '.join(sorted(series))}); "
                "index it with `python -m bundle datalist pacs` and use one series per entry"
            )
        files = next(iter(series.values()), [])
        if len(files) != 1:
            raise ValueError(f"{folder}: {len(files)} DICOM image files; the 2D workflows read one image per entry")
        return files[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        if isinstance(img, _FolderError):
            raise img.error
        path = str(img.filename)
        if "PixelData" not in img:  # checked here, not in read(): LoadImage would fall back to another reader
            raise ValueError(f"{path}: DICOM file has no pixel data (SOP class {img.get('SOPClassUID', '?')})")
        try:
            pixels = img.pixel_array
        except Exception as e:  # pydicom raises several types for broken or unsupported pixel data
            raise ValueError(f"{path}: cannot decode the pixel data ({e})") from e
        if pixels.ndim != 2:
            raise ValueError(f"{path}: {pixels.shape} pixel array; only single-frame grayscale images are read here")
        values = apply_modality_lut(pixels, img).astype(np.float32)
        if self.apply_window and ("WindowCenter" in img or "VOILUTSequence" in img):
            values = apply_voi_lut(values, img).astype(np.float32)
        if str(img.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            values = values.max() + values.min() - values
        spacing = img.get("PixelSpacing") or img.get("ImagerPixelSpacing")
        if spacing is None:
            logger.warning("%s: no PixelSpacing or ImagerPixelSpacing; assuming 1 mm", path)
            spacing = (1.0, 1.0)
        row_mm, col_mm = (float(s) for s in spacing)
        affine = np.diag([col_mm, row_mm, 1.0, 1.0])
        meta = {
            "spacing": np.array([col_mm, row_mm]),
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": np.array(values.shape[::-1]),
            "original_channel_dim": "no_channel",
            "Modality": str(img.get("Modality", "")),
        }
        meta.update({uid: str(img.get(uid, "")) for uid in _UIDS})
        return np.ascontiguousarray(values.T), meta
