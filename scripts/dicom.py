"""Reading DICOM images as the networks expect them: single-frame radiographs and slices, and slice series (CT/MR)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.data import ImageReader, PILReader
from monai.utils import ensure_tuple

from scripts.image_files import DICOM_SUFFIXES

__all__ = ["DicomImageReader", "RasterImageReader"]

logger = logging.getLogger(__name__)

_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class _DeferredError:
    """An error found in ``read()`` and raised from ``get_data()``: an exception in ``read()`` makes ``LoadImage``
    fall back to the other readers, which could silently pick or interleave series."""

    def __init__(self, error: ValueError) -> None:
        self.error = error


class DicomImageReader(ImageReader):
    """MONAI image reader for DICOM: one single-frame file (a DX/CR radiograph, one CT/MR slice) -> a 2D image;
    a series (a folder holding one series, or a list of its files) -> a 3D volume.

    What MONAI's ``PydicomReader`` leaves out for radiographs is done here, with pydicom's own functions:
    the modality LUT (RescaleSlope/Intercept), the VOI LUT or window of the file (``apply_voi_lut``), inversion of
    ``MONOCHROME1`` images so that dense tissue is bright, and the pixel spacing from ``PixelSpacing`` or, for
    projection radiographs, ``ImagerPixelSpacing``. Images without a window of their own are clipped to intensity
    percentiles instead, so a collimator edge or a burned-in marker does not set the intensity range.

    The array follows MONAI's reader convention (first axis = image column, x). A 2D image gets a diagonal affine
    from its pixel spacing (mm). A series is sorted by slice position along the slice normal (not by file name or
    InstanceNumber) and gets the patient-space affine in RAS, as MONAI's ``ITKReader`` gives it, so a 2D slice
    taken from it (``SelectSlabd``) and the masks written for it stay in place. The meta data keep the
    study/series/instance UIDs so results can be written back.

    Args:
        apply_window: apply the file's VOI LUT / window (True) or keep modality values such as CT Hounsfield units.
        percentiles: with ``apply_window``, the (low, high) intensity percentiles an image without a VOI LUT or
            window is clipped to; None keeps the full range.
    """

    def __init__(self, apply_window: bool = True, percentiles: tuple[float, float] | None = (0.5, 99.5)) -> None:
        super().__init__()
        self.apply_window = apply_window
        self.percentiles = percentiles

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        names = [str(n) for n in ensure_tuple(filename)]
        if len(names) == 1 and os.path.isdir(names[0]):
            return True
        return all(n.lower().endswith(DICOM_SUFFIXES) for n in names)

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs: Any) -> Any:
        import pydicom
        from pydicom.errors import InvalidDicomError

        paths = [str(p) for p in ensure_tuple(data)]
        if len(paths) == 1 and os.path.isdir(paths[0]):
            try:
                paths = self._series_files_of(paths[0])
            except ValueError as e:
                return _DeferredError(e)
        datasets = []
        for path in paths:
            try:
                ds = pydicom.dcmread(path, **kwargs)
            except (InvalidDicomError, OSError, ValueError, EOFError) as e:
                raise ValueError(f"{path}: unreadable or corrupt DICOM file ({e})") from e
            ds.filename = path
            datasets.append(ds)
        series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
        if len(series) > 1:
            return _DeferredError(
                ValueError(f"{paths[0]} and {len(paths) - 1} more: the files belong to {len(series)} DICOM series; "
                           "index them with `python -m bundle datalist pacs` and use one series per entry")
            )
        return datasets[0] if len(datasets) == 1 else datasets

    @staticmethod
    def _series_files_of(folder: str) -> list[str]:
        """The DICOM image files of a folder holding one series; a folder mixing series is an error naming it
        (MONAI's readers would silently interleave them or pick one)."""
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
                continue  # not DICOM: other files of an export (reports, indexes) may sit beside the images
            if "Rows" not in ds:  # structured reports, presentation states: no image
                continue
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path)
        if len(series) > 1:
            raise ValueError(
                f"{folder}: folder mixes {len(series)} DICOM series ({', '.join(sorted(series))}); "
                "index it with `python -m bundle datalist pacs` and use one series per entry"
            )
        if not series:
            raise ValueError(f"{folder}: no DICOM image files")
        return next(iter(series.values()))

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        if isinstance(img, _DeferredError):
            raise img.error
        if isinstance(img, list):
            return self._volume(img)
        values = self._modality_values(img)
        window = self._window_of(img, values)
        values = self._display(values, img, window)
        row_mm, col_mm = self._in_plane_spacing(img)
        affine = np.diag([col_mm, row_mm, 1.0, 1.0])
        meta = self._meta(img, values.T.shape, np.array([col_mm, row_mm]), affine)
        return np.ascontiguousarray(values.T), meta

    # -- pieces shared by images and series

    @staticmethod
    def _modality_values(ds: Any) -> np.ndarray:
        from pydicom.pixels import apply_modality_lut

        path = str(ds.filename)
        if "PixelData" not in ds:  # checked here, not in read(): LoadImage would fall back to another reader
            raise ValueError(f"{path}: DICOM file has no pixel data (SOP class {ds.get('SOPClassUID', '?')})")
        try:
            pixels = ds.pixel_array
        except Exception as e:  # pydicom raises several types for broken or unsupported pixel data
            raise ValueError(f"{path}: cannot decode the pixel data ({e})") from e
        if pixels.ndim != 2:
            raise ValueError(f"{path}: {pixels.shape} pixel array; only single-frame grayscale images are read here")
        return apply_modality_lut(pixels, ds).astype(np.float32)

    def _window_of(self, ds: Any, values: np.ndarray) -> tuple[float, float] | None:
        """Percentile clip range for an image without a window of its own; None where the file's window applies
        or no windowing is wanted."""
        if not self.apply_window or "WindowCenter" in ds or "VOILUTSequence" in ds or self.percentiles is None:
            return None
        low, high = np.percentile(values, self.percentiles)
        return float(low), float(high)

    def _display(self, values: np.ndarray, ds: Any, clip: tuple[float, float] | None) -> np.ndarray:
        """Window (the file's VOI, else the percentile clip), then the presentation LUT: inverted where
        PresentationLUTShape is INVERSE, or, without one, for MONOCHROME1 (highdicom's reading; IDENTITY keeps
        the values). ``ds`` gives the window and the shape.

        Not ``highdicom.Image.get_frame(apply_voi_transform=True, apply_presentation_lut=True)``, which applies
        the same rules frame by frame: a volume here gets one window for all its slices (the middle slice's), and
        without a window the values stay in modality units (HU for CT) for the percentile clip.
        """
        from pydicom.pixels import apply_voi_lut

        if self.apply_window and ("WindowCenter" in ds or "VOILUTSequence" in ds):
            values = apply_voi_lut(values, ds).astype(np.float32)
        elif clip is not None:
            values = np.clip(values, *clip)
        shape = str(ds.get("PresentationLUTShape", "")).upper()
        if shape == "INVERSE" or (shape != "IDENTITY" and str(ds.get("PhotometricInterpretation", "")).upper()
                                  == "MONOCHROME1"):
            values = values.max() + values.min() - values
        return values

    @staticmethod
    def _in_plane_spacing(ds: Any) -> tuple[float, float]:
        """(row, column) spacing in mm; a missing or zero spacing is logged and taken as 1 mm."""
        for tag in ("PixelSpacing", "ImagerPixelSpacing"):
            spacing = ds.get(tag)
            if spacing is not None and len(spacing) == 2 and all(float(s) > 0 for s in spacing):
                return float(spacing[0]), float(spacing[1])
        logger.warning("%s: no usable PixelSpacing or ImagerPixelSpacing; assuming 1 mm", ds.filename)
        return 1.0, 1.0

    @staticmethod
    def _meta(ds: Any, shape: tuple[int, ...], spacing: np.ndarray, affine: np.ndarray) -> dict:
        meta = {
            "spacing": spacing,
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": np.array(shape),
            "original_channel_dim": "no_channel",
            "Modality": str(ds.get("Modality", "")),
        }
        meta.update({uid: str(ds.get(uid, "")) for uid in _UIDS})
        return meta

    # -- series

    def _volume(self, datasets: list) -> tuple[np.ndarray, dict]:
        """Slices -> X×Y×Z volume (x = column, y = row, z = slice along the normal) with a RAS affine."""
        first = datasets[0]
        name = f"{os.path.dirname(str(first.filename))} ({len(datasets)} files of series {first.SeriesInstanceUID})"
        shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
        if len(shapes) > 1:
            raise ValueError(f"{name}: slices of different sizes {sorted(shapes)}")
        row_mm, col_mm = self._in_plane_spacing(first)
        if all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in datasets):
            orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
            if any(not np.allclose(np.asarray(ds.ImageOrientationPatient, float), orientation, atol=1e-4)
                   for ds in datasets):
                raise ValueError(f"{name}: slices with different ImageOrientationPatient (a localizer mixed in?)")
            row_dir, col_dir = orientation[:3], orientation[3:]
            normal = np.cross(row_dir, col_dir)
            positions = np.array([np.asarray(ds.ImagePositionPatient, float) for ds in datasets])
            order = np.argsort(positions @ normal, kind="stable")
            depth = (positions @ normal)[order]
            gaps = np.diff(depth)
            if np.any(gaps < 1e-3):
                raise ValueError(f"{name}: two slices at the same position (several acquisitions in one series?)")
            gap = float(np.median(gaps))
            if np.ptp(gaps) > 0.01 * gap + 1e-3:
                logger.warning("%s: uneven slice spacing %.3g-%.3g mm; using the median, %.3g mm",
                               name, gaps.min(), gaps.max(), gap)
            lps = np.eye(4)
            lps[:3, 0], lps[:3, 1], lps[:3, 2] = row_dir * col_mm, col_dir * row_mm, normal * gap
            lps[:3, 3] = positions[order[0]]
            affine = _LPS_TO_RAS @ lps
        else:
            logger.warning("%s: no ImagePositionPatient/ImageOrientationPatient; slices ordered by InstanceNumber",
                           name)
            order = np.argsort([int(ds.get("InstanceNumber", 0) or 0) for ds in datasets], kind="stable")
            gap = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
            affine = np.diag([col_mm, row_mm, gap, 1.0])
        slices = [datasets[i] for i in order]
        values = np.stack([self._modality_values(ds) for ds in slices])  # Z×rows×columns
        reference = slices[len(slices) // 2]  # one window for the whole volume: the middle slice's
        values = self._display(values, reference, self._window_of(reference, values))
        volume = np.ascontiguousarray(values.transpose(2, 1, 0))
        meta = self._meta(reference, volume.shape, np.array([col_mm, row_mm, gap]), affine)
        meta["SOPInstanceUIDs"] = [str(ds.get("SOPInstanceUID", "")) for ds in slices]
        return volume, meta


class RasterImageReader(PILReader):
    """MONAI's ``PILReader`` (PNG, JPEG, BMP, TIFF) that refuses DICOM files.

    A DICOM file's 128-byte preamble may hold a TIFF header (a "dual-personality" file; pydicom-data's
    ``RG1_UNCR.dcm`` is one), and PIL then reads the pixels as a TIFF: no rescale, no window, no MONOCHROME1
    inversion, no UIDs. ``LoadImage`` with a list of readers tries them in turn without looking at suffixes, so
    this reader steps aside and the DICOM reader gets the file.
    """

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs: Any) -> Any:
        from pydicom.misc import is_dicom

        for name in ensure_tuple(data):
            if isinstance(name, (str, os.PathLike)) and os.path.isfile(name) and is_dicom(name):
                raise ValueError(f"{name}: a DICOM file, left to the DICOM reader")
        return super().read(data, **kwargs)

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """PIL decodes lazily, here: a file cut off mid-transfer fails with a bare ``struct.error`` or
        ``OSError`` that names neither the file nor the problem."""
        try:
            return super().get_data(img)
        except Exception as e:
            names = [getattr(i, "filename", "") for i in ensure_tuple(img)]
            raise ValueError(f"{', '.join(n for n in names if n) or 'image'}: cannot decode the pixels, the file is "
                             f"truncated or corrupt ({type(e).__name__}: {e})") from None  # the cause, said here
