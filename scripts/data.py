"""Datalists for the workflows."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import Dataset, list_data_collate, load_decathlon_datalist

from scripts.errors import root_cause
from scripts.image_files import IMAGE_SUFFIXES, image_stem, is_image

__all__ = ["SKIPPED_KEY", "SkipFailedDataset", "inference_datalist", "load_datalist", "skip_failed_collate"]

logger = logging.getLogger(__name__)

# the key of a batch that lists the entries its dataset could not load ("<image>: <problem>")
SKIPPED_KEY = "skipped"


def inference_datalist(dataset_dir: str | os.PathLike, datalist: str | os.PathLike | None, split: str) -> list[dict]:
    """Items to segment: the ``split`` entries of ``datalist`` when that file exists (image paths made absolute,
    reports kept, labels dropped; ``split="all"``: every list of the file, each image once), otherwise every
    image file directly in ``dataset_dir`` (any of ``scripts.image_files.IMAGE_SUFFIXES``), without reports.

    Raises:
        FileNotFoundError: when neither gives any image, naming the folder.
        KeyError: when the datalist has no ``split`` key, naming the keys it has.
    """
    if datalist is not None and Path(datalist).is_file():
        keys = json.loads(Path(datalist).read_text())
        lists = [k for k, v in keys.items() if isinstance(v, list)] if split == "all" else [split]
        if split not in keys and split != "all":
            raise KeyError(f"datalist {datalist} has no '{split}' list; it has {sorted(keys)}")
        items, seen = [], set()
        for name in lists:
            for item in load_decathlon_datalist(str(datalist), is_segmentation=False, data_list_key=name):
                if str(item.get("image")) not in seen:
                    seen.add(str(item.get("image")))
                    items.append({k: v for k, v in item.items() if k != "label"})
        total = sum(len(v) for v in keys.values() if isinstance(v, list))
        if split != "all" and total > len(items):  # a seeded split of a small folder leaves few test images
            logger.info("datalist %s: segmenting its '%s' list, %d of its %d entries (--infer_split all: every "
                        "list)", datalist, split, len(items), total)
        return items
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
        where = "" if path.parent.is_dir() else f": the folder {path.parent} does not exist"
        raise FileNotFoundError(
            f"datalist {path} not found{where} (set --dataset_dir or --datalist; `python -m bundle demo-data --out "
            "DIR` writes the embedded demo data)"
        )
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


class SkipFailedDataset(Dataset):
    """MONAI's ``Dataset`` for inference, which goes on past an entry it cannot load or preprocess.

    A truncated PNG, a NaN pixel or a 1×1 image in the middle of a folder must not stop the run with the later
    images never done. Such an entry yields ``{SKIPPED_KEY: "<image>: <problem>"}`` with a warning naming the
    file; :func:`skip_failed_collate` keeps it out of the batch and :class:`scripts.engine.SegmentationEvaluator`
    counts it, and :class:`scripts.engine.InferenceSummary` reports the count. Evaluation and training keep
    MONAI's ``Dataset``: figures over a silently smaller set would be wrong, so there a bad file is an error.
    """

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as e:
            entry = self.data[index]
            name = entry.get("image", f"entry {index}") if isinstance(entry, Mapping) else f"entry {index}"
            cause = root_cause(e)
            message = f"{name}: {type(cause).__name__}: {cause}"
            logger.warning("inference: skipped %s", message)
            return {SKIPPED_KEY: message}


def skip_failed_collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """MONAI's ``list_data_collate`` of the entries that loaded; those that did not (:class:`SkipFailedDataset`)
    are listed under ``SKIPPED_KEY``. A batch of skipped entries only has that key."""
    loaded = [item for item in items if SKIPPED_KEY not in item]
    skipped = [item[SKIPPED_KEY] for item in items if SKIPPED_KEY in item]
    batch = list_data_collate(loaded) if loaded else {}
    if skipped:
        batch[SKIPPED_KEY] = skipped
    return batch
