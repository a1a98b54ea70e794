"""What inference writes, chosen by config: the binary mask and the probability map in the input's format, an overlay
PNG for people who would rather look than read, and for DICOM inputs a DICOM Segmentation object (highdicom) that
references its source image, for a viewer or a PACS."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import textwrap
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, SaveImage, SaveImaged

from scripts.image_files import image_stem, is_raster
from scripts.io import atomic_write

__all__ = [
    "OUTPUT_FORMATS",
    "SEG_MANUFACTURER",
    "SaveOutputsd",
    "SaveMaskLikeInputd",
    "contour",
    "overlay_image",
    "dicom_segmentation",
    "dicom_sources",
]

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("mask", "probability", "overlay", "dicom_seg")
_BUNDLE_ROOT = Path(__file__).resolve().parents[1]


# the Manufacturer of every SEG this bundle writes: how a PACS round trip recognises its own segmentations
SEG_MANUFACTURER = "Language-guided segmentation bundle"


def _bundle_version() -> str:
    try:
        return str(json.loads((_BUNDLE_ROOT / "configs" / "metadata.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "unknown"


def contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary of a binary mask: its pixels within ``width`` pixels (4-neighbourhood) of the background.

    Not ``monai.transforms.LabelToContour``: that gives a one-pixel Laplacian edge with no width, and a one-pixel
    line vanishes on an overlay of a large radiograph; the overlay scales the width with the picture.

    Args:
        mask: H×W boolean.
        width: line width in pixels.

    Returns:
        H×W boolean.
    """
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def overlay_image(
    image: np.ndarray,
    mask: np.ndarray,
    caption: str | None = None,
    max_side: int = 1024,
    color: tuple[int, int, int] = (255, 90, 0),
    tint: float = 0.25,
):
    """An RGB picture of an image with the predicted lesion outlined (and lightly tinted), and the report underneath.

    Not ``monai.visualize.blend_images``: it colours the label through a matplotlib colour map and returns an array;
    this draws one fixed colour, a contour and the report as a caption band, with PIL, which writes the PNG anyway.

    Args:
        image: H×W (rows × columns) intensities scaled to [0, 1].
        mask: H×W boolean, same grid.
        caption: the report; None or empty prints "no report (image-only inference)".
        max_side: the picture is scaled down so its longer side is at most this many pixels (a 3000² radiograph
            overlay would be a 20 MB PNG), before the contour is drawn so the line stays visible.
        color: RGB of the contour and tint.
        tint: opacity of the colour inside the mask.

    Returns:
        ``PIL.Image.Image`` (RGB), the image on top and the wrapped caption in a band below it.
    """
    from PIL import Image, ImageDraw, ImageFont

    if image.shape != mask.shape:
        raise ValueError(f"overlay: image {image.shape} and mask {mask.shape} differ in size")
    gray = Image.fromarray((np.clip(np.nan_to_num(image), 0.0, 1.0) * 255).astype(np.uint8))
    region = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    scale = min(1.0, max_side / max(gray.size))
    if scale < 1.0:
        size = (max(1, round(gray.size[0] * scale)), max(1, round(gray.size[1] * scale)))
        gray, region = gray.resize(size, Image.BILINEAR), region.resize(size, Image.NEAREST)
    rgb = np.repeat(np.asarray(gray, dtype=np.float32)[..., None], 3, axis=-1)
    inside = np.asarray(region) > 0
    rgb[inside] = (1 - tint) * rgb[inside] + tint * np.asarray(color, dtype=np.float32)
    rgb[contour(inside, width=max(1, round(max(inside.shape) / 300)))] = color
    picture = Image.fromarray(rgb.astype(np.uint8))

    width = picture.size[0]
    font_size = max(10, width // 45)
    font = ImageFont.load_default(size=font_size)
    text = caption.strip() if caption and caption.strip() else "no report (image-only inference)"
    chars = max(20, int(width / (0.55 * font_size)))
    lines = textwrap.wrap(text, chars)[:8]
    band = Image.new("RGB", (width, (len(lines) + 1) * (font_size + 4)), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((font_size // 2, font_size // 2 + i * (font_size + 4)), line, fill=(255, 255, 255), font=font)
    out = Image.new("RGB", (width, picture.size[1] + band.size[1]))
    out.paste(picture, (0, 0))
    out.paste(band, (0, picture.size[1]))
    return out


def dicom_sources(filename: str | os.PathLike | Sequence, sop_instance_uids: Sequence[str]) -> list:
    """The source DICOM datasets of a prediction, in the order of ``sop_instance_uids``.

    Args:
        filename: what the image was loaded from: one file, a folder holding one series, or a list of its files
            (the other files of the folders of these are searched when the instances are not among them).
        sop_instance_uids: the SOPInstanceUIDs the prediction lies on (one for a radiograph or a single slice,
            the slab's slices for a series).

    Raises:
        ValueError: naming the input, when one of the instances is not among its files.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    names = [str(f) for f in filename] if isinstance(filename, (list, tuple)) else [str(filename)]
    if len(names) == 1 and os.path.isdir(names[0]):
        names = sorted(str(p) for p in Path(names[0]).iterdir() if p.is_file())
    wanted, found = set(sop_instance_uids), {}

    def search(paths: Sequence[str]) -> None:
        for name in paths:
            try:
                ds = pydicom.dcmread(name, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, EOFError):
                continue
            if str(ds.get("SOPInstanceUID", "")) in wanted:
                found[str(ds.SOPInstanceUID)] = ds

    search(names)
    if len(found) < len(wanted):
        # MONAI keeps only the first file name of a series given as a list: look beside it
        siblings = {str(p) for n in names for p in Path(n).parent.iterdir() if p.is_file()} - set(names)
        search(sorted(siblings))
    missing = [uid for uid in sop_instance_uids if uid not in found]
    if missing:
        raise ValueError(f"{names[0]}: source instance(s) {', '.join(missing)} not found among the input's files")
    return [found[uid] for uid in sop_instance_uids]


def dicom_segmentation(
    sources: Sequence,
    mask: np.ndarray,
    segment_label: str = "lesion",
    algorithm_name: str = "TMCA",
    algorithm_version: str | None = None,
    series_number: int = 900,
    series_description: str = "Language-guided lesion segmentation",
    report: str | None = None,
):
    """A binary DICOM Segmentation of one segment that references its source images (patient, study, frame of
    reference and the source instances come from them; the SEG is a new series of the same study).

    The report that guided it is recorded as the SEG's ContentDescription (``report: <text>``, or ``no report:
    image-only path``); the attribute holds 64 characters, so a longer report is cut there, ending in "...".
    Projection images (no Image Orientation (Patient), e.g. DX/CR) get the source's PatientOrientation (type 2C).

    Args:
        sources: the source pydicom datasets (a radiograph, or the slices a slab prediction lies on).
        mask: rows×columns boolean (the same mask is written on every source slice) or F×rows×columns, one frame
            per source.
        segment_label: the segment's label.
        algorithm_name, algorithm_version: recorded as the segment's algorithm (automatic, artificial
            intelligence); the version defaults to the bundle's.
        series_number: SeriesNumber of the new series.
        series_description: SeriesDescription of the new series.
        report: the report text the network was given; None or empty: none.

    Returns:
        ``highdicom.seg.Segmentation`` (a pydicom ``Dataset``; ``.save_as(path)`` writes it). Empty frames are
        kept, so "no lesion found" is an explicit, valid object.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames = np.asarray(mask, dtype=bool)
    if frames.ndim == 2:
        frames = np.repeat(frames[None], len(sources), axis=0)
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if frames.shape != (len(sources), rows, cols):
        raise ValueError(
            f"DICOM SEG: mask {frames.shape} does not match {len(sources)} source image(s) of {rows}×{cols} "
            f"({getattr(sources[0], 'filename', '')})"
        )
    sources = [_prepared_source(ds) for ds in sources]
    version = algorithm_version or _bundle_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=version, family=codes.cid7162.ArtificialIntelligence
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=frames if len(sources) > 1 else frames[0],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=SEG_MANUFACTURER,
        manufacturer_model_name=algorithm_name,
        software_versions=version,
        device_serial_number="none",
        series_description=series_description,
        content_description=_content_description(report),
        content_label="LESION",
        omit_empty_frames=False,
    )
    if "ImageOrientationPatient" not in sources[0]:
        seg.PatientOrientation = sources[0].get("PatientOrientation", "")  # type 2C: present, may be empty
    return seg


def _content_description(report: str | None) -> str:
    """ContentDescription (VR LO: 64 characters, no backslash or control characters) naming the guiding report."""
    text = " ".join(str(report or "").replace("\\", "/").split())
    if not text:
        return "no report: image-only path"
    text = f"report: {text}"
    return text if len(text) <= 64 else text[:61].rstrip() + "..."


class SaveMaskLikeInputd(MapTransform):
    """Save a predicted mask (or probability map) in the format of its input image: PNG for raster inputs
    (PNG/JPEG/BMP/TIFF), NIfTI otherwise.

    PNG masks are written as 8-bit 0/255 images, PNG probability maps as 8-bit probability × 255; NIfTI outputs keep
    the input's affine (masks uint8, probability maps float32). ``pred`` should already be in the input's geometry
    (``Invertd`` before this transform). :meth:`write` saves one key and returns the path it wrote.

    Args:
        keys: prediction key(s), each C×X×Y in MONAI's array convention.
        output_dir: destination folder.
        output_postfix: appended to the name.
        ref_key: key of the input image whose file name decides the format.
        id_key: key of the entry's id; when an entry has one, the output is named ``<id>_<postfix>`` (a DICOM series'
            files have meaningless names, its id is the SeriesInstanceUID), else after the input file.
        probability: write a probability map (values in [0, 1]) rather than a binary mask.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        output_postfix: str = "seg",
        ref_key: str = "image",
        id_key: str | None = "id",
        probability: bool = False,
    ) -> None:
        super().__init__(keys)
        self.ref_key, self.id_key = ref_key, id_key
        self.output_dir, self.output_postfix = Path(output_dir), output_postfix
        common = {"output_dir": str(output_dir), "output_postfix": output_postfix, "separate_folder": False,
                  "print_log": False}
        self.png = SaveImage(output_ext=".png", output_dtype=np.uint8, scale=255, resample=False, **common)
        nifti_dtype = np.float32 if probability else np.uint8
        self.nifti = SaveImage(output_ext=".nii.gz", output_dtype=nifti_dtype, resample=False, **common)

    def stem(self, data: Mapping[Hashable, Any]) -> str:
        """The name a sample's outputs share, before ``_<postfix>`` and the extension: its id (made safe for a file
        name) when it has one, else the input's file name without its image suffix."""
        if self.id_key is not None and data.get(self.id_key):
            return re.sub(r"[^\w.-]", "_", str(data[self.id_key]))
        return image_stem(_source_file(data.get(self.ref_key)))

    def write(self, data: Mapping[Hashable, Any], key: Hashable) -> str:
        """Writes ``data[key]`` in the format of the sample's input; returns the path of the file written."""
        is_png = is_raster(_source_file(data.get(self.ref_key)))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        name = str(self.output_dir / f"{self.stem(data)}_{self.output_postfix}")
        (self.png if is_png else self.nifti)(data[key], filename=name)
        return name + (".png" if is_png else ".nii.gz")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.write(d, key)
        return d


# A SaveImaged on purpose: MONAI Label drops SaveImaged from a bundle's postprocessing (it returns the result itself),
# so a MONAI Label server does not also write these files; `monai.bundle run inference` and `infer-pacs` keep it.
class SaveOutputsd(SaveImaged):
    """Writes the outputs named in ``formats`` for one (decollated) sample, after ``Invertd`` has put the prediction
    back on the input's grid.

    Formats (``OUTPUT_FORMATS``):

    - ``mask``: the binary mask in the input's format (PNG 0/255 for PNG/JPEG inputs, else NIfTI with the input's
      affine), ``<name>_seg.png|.nii.gz``.
    - ``probability``: the sigmoid probability, ``<name>_prob.png`` (8 bit, probability × 255) or ``.nii.gz``
      (float32).
    - ``overlay``: ``<name>_overlay.png``, the input with the mask contour and the report as a caption.
    - ``dicom_seg``: for DICOM inputs, ``<name>_seg.dcm``, a DICOM Segmentation referencing the source image (or the
      slab's slices for a series); other inputs are left out of this format, with a debug log line.

    ``<name>`` is the sample's id when it has one (a DICOM series: its SeriesInstanceUID), else the input's file
    stem. The written paths are added to the sample as ``output_files`` (format → path).

    Args:
        keys: the binary prediction key, C×X×Y (C = 1), in MONAI's array convention (first axis = image column).
        output_dir: destination folder.
        formats: a subset of ``OUTPUT_FORMATS``.
        prob_key: the probability map's key (same grid as the prediction).
        image_key: the network input, whose meta data name the source file and carry the DICOM UIDs.
        display_key: the image before resizing, [0, 1], C×X×Y, drawn in the overlay (falls back to ``image_key``).
        report_key: the report text the network read, the overlay's caption. Where ``<report_key>_as_written``
            holds another text (the report as found, before ``ReportToTemplated`` wrote it in the training
            template), the caption shows that one and then what it was read as, and the DICOM SEG records it.
        id_key: the sample's id key.
        segment_label: the label of the lesion in DICOM SEG objects.
        algorithm_name: the algorithm named in DICOM SEG objects (a dotted class path keeps its last part).
        overlay_max_side: longest side of overlay PNGs, pixels.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = "./eval",
        formats: Sequence[str] = ("mask",),
        prob_key: str = "prob",
        image_key: str = "image",
        display_key: str = "image_display",
        report_key: str = "report",
        id_key: str = "id",
        segment_label: str = "lesion",
        algorithm_name: str = "TMCA",
        overlay_max_side: int = 1024,
    ) -> None:
        MapTransform.__init__(self, keys)  # SaveImaged's own writer set-up is not used
        unknown = set(formats) - set(OUTPUT_FORMATS)
        if unknown:
            raise ValueError(f"unknown output format(s) {sorted(unknown)}; choose from {list(OUTPUT_FORMATS)}")
        self.formats = tuple(formats)
        self.output_dir = Path(output_dir)
        self.prob_key, self.image_key, self.display_key = prob_key, image_key, display_key
        self.report_key, self.id_key = report_key, id_key
        self.segment_label, self.algorithm_name = segment_label, str(algorithm_name).rsplit(".", 1)[-1]
        self.overlay_max_side = overlay_max_side
        self.save_mask = SaveMaskLikeInputd(keys, output_dir, "seg", ref_key=image_key, id_key=id_key)
        self.save_prob = SaveMaskLikeInputd(
            prob_key, output_dir, "prob", ref_key=image_key, id_key=id_key, probability=True
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        files: dict[str, str] = dict(d.get("output_files") or {})
        for key in self.key_iterator(d):
            name = self.save_mask.stem(d)
            if "mask" in self.formats:
                files["mask"] = self.save_mask.write(d, key)
            if "probability" in self.formats:
                if self.prob_key not in d:
                    raise KeyError(f"probability output asked for, but the sample has no '{self.prob_key}' key")
                files["probability"] = self.save_prob.write(d, self.prob_key)
            mask = _to_numpy(d[key])[0] > 0.5  # X×Y
            if "overlay" in self.formats:
                files["overlay"] = self._overlay(d, mask, name)
            if "dicom_seg" in self.formats:
                path = self._dicom_seg(d, mask, name)
                if path:
                    files["dicom_seg"] = path
        d["output_files"] = files
        return d

    def _reports(self, d: Mapping[Hashable, Any]) -> tuple[str | None, str | None]:
        """The report as the network read it, and as found (None where the sample has no such text)."""
        read, written = d.get(self.report_key), d.get(f"{self.report_key}_as_written")
        return (read if isinstance(read, str) else None), (written if isinstance(written, str) else None)

    def _overlay(self, d: Mapping[Hashable, Any], mask: np.ndarray, name: str) -> str:
        shown = d.get(self.display_key, d[self.image_key])
        image = _to_numpy(shown)
        if image.ndim != 3:
            raise ValueError(f"overlay: expected a C×X×Y image, got shape {image.shape} for {name}")
        image = image.mean(axis=0) if image.shape[0] > 1 else image[0]
        if image.shape != mask.shape:
            raise ValueError(f"overlay of {name}: display image {image.shape} and mask {mask.shape} differ; "
                             f"'{self.display_key}' must be the image before resizing")
        read, written = self._reports(d)
        caption = f"{written} [read as: {read or 'no report'}]" if written and written != read else read
        picture = overlay_image(image.T, mask.T, caption, self.overlay_max_side)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"{name}_overlay.png"
        atomic_write(path, lambda f: picture.save(f, format="PNG"))
        return str(path)

    def _dicom_seg(self, d: Mapping[Hashable, Any], mask: np.ndarray, name: str) -> str | None:
        meta = getattr(d[self.image_key], "meta", {})
        uids = str(_first(meta.get("SourceSOPInstanceUIDs", meta.get("SOPInstanceUID", ""))) or "")
        if not uids:
            logger.debug("%s: not a DICOM input; no DICOM SEG written", name)
            return None
        sources = dicom_sources(_source_of(d[self.image_key]), uids.split("\\"))
        read, written = self._reports(d)
        seg = dicom_segmentation(sources, mask.T, self.segment_label, self.algorithm_name, report=written or read)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"{name}_seg.dcm"
        atomic_write(path, seg.save_as)
        return str(path)


# Type 2 attributes (present, may be empty) that highdicom copies from the source into the SEG; anonymised exports and
# test images often drop them altogether
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "AccessionNumber", "StudyID")


def _prepared_source(ds: Any) -> Any:
    """A copy of a source header that highdicom accepts and copies faithfully: missing type 2 attributes added empty,
    and a zero PixelSpacing (seen on real films, e.g. pydicom-data's RG1_UNCR.dcm) dropped, since highdicom would
    copy it into a Pixel Measures Sequence that no reader accepts."""
    missing = [name for name in _TYPE2 if name not in ds]
    spacing = ds.get("PixelSpacing")
    bad_spacing = spacing is not None and not (len(spacing) == 2 and all(float(v) > 0 for v in spacing))
    if not missing and not bad_spacing:
        return ds
    name = getattr(ds, "filename", "source")
    ds = copy.deepcopy(ds)
    if missing:
        logger.debug("%s: no %s; written empty in the SEG", name, ", ".join(missing))
        for attribute in missing:
            setattr(ds, attribute, "")
    if bad_spacing:
        logger.warning("%s: PixelSpacing %s is not usable; the SEG carries no pixel spacing", name, list(spacing))
        del ds.PixelSpacing
    return ds


def _first(value: Any) -> Any:
    """A collated-then-decollated meta value may come back as a one-element list."""
    while isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return value


def _source_of(image: Any) -> Any:
    source = getattr(image, "meta", {}).get("filename_or_obj", "")
    if isinstance(source, (list, tuple)) and len(source) == 1:
        return source[0]
    return source


def _source_file(image: Any) -> str:
    """The file an image was loaded from; the first one of a series given as a list of files."""
    source = _source_of(image)
    return str(source[0] if isinstance(source, (list, tuple)) and source else source)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)
