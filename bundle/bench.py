"""Benchmarks that print figures: ``python -m bundle bench data ...``.

Figures are throughputs measured in one process against a baseline run in the same process (machines are noisy:
compare the ratios, not the absolute numbers, between machines).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from scripts import BUNDLE_DIR

__all__ = ["data_pipeline_throughput", "samples_per_second"]


def samples_per_second(loader: Iterable, warmup_batches: int = 2) -> tuple[float, int]:
    """Iterate ``loader`` once; samples/s over the batches after the first ``warmup_batches`` (worker start-up
    excluded), and the number of samples timed."""
    n, start = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if i < warmup_batches:
            start = time.perf_counter()
            continue
        n += len(batch["image"])
    if n == 0:
        raise ValueError("too few samples for the benchmark: raise --num-samples")
    return n / (time.perf_counter() - start), n


def _train_parser(datalist: str, text_encoder_dir: str | None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(BUNDLE_DIR) / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(BUNDLE_DIR), "datalist": str(datalist), "text_encoder_dir": text_encoder_dir})
    return parser


def data_pipeline_throughput(
    datalist: str | Path,
    num_samples: int = 800,
    batch_size: int = 8,
    workers: Iterable[int] = (0, 2),
    text_encoder_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Samples/s of the training input pipeline of ``configs/train.yaml`` on the first ``num_samples`` training
    entries of ``datalist``, for each worker count, in three regimes:

    - ``plain load``: MONAI ``LoadImaged`` + ``EnsureChannelFirstd`` of image and mask (the baseline);
    - ``full pipeline``: load, channels, intensity, resize, tokenise the report, side flip, report dropout,
      affine and intensity augmentation, collate (what every epoch runs without caching);
    - ``cached pipeline``: the random transforms and collate only, on cached deterministic outputs (what
      ``train.yaml`` runs from the second epoch on: its dataset is a ``CacheDataset``).
    """
    from monai.data import CacheDataset, DataLoader, Dataset, load_decathlon_datalist
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    parser = _train_parser(str(datalist), text_encoder_dir)
    items = load_decathlon_datalist(str(datalist), True, "training")[:num_samples]
    full = parser.get_parsed_content("train#preprocessing")
    deterministic = Compose(parser.get_parsed_content("train#deterministic_transforms"))
    random = Compose(parser.get_parsed_content("train#random_transforms"))
    plain = Compose([LoadImaged(["image", "label"], image_only=True), EnsureChannelFirstd(["image", "label"])])
    cached = CacheDataset(items, deterministic, cache_rate=1.0, num_workers=None, progress=False)
    datasets = {
        "plain load": Dataset(items, plain),
        "full pipeline": Dataset(items, full),
        "cached pipeline": _RandomOnCache(cached, random),
    }
    rows = []
    for w in workers:
        for name, ds in datasets.items():
            loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=w)
            rate, n = samples_per_second(loader)
            rows.append({"regime": name, "workers": w, "samples_per_s": rate, "samples": n})
            log(f"{name:16s} workers={w}  {rate:8.1f} samples/s  ({n} samples)")
    return rows


class _RandomOnCache(torch.utils.data.Dataset):
    def __init__(self, cached, transform) -> None:
        self.cached, self.transform = cached, transform

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, i: int):
        return self.transform(self.cached[i])


def machine() -> str:
    return f"{platform.node()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · " \
           f"{torch.get_num_threads()} threads"


def print_data_table(rows: list[dict]) -> None:
    base = {r["workers"]: r["samples_per_s"] for r in rows if r["regime"] == "plain load"}
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')} · {machine()}")
    print("| pipeline | workers | samples/s | vs plain PNG load |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['regime']} | {r['workers']} | {r['samples_per_s']:.1f} | "
              f"{r['samples_per_s'] / base[r['workers']]:.2f}× |")
