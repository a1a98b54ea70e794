"""Datalists for the workflows."""

from __future__ import annotations

import json
import os
from pathlib import Path

from monai.data import load_decathlon_datalist

from scripts.image_files import IMAGE_SUFFIXES, is_image

__all__ = ["inference_datalist"]


def inference_datalist(dataset_dir: str | os.PathLike, datalist: str | os.PathLike | None, split: str) -> list[dict]:
    """Items to segment: the ``split`` entries of ``datalist`` when that file exists (image paths made absolute,
    reports kept, labels dropped), otherwise every image file directly in ``dataset_dir`` (any of
    ``scripts.image_files.IMAGE_SUFFIXES``), without reports.

    Raises:
        FileNotFoundError: when neither gives any image, naming the folder.
        KeyError: when the datalist has no ``split`` key, naming the keys it has.
    """
    if datalist is not None and Path(datalist).is_file():
        keys = json.loads(Path(datalist).read_text())
        if split not in keys:
            raise KeyError(f"datalist {datalist} has no '{split}' list; it has {sorted(keys)}")
        items = load_decathlon_datalist(str(datalist), is_segmentation=False, data_list_key=split)
        return [{k: v for k, v in item.items() if k != "label"} for item in items]
    files = sorted(p for p in Path(dataset_dir).iterdir() if is_image(p))
    if not files:
        raise FileNotFoundError(f"no datalist and no images ({', '.join(IMAGE_SUFFIXES)}) in {dataset_dir}")
    return [{"image": str(p)} for p in files]
