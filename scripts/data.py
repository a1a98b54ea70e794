"""Datalists for the workflows."""

from __future__ import annotations

import json
import os
from pathlib import Path

from monai.data import load_decathlon_datalist

from scripts.image_files import IMAGE_SUFFIXES, image_stem, is_image

__all__ = ["inference_datalist", "load_datalist"]


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


def load_datalist(
    datalist: str | os.PathLike, split: str, disjoint_from: str | None = None
) -> list[dict]:
    """The ``split`` entries of a training/evaluation datalist (MONAI's ``load_decathlon_datalist``: paths made
    absolute), checked so that a typo or a leak is an error naming the file rather than a silent wrong result.

    - A missing or malformed file, a missing split, or an empty one: an error naming the file and the split.
    - An entry without ``id`` gets the stem of its image file (collation needs every entry to have the same
      keys; the id names the sample in messages and outputs).
    - With ``disjoint_from``: an image listed in both splits (a sample trained on and validated on) is an error
      naming the first few.

    Raises:
        FileNotFoundError, ValueError: as above.
    """
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} not found (set --dataset_dir or --datalist)")
    try:
        keys = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"datalist {path}: not valid UTF-8 JSON ({e})") from e
    if not isinstance(keys, dict) or split not in keys:
        found = sorted(keys) if isinstance(keys, dict) else type(keys).__name__
        raise ValueError(f"datalist {path} has no '{split}' list; it has {found}")
    if not isinstance(keys[split], list) or not keys[split]:
        raise ValueError(f"datalist {path}: the '{split}' list is empty or not a list")
    items = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=split)
    for item in items:
        if "id" not in item and isinstance(item.get("image"), str):
            item["id"] = image_stem(Path(item["image"]))
    if disjoint_from is not None and disjoint_from in keys and keys[disjoint_from]:
        other = {str(i.get("image")) for i in load_decathlon_datalist(str(path), True, disjoint_from)}
        shared = sorted(str(i["image"]) for i in items if str(i.get("image")) in other)
        if shared:
            raise ValueError(
                f"datalist {path}: {len(shared)} image(s) are in both '{split}' and '{disjoint_from}' (a leak that "
                f"inflates the validation figures), e.g. {shared[0]}"
            )
    return items
