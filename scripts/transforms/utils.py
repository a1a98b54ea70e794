"""Helpers of the bundle's transforms."""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping
from typing import Any

__all__ = ["sample_name", "source_name", "warning_mode"]


def sample_name(d: Mapping) -> str:
    """A name for the sample in messages: its ``id``, else its image's path or file name, else ``<unnamed>``."""
    for key in ("id", "image"):
        value = d.get(key)
        if isinstance(value, (str, os.PathLike)):
            return str(value)
        meta = getattr(value, "meta", None)
        if meta and "filename_or_obj" in meta:
            return str(meta["filename_or_obj"])
    return "<unnamed>"


def source_name(d: Mapping, key: Hashable) -> str:
    """The file an item of the sample was read from (its ``filename_or_obj``), else :func:`sample_name`."""
    value: Any = d.get(key)
    meta = getattr(value, "meta", None)
    if meta and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return sample_name(d)


def warning_mode(count: int, named: int) -> str | None:
    """How the ``count``-th occurrence (from 1) of a per-sample warning is logged, so that a whole split of them
    gives a handful of lines, not thousands: ``"name"`` for the first ``named`` (the sample is named), then
    ``"count"`` at 10, 100, 1000, ... (the running count), else None (not logged)."""
    if count <= named:
        return "name"
    return "count" if math.log10(count).is_integer() else None
