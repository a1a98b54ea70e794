"""Helpers of the bundle's transforms."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

__all__ = ["sample_name", "source_name"]


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
