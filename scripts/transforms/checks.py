"""Input checks that turn a silently wrong result or a crash deep inside MONAI into an error naming the file."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from scripts.transforms.utils import source_name

__all__ = ["CheckFinite", "CheckFinited", "CheckMinSized"]


class CheckFinite(Transform):
    """Raises ``ValueError`` when an array holds NaN or ±Inf, and passes it through otherwise.

    One NaN pixel turns the loss NaN and, a step later, every weight; at inference it gives an all-background mask
    without a word. Checking where the file is read names the culprit.

    Args:
        name: what the error calls the array (a file name).
    """

    def __call__(self, img: Any, name: str = "the input") -> Any:
        t = torch.as_tensor(img)
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t)
            if bad.any():
                nan = int(torch.isnan(t).sum())
                raise ValueError(
                    f"{name}: {int(bad.sum())} of {t.numel()} values are not finite ({nan} NaN, "
                    f"{int(bad.sum()) - nan} ±Inf); fix or exclude the file"
                )
        return img


class CheckFinited(MapTransform):
    """Dictionary version of :class:`CheckFinite`: the error names the file each key was read from.

    Place it right after ``LoadImaged``, while the arrays still carry their file names.

    Args:
        keys: the image (and label) keys to check.
        allow_missing_keys: don't raise for a missing key.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.check = CheckFinite()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.check(d[key], name=f"{source_name(d, key)} ({key})")
        return d


class CheckMinSized(MapTransform):
    """Raises ``ValueError`` naming the file when a channel-first image is smaller than ``min_size`` pixels in a
    spatial dimension: a 1×1 "image" (a thumbnail, a broken export) has nothing to segment, and MONAI's PNG writer
    crashes on it with an ``IndexError`` far from the cause.

    Args:
        keys: the image keys (channel-first, after ``EnsureChannelFirstd``).
        min_size: the smallest spatial size accepted, in pixels.
        allow_missing_keys: don't raise for a missing key.
    """

    def __init__(self, keys: KeysCollection, min_size: int = 8, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_size = int(min_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            spatial = tuple(d[key].shape[1:])
            if min(spatial) < self.min_size:
                size = "×".join(str(n) for n in spatial)
                raise ValueError(f"{source_name(d, key)} ({key}): {size} pixels, below the {self.min_size}-pixel "
                                 "minimum; not an image to segment")
        return d


class CheckSameSized(MapTransform):
    """Raises ``ValueError`` naming both files when channel-first images that must be pixel-aligned (an image and
    its mask) differ in spatial size: the later ``Resized`` would stretch both to the network's size without a
    word, so a mask of another image (a pairing typo) or of a transposed export would train as if it fitted.

    Args:
        keys: the first key is the reference (the image); every other present key must match it.
        allow_missing_keys: don't raise for a missing key (an image without a mask at inference).
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = list(self.key_iterator(d))
        if len(present) < 2:
            return d
        ref = present[0]
        size = tuple(d[ref].shape[1:])
        for key in present[1:]:
            other = tuple(d[key].shape[1:])
            if other != size:
                raise ValueError(
                    f"{source_name(d, key)} ({key}) is {'×'.join(map(str, other))} pixels but "
                    f"{source_name(d, ref)} ({ref}) is {'×'.join(map(str, size))}: they must be pixel-aligned"
                )
        return d
