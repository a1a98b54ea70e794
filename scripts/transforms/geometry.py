"""Image-geometry transforms: channel count and a 2D slice or slab from a volume (array/dictionary pairs)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import ensure_tuple_rep

__all__ = ["ToChannels", "ToChannelsd", "SelectSlab", "SelectSlabd"]


class ToChannels(Transform):
    """Bring a channel-first image to the number of channels the network takes.

    RGB(A) → 1: ITU-R BT.601 luminance (alpha dropped); 1 → 3: repeated; RGBA → 3: alpha dropped. Grayscale PNGs,
    RGB exports of radiographs and RGB pathology tiles then all fit one configured ``in_channels``.

    Not a PIL reader ``converter`` (``image.convert("L")``, the same luma) with MONAI's ``RepeatChanneld``: that
    covers PNG/JPEG only, while RGB DICOM (US, secondary captures) and RGB NIfTI arrive through other readers, and
    one transform after loading brings every reader's output, image and mask alike, to the configured channels.

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
