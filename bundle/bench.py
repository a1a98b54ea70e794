"""Benchmarks that print figures: ``python -m bundle bench data ...``.

Figures are throughputs measured in one process against a baseline run in the same process (machines are noisy:
compare the ratios, not the absolute numbers, between machines).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from scripts import BUNDLE_DIR

__all__ = ["data_pipeline_throughput", "network_cost", "network_costs", "samples_per_second"]


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
        "cached pipeline": Dataset(cached, random),  # what train.yaml runs per epoch
    }
    rows = []
    for w in workers:
        for name, ds in datasets.items():
            loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=w)
            rate, n = samples_per_second(loader)
            rows.append({"regime": name, "workers": w, "samples_per_s": rate, "samples": n})
            log(f"{name:16s} workers={w}  {rate:8.1f} samples/s  ({n} samples)")
    return rows


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


# -- network cost ---------------------------------------------------------------------------------------------------

_BENCH_REPORT = "bilateral pulmonary infection, two infected areas, middle lower left lung and lower right lung."


def network_parser(network: str, overrides: dict | None = None):
    """``configs/train.yaml`` with ``configs/networks/<network>.yaml`` on top (the way users select a network)."""
    from monai.bundle import ConfigParser

    files = [str(Path(BUNDLE_DIR) / "configs" / "train.yaml"), str(Path(BUNDLE_DIR) / "configs" / "networks" /
                                                                    f"{network}.yaml")]
    if not Path(files[1]).is_file():
        names = sorted(p.stem for p in (Path(BUNDLE_DIR) / "configs" / "networks").glob("*.yaml"))
        raise FileNotFoundError(f"no network config {files[1]}; the bundle has {', '.join(names)}")
    parser = ConfigParser()
    parser.read_config(files)
    parser.update({"bundle_root": str(BUNDLE_DIR), "device": "$torch.device('cpu')", **(overrides or {})})
    return parser


def _timed(fn: Callable[[], object], repeats: int, warmup: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    import statistics

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") / 2**20)


def network_cost(
    network: str,
    size: int = 224,
    batch_sizes: tuple[int, ...] = (1, 8),
    train_batch: int = 8,
    repeats: int = 10,
    warmup: int = 3,
    device: str = "cpu",
    overrides: dict | None = None,
    timing: bool = True,
) -> dict:
    """Parameters, FLOPs, training step time, inference latency and peak memory of one network of the bundle, as
    its config builds it (``configs/networks/<network>.yaml`` on ``train.yaml``), on random size×size images.

    FLOPs are counted by ``torch.utils.flop_counter`` for one image, eval-mode forward, with the report when the
    network reads one (2 FLOPs per multiply-add; halve for the MACs many papers call FLOPs). Step time: forward,
    the config's loss, backward and the config's optimizer step at ``train_batch``. Latency: eval forward without
    gradients, per image, at each of ``batch_sizes``. Peak memory: on CUDA the allocator's peak, on CPU the
    process's peak resident set above its size before the first forward pass (run each network in a fresh process
    for this figure, as ``python -m bundle bench model`` does). ``timing=False`` stops after the FLOPs (step,
    latency and memory come back as NaN).
    """
    import resource

    from torch.utils.flop_counter import FlopCounterMode

    from scripts.transforms import TokenizeReport

    parser = network_parser(network, {"device": f"$torch.device('{device}')", **(overrides or {})})
    dev = torch.device(device)
    net = parser.get_parsed_content("network")
    loss_fn = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    # a network reads the report when the batch hands it the tokens and it has a text path (TMCA's use_text)
    reads_text = bool(parser.get_parsed_content("prepare_batch").text_keys) and getattr(net, "use_text", True)
    in_channels = int(parser["network_def"].get("in_channels", 1))
    tokens = TokenizeReport(parser.get_parsed_content("text_encoder_dir"), max_length=parser["max_report_tokens"])
    ids, mask = (t.to(dev) for t in tokens(_BENCH_REPORT))

    def inputs(b: int) -> tuple[torch.Tensor, dict]:
        image = torch.rand(b, in_channels, size, size, device=dev)
        text = {"text_ids": ids[None].expand(b, -1), "text_mask": mask[None].expand(b, -1)} if reads_text else {}
        return image, text

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss_before = _rss_mb()

    net.eval()
    image1, text1 = inputs(1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(image1, **text1)
    flops = counter.get_total_flops()
    row = {
        "network": network, "class": type(net).__name__, "reads_text": reads_text, "params_total": total,
        "params_trainable": trainable, "gflops": flops / 1e9, "train_batch": train_batch, "size": size,
        "device": device, "overrides": overrides or {},
    }
    if not timing:
        return {**row, "step_s": float("nan"), "latency_s": {b: float("nan") for b in batch_sizes},
                "peak_mb": float("nan")}

    latency = {}
    for b in batch_sizes:
        image, text = inputs(b)
        with torch.no_grad():
            latency[b] = _timed(lambda: net(image, **text), repeats, warmup, sync) / b

    net.train()
    image, text = inputs(train_batch)
    target = (torch.rand(train_batch, 1, size, size, device=dev) > 0.7).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = loss_fn(net(image, **text), target)
        (out["loss"] if isinstance(out, dict) else out).backward()
        optimizer.step()

    step_s = _timed(step, repeats, warmup, sync)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {**row, "step_s": step_s, "latency_s": latency, "peak_mb": peak_mb}


def _cost_in_child(kwargs: dict) -> dict:
    torch.set_num_threads(kwargs.pop("threads"))
    return network_cost(**kwargs)


def network_costs(networks: Iterable[str], **kwargs) -> list[dict]:
    """:func:`network_cost` of each network, each in a fresh process (clean peak-memory figures)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    rows = []
    for name in networks:
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(_cost_in_child, ({"network": name, "threads": torch.get_num_threads(),
                                                     **kwargs},)))
    return rows


def print_network_table(rows: list[dict]) -> None:
    import math

    base = rows[0]
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')} · {machine()} · device {base['device']} · {base['size']}² input")
    if all(math.isnan(r["step_s"]) for r in rows):  # --params-only
        print("| network | text | params (M) total / trainable | GFLOPs/image |")
        print("|---|---|---|---|")
        for r in rows:
            settings = "".join(f", {k}={v}" for k, v in r["overrides"].items())
            print(f"| {r['network']} ({r['class']}{settings}) | {'yes' if r['reads_text'] else 'no'} | "
                  f"{r['params_total'] / 1e6:.2f} / {r['params_trainable'] / 1e6:.2f} | {r['gflops']:.2f} |")
        return
    bs = sorted(base["latency_s"])
    lat_cols = " | ".join(f"latency/image b{b} (ms)" for b in bs)
    print(f"| network | text | params (M) total / trainable | GFLOPs/image | step b{base['train_batch']} (s) | "
          f"{lat_cols} | peak memory (MB) | step vs {base['network']} |")
    print("|---|---|---|---|---|" + "---|" * len(bs) + "---|---|")
    for r in rows:
        lat = " | ".join(f"{r['latency_s'][b] * 1e3:.1f}" for b in bs)
        settings = "".join(f", {k}={v}" for k, v in r["overrides"].items())
        print(f"| {r['network']} ({r['class']}{settings}) | {'yes' if r['reads_text'] else 'no'} | "
              f"{r['params_total'] / 1e6:.2f} / {r['params_trainable'] / 1e6:.2f} | {r['gflops']:.2f} | "
              f"{r['step_s']:.3f} | {lat} | {r['peak_mb']:.0f} | {r['step_s'] / base['step_s']:.2f}× |")
