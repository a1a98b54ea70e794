"""Report and output transforms (array/dictionary pairs, as in MONAI)."""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.utils import ensure_tuple_rep
from monai.transforms import Flipd, MapTransform, RandomizableTransform, SaveImage, Transform

from scripts.text import resolve_text_encoder_dir

__all__ = [
    "TokenizeReport",
    "TokenizeReportd",
    "RandDropReportd",
    "RandSideFlipd",
    "swap_sides",
    "SaveMaskLikeInputd",
    "ReportZonesd",
    "ToChannels",
    "ToChannelsd",
    "SelectSlab",
    "SelectSlabd",
]

logger = logging.getLogger(__name__)


class TokenizeReport(Transform):
    """Report text → fixed-length token ids and attention mask, with the configured encoder's fast tokenizer.

    Each distinct text is tokenised once and cached: clinical reports repeat (QaTa-COV19 has ~150 distinct
    reports for 5,713 images). An empty report gives all-padding ids and an all-zero mask, which the networks
    read as "no report".

    Args:
        tokenizer_dir: local Hugging Face model directory; None uses the bundled MiniLM.
        max_length: tokens per report after padding/truncation (24, the setting of the published methods).
        lowercase: lower-case the text first (uncased tokenizers such as MiniLM's do it anyway).
        unicode_form: Unicode normalisation applied first (``"NFKC"`` folds full-width letters, ligatures and
            non-breaking spaces); None keeps the text as it is. Runs of white space always become one space.
    """

    def __init__(
        self,
        tokenizer_dir: str | os.PathLike | None = None,
        max_length: int = 24,
        lowercase: bool = False,
        unicode_form: str | None = "NFKC",
    ) -> None:
        self.tokenizer_dir = resolve_text_encoder_dir(tokenizer_dir)
        self.max_length = int(max_length)
        self.lowercase = lowercase
        self.unicode_form = unicode_form
        self._tokenizer = None  # loaded on first use, so the transform pickles cheaply into workers
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tok(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, use_fast=True)
        return self._tokenizer

    def normalise(self, text: str) -> str:
        """The text as it is tokenised: Unicode-normalised, white space collapsed, optionally lower-cased."""
        if self.unicode_form:
            text = unicodedata.normalize(self.unicode_form, text)
        text = " ".join(text.split())
        return text.lower() if self.lowercase else text

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(ids, mask)``, both int64 tensors of length ``max_length``."""
        text = self.normalise(text)
        if text not in self._cache:
            if text:
                enc = self._tok()(
                    text, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                ids, mask = enc["input_ids"][0], enc["attention_mask"][0]
            else:
                pad = self._tok().pad_token_id or 0
                ids = torch.full((self.max_length,), pad, dtype=torch.long)
                mask = torch.zeros(self.max_length, dtype=torch.long)
            self._cache[text] = (ids, mask)
        ids, mask = self._cache[text]
        return ids.clone(), mask.clone()


class TokenizeReportd(MapTransform):
    """Dictionary wrapper of :class:`TokenizeReport`: writes ``<key>_ids`` and ``<key>_mask``.

    Args:
        keys: the report text key(s), usually ``"report"``.
        tokenizer_dir, max_length, lowercase, unicode_form: see :class:`TokenizeReport`.
        allow_missing_report: when True, a missing, None or empty report becomes "no report" (inference,
            MONAI Label); when False it raises an error naming the sample's image (training and evaluation data
            must carry their reports).
        absent_report_image_only: when True (and ``allow_missing_report`` is False), a sample with no report key
            at all becomes "no report", an image-only sample, with a warning naming it (MONAI Label trains from
            image + label datalists). A report that is present but None or empty is still an error.
        ids_suffix, mask_suffix: suffixes of the output keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "report",
        tokenizer_dir: str | os.PathLike | None = None,
        max_length: int = 24,
        allow_missing_report: bool = False,
        ids_suffix: str = "_ids",
        mask_suffix: str = "_mask",
        lowercase: bool = False,
        unicode_form: str | None = "NFKC",
        absent_report_image_only: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.tokenize = TokenizeReport(tokenizer_dir, max_length, lowercase, unicode_form)
        self.allow_missing_report = allow_missing_report
        self.absent_report_image_only = absent_report_image_only
        self.ids_suffix, self.mask_suffix = ids_suffix, mask_suffix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            text = d.get(key)
            if key not in d and self.absent_report_image_only and not self.allow_missing_report:
                logger.warning("sample %s has no '%s' key: an image-only sample", _sample_name(d), key)
                text = ""
            elif text is None or (isinstance(text, str) and not text.strip()):
                if not self.allow_missing_report:
                    state = "missing" if text is None else "empty"
                    raise ValueError(f"report '{key}' is {state} for sample {_sample_name(d)}")
                text = ""
            if not isinstance(text, str):
                raise TypeError(f"report '{key}' of sample {_sample_name(d)} is {type(text).__name__}, not text")
            d[key] = text  # keep the key, so batches of reported and unreported samples collate
            d[f"{key}{self.ids_suffix}"], d[f"{key}{self.mask_suffix}"] = self.tokenize(text)
        return d


class RandDropReportd(RandomizableTransform, MapTransform):
    """Report dropout: with probability ``prob`` the sample becomes report-free (text ``""``, all-zero mask).

    Trains the networks' "no report" path, which image-only inference (MONAI Label, PACS exports without
    reports) relies on. Place it after :class:`TokenizeReportd` (whose output is cached) among the random
    transforms.

    Args:
        keys: the report text key(s) given to :class:`TokenizeReportd`.
        prob: probability of dropping the report of a sample.
        ids_suffix, mask_suffix: as in :class:`TokenizeReportd`.
        pad_id: token id written over the dropped ids.
    """

    def __init__(
        self,
        keys: KeysCollection = "report",
        prob: float = 0.1,
        ids_suffix: str = "_ids",
        mask_suffix: str = "_mask",
        pad_id: int = 0,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.ids_suffix, self.mask_suffix, self.pad_id = ids_suffix, mask_suffix, pad_id

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = ""
            d[f"{key}{self.ids_suffix}"] = torch.full_like(torch.as_tensor(d[f"{key}{self.ids_suffix}"]), self.pad_id)
            d[f"{key}{self.mask_suffix}"] = torch.zeros_like(torch.as_tensor(d[f"{key}{self.mask_suffix}"]))
        return d


_SIDES = {"left": "right", "right": "left", "lt": "rt", "rt": "lt", "leftward": "rightward", "rightward": "leftward"}
_SIDE_RE = re.compile(r"\b(" + "|".join(_SIDES) + r")\b", re.IGNORECASE)


def swap_sides(text: str) -> str:
    """``text`` with "left" and "right" (and "lt"/"rt", "leftward"/"rightward") exchanged, case kept."""

    def swap(m: re.Match) -> str:
        word, other = m.group(0), _SIDES[m.group(0).lower()]
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return _SIDE_RE.sub(swap, text)


class RandSideFlipd(RandomizableTransform, MapTransform):
    """Side-aware horizontal flip: flips image and mask left↔right and swaps the sides named in the report.

    A plain flip (as LViT and RecLMIS train with) turns "left lower lung" into a lie. The report is re-tokenised
    after the swap (the tokenizer caches each distinct text, so this is cheap).

    Args:
        keys: image and mask keys to flip.
        report_key: the report text key; its ``_ids``/``_mask`` tokens are rewritten.
        prob: flip probability.
        spatial_axis: the image's left–right axis. 0 for images read by MONAI's readers (the first spatial axis
            is the column, x), which is every format this bundle loads.
        tokenizer_dir, max_length, lowercase, unicode_form: as given to :class:`TokenizeReportd`.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        report_key: str = "report",
        prob: float = 0.5,
        spatial_axis: int = 0,
        tokenizer_dir: str | os.PathLike | None = None,
        max_length: int = 24,
        lowercase: bool = False,
        unicode_form: str | None = "NFKC",
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        RandomizableTransform.__init__(self, prob)
        self.flip = Flipd(keys, spatial_axis=spatial_axis, allow_missing_keys=True)
        self.report_key = report_key
        self.tokenize = TokenizeReport(tokenizer_dir, max_length, lowercase, unicode_form)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize(None)
        d = dict(data)
        if not self._do_transform:
            return d
        d = dict(self.flip(d))
        text = d.get(self.report_key)
        if isinstance(text, str) and text.strip():
            d[self.report_key] = swap_sides(text)
            ids, mask = self.tokenize(d[self.report_key])
            d[f"{self.report_key}_ids"], d[f"{self.report_key}_mask"] = ids, mask
        return d


def _sample_name(d: Mapping) -> str:
    for key in ("id", "image"):
        value = d.get(key)
        if isinstance(value, (str, os.PathLike)):
            return str(value)
        meta = getattr(value, "meta", None)
        if meta and "filename_or_obj" in meta:
            return str(meta["filename_or_obj"])
    return "<unnamed>"


class ToChannels(Transform):
    """Bring a channel-first image to the number of channels the network takes.

    RGB(A) → 1: ITU-R BT.601 luminance (alpha dropped); 1 → 3: repeated; RGBA → 3: alpha dropped. Grayscale PNGs,
    RGB exports of radiographs and RGB pathology tiles then all fit one configured ``in_channels``.

    Args:
        channels: 1 or 3.
    """

    _LUMA = (0.299, 0.587, 0.114)

    def __init__(self, channels: int = 1) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[0]
        if c == self.channels:
            return img
        if c == 4:
            img, c = img[:3], 3
        if c == 3 and self.channels == 1:
            weights = torch.as_tensor(self._LUMA, dtype=img.dtype if img.is_floating_point() else torch.float32)
            return (img * weights.view(3, *([1] * (img.ndim - 1)))).sum(dim=0, keepdim=True)
        if c == 3:
            return img
        if c == 1:
            return img.repeat(self.channels, *([1] * (img.ndim - 1)))
        raise ValueError(f"cannot bring a {c}-channel image to {self.channels} channels")


class ToChannelsd(MapTransform):
    """Dictionary wrapper of :class:`ToChannels`; ``channels`` may give one count per key."""

    def __init__(
        self, keys: KeysCollection, channels: int | Sequence[int] = 1, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converters = [ToChannels(int(c)) for c in ensure_tuple_rep(channels, len(self.keys))]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, converter in self.key_iterator(d, self.converters):
            d[key] = converter(d[key])
        return d


class SelectSlab(Transform):
    """A 2D image from a volume (a CT series): one slice, or the mean or maximum of a slab of slices.

    Channel-first input C×X×Y×Z gives C×X×Y; 2D input (C×X×Y) passes unchanged, so one chain serves radiographs
    and series. The affine's translation moves to the slab's first slice, so outputs written back stay in place; for
    a DICOM series the slab's SOPInstanceUIDs go to the meta data as ``SourceSOPInstanceUIDs`` (backslash-separated,
    as DICOM writes multiple values).

    Args:
        index: slice index along the last axis, or ``"middle"``.
        thickness: slices in the slab (odd numbers centre it on ``index``).
        reduce: ``"mean"`` or ``"max"`` (a maximum-intensity projection) over the slab.
    """

    def __init__(self, index: int | str = "middle", thickness: int = 1, reduce: str = "mean") -> None:
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
        if thickness < 1:
            raise ValueError(f"thickness must be at least 1, got {thickness}")
        self.index, self.thickness, self.reduce = index, int(thickness), reduce

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim != 4:
            return img
        depth = img.shape[-1]
        centre = depth // 2 if self.index == "middle" else int(self.index)
        if not 0 <= centre < depth:
            name = getattr(img, "meta", {}).get("filename_or_obj", "volume")
            raise ValueError(f"{name}: slice {centre} requested from a series of {depth} slices")
        start = min(max(centre - self.thickness // 2, 0), max(depth - self.thickness, 0))
        slab = img[..., start : start + self.thickness]
        out = slab.mean(dim=-1) if self.reduce == "mean" else slab.amax(dim=-1)
        meta = getattr(img, "meta", None)
        if meta is not None and "affine" in meta:
            from monai.data import MetaTensor

            affine = torch.as_tensor(meta["affine"], dtype=torch.float64).clone()
            affine[:3, 3] += affine[:3, 2] * start
            # writers size their output from spatial_shape: a 3D one would make the channel a spatial axis
            extra = {}
            uids = meta.get("SOPInstanceUIDs")
            if uids is not None and len(uids) == depth:
                # one string, not a list: it survives collation; a DICOM SEG written back references these slices
                extra["SourceSOPInstanceUIDs"] = "\\".join(str(u) for u in uids[start : start + self.thickness])
            out = MetaTensor(
                out.as_tensor() if hasattr(out, "as_tensor") else out,
                meta={**meta, "affine": affine, "spatial_shape": np.asarray(out.shape[1:]), **extra},
            )
        return out


class SelectSlabd(MapTransform):
    """Dictionary wrapper of :class:`SelectSlab` (give the image and its mask the same slab)."""

    def __init__(
        self,
        keys: KeysCollection,
        index: int | str = "middle",
        thickness: int = 1,
        reduce: str = "mean",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.select = SelectSlab(index, thickness, reduce)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.select(d[key])
        return d


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
        from scripts.zones import CXR_LEVEL_EDGES

        super().__init__(keys, allow_missing_keys=True)
        self.ref_key, self.output_key, self.left_is_image_left = ref_key, output_key, left_is_image_left
        self.level_edges = tuple(level_edges) if level_edges is not None else CXR_LEVEL_EDGES

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from scripts.zones import report_zones, zone_map

        d = dict(data)
        texts = [d.get(key) for key in self.keys]
        text = " . ".join(t for t in texts if isinstance(t, str) and t)
        shape = tuple(d[self.ref_key].shape[1:])
        if len(shape) != 2:
            raise ValueError(f"ReportZonesd needs a 2D image (C×X×Y); got spatial shape {shape}")
        raster = zone_map(report_zones(text), shape, self.left_is_image_left, self.level_edges)  # type: ignore[arg-type]
        d[self.output_key] = torch.as_tensor(raster.astype(np.uint8))[None]  # uint8: cached per sample
        return d


class SaveMaskLikeInputd(MapTransform):
    """Save a predicted mask (or probability map) in the format of its input image: PNG for PNG/JPEG inputs, NIfTI
    otherwise.

    PNG masks are written as 8-bit 0/255 images, PNG probability maps as 8-bit probability × 255; NIfTI outputs keep
    the input's affine (masks uint8, probability maps float32). ``pred`` should already be in the input's geometry
    (``Invertd`` before this transform). The path of the last file written is kept in ``last_path``.

    Args:
        keys: prediction key(s).
        output_dir: destination folder.
        output_postfix: appended to the name.
        ref_key: key of the input image whose file name decides the format.
        id_key: key of the entry's id; when an entry has one, the output is named ``<id>_<postfix>`` (a DICOM series'
            files have meaningless names, its id is the SeriesInstanceUID), else after the input file.
        probability: write a probability map (values in [0, 1]) rather than a binary mask.
    """

    _PNG_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    _STRIP_SUFFIXES = (".nii.gz", ".nii", *_PNG_SUFFIXES, ".dcm", ".dicom")

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
        self.last_path: str | None = None

    def _stem(self, d: Mapping[Hashable, Any], source: str) -> str:
        if self.id_key is not None and d.get(self.id_key):
            return re.sub(r"[^\w.-]", "_", str(d[self.id_key]))
        name = Path(source).name
        for suffix in self._STRIP_SUFFIXES:
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return name

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source = getattr(d.get(self.ref_key), "meta", {}).get("filename_or_obj", "")
        source = str(source[0] if isinstance(source, (list, tuple)) and source else source)
        is_png = Path(source).suffix.lower() in self._PNG_SUFFIXES
        writer = self.png if is_png else self.nifti
        self.output_dir.mkdir(parents=True, exist_ok=True)
        name = str(self.output_dir / f"{self._stem(d, source)}_{self.output_postfix}")
        for key in self.key_iterator(d):
            writer(d[key], filename=name)
            self.last_path = name + (".png" if is_png else ".nii.gz")
        return d
