"""Embedded demo data: synthetic chest-X-ray-like images whose correct mask depends on the report.

Every image shows two lung fields with opacities in several of the six lung zones
({left, right} x {upper, middle, lower}). The report, in the QaTa-COV19 template, names *some* of those
zones, and the mask marks exactly the opacities of the named zones. An image-only model can find the
opacities but cannot know which of them the report means, so the data rewards reading the report.

As in QaTa-COV19, "left" and "right" mean the image's left and right halves (columns < W/2 and >= W/2).
Zones are the lung field's vertical thirds on each side.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["ZONES", "zone_report", "make_sample", "write_demo_data"]

logger = logging.getLogger(__name__)

SIDES = ("left", "right")
LEVELS = ("upper", "middle", "lower")
ZONES = tuple((side, level) for side in SIDES for level in LEVELS)
_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def zone_report(zones: set[tuple[str, str]]) -> str:
    """QaTa-style report naming ``zones``, e.g. ``"unilateral pulmonary infection, one infected area, lower left lung."``."""
    if not zones:
        raise ValueError("a report needs at least one zone")
    parts = []
    for side in SIDES:
        levels = [lv for lv in LEVELS if (side, lv) in zones]
        if levels:
            where = "all" if len(levels) == len(LEVELS) else " ".join(levels)
            parts.append(f"{where} {side} lung")
    extent = "bilateral" if len(parts) == 2 else "unilateral"
    n = len(parts)
    return f"{extent} pulmonary infection, {_COUNT_WORDS[n]} infected area{'s' if n > 1 else ''}, {' and '.join(parts)}."


def _lung_geometry(size: int, rng: np.random.Generator) -> dict[str, float]:
    jitter = rng.uniform(-0.02, 0.02, size=4) * size
    return {
        "cx_left": 0.30 * size + jitter[0],
        "cx_right": 0.70 * size + jitter[1],
        "cy": 0.52 * size + jitter[2],
        "ax": 0.15 * size,
        "ay": 0.31 * size + jitter[3],
    }


def make_sample(rng: np.random.Generator, size: int = 224) -> tuple[np.ndarray, np.ndarray, str, set]:
    """One synthetic radiograph.

    Returns:
        image: H×W uint8, mask: H×W uint8 in {0, 255}, report text, and the set of named zones.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    g = _lung_geometry(size, rng)
    body = np.exp(-(((xx - size / 2) / (0.47 * size)) ** 2 + ((yy - size / 2) / (0.60 * size)) ** 2) ** 2)
    image = 0.15 + 0.55 * body
    lungs = np.zeros((size, size), bool)
    for cx in (g["cx_left"], g["cx_right"]):
        lung = ((xx - cx) / g["ax"]) ** 2 + ((yy - g["cy"]) / g["ay"]) ** 2 <= 1.0
        lungs |= lung
    image = np.where(lungs, image - 0.35, image)
    # ribs: faint horizontal bands across the lung fields
    ribs = 0.06 * (np.sin(yy / size * 2 * np.pi * 7 + rng.uniform(0, np.pi)) > 0.6)
    image = image + ribs * lungs

    top, bottom = g["cy"] - g["ay"], g["cy"] + g["ay"]
    third = (bottom - top) / 3
    present = {ZONES[i] for i in rng.choice(len(ZONES), size=int(rng.integers(2, 5)), replace=False)}
    named = {z for z in present if rng.random() < 0.5} or {sorted(present)[int(rng.integers(len(present)))]}
    mask = np.zeros((size, size), bool)
    for side, level in sorted(present):
        cx = g["cx_left"] if side == "left" else g["cx_right"]
        half = (xx < size / 2) if side == "left" else (xx >= size / 2)
        y0 = top + LEVELS.index(level) * third
        zone = lungs & half & (yy >= y0) & (yy < y0 + third)
        blob = np.zeros((size, size), bool)
        while blob.sum() < 40:  # the lung is narrow at its ends: redraw until the opacity is visible
            for _ in range(int(rng.integers(1, 3))):
                bx = cx + rng.uniform(-0.5, 0.5) * g["ax"]
                by = y0 + rng.uniform(0.25, 0.75) * third
                rx, ry = rng.uniform(0.25, 0.45) * g["ax"], rng.uniform(0.2, 0.4) * third
                blob |= ((xx - bx) / rx) ** 2 + ((yy - by) / ry) ** 2 <= 1.0
            blob &= zone
        image = image + 0.28 * blob
        if (side, level) in named:
            mask |= blob
    image = image + rng.normal(0, 0.03, image.shape)
    image = np.clip(image, 0, 1)
    return (image * 255).astype(np.uint8), (mask * 255).astype(np.uint8), zone_report(named), named


def write_demo_data(
    out_dir: str | Path,
    num_samples: int = 400,
    seed: int = 0,
    size: int = 224,
    fractions: tuple[float, float] = (0.7, 0.15),
) -> Path:
    """Write ``images/``, ``masks/`` (PNG) and ``datalist.json`` under ``out_dir``; returns the datalist path.

    Args:
        out_dir: destination folder, created if missing.
        num_samples: number of image/mask/report triples.
        seed: the whole set is a deterministic function of the seed.
        size: image side in pixels.
        fractions: training and validation fractions; the rest is the test split.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(num_samples):
        image, mask, report, _ = make_sample(rng, size)
        sid = f"demo_{i:04d}"
        Image.fromarray(image).save(out / "images" / f"{sid}.png")
        Image.fromarray(mask).save(out / "masks" / f"{sid}.png")
        entries.append({"id": sid, "image": f"images/{sid}.png", "label": f"masks/{sid}.png", "report": report})
    n_train = int(round(fractions[0] * num_samples))
    n_val = int(round(fractions[1] * num_samples))
    datalist = {
        "description": f"synthetic demo data, seed {seed}",
        "training": entries[:n_train],
        "validation": entries[n_train : n_train + n_val],
        "test": entries[n_train + n_val :],
    }
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1))
    logger.info("wrote %d demo samples to %s", num_samples, out)
    return path
