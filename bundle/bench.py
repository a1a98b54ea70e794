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

from bundle.load import BUNDLE_ROOT, bundle_parser, checkpoint_weights, fit_weights

__all__ = [
    "BASELINE", "conv_peak", "data_pipeline_throughput", "inference_agreement", "json_rows", "network_cost",
    "network_costs", "profile_step", "samples_per_second", "switch_ablation",
]


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
    return bundle_parser(BUNDLE_ROOT / "configs" / "train.yaml",
                         {"datalist": str(datalist), "text_encoder_dir": text_encoder_dir})


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
    configs = BUNDLE_ROOT / "configs"
    files = [configs / "train.yaml", configs / "networks" / f"{network}.yaml"]
    if not files[1].is_file():
        names = sorted(p.stem for p in (configs / "networks").glob("*.yaml"))
        raise FileNotFoundError(f"no network config {files[1]}; the bundle has {', '.join(names)}")
    return bundle_parser(files, {"device": "$torch.device('cpu')", **(overrides or {})})


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


# the plain path of the same network: fp32, contiguous memory, no compile, a per-parameter AdamW loop, no text cache
BASELINE = {"precision": "fp32", "channels_last": False, "compile": False, "optimizer#fused": False}
PATHS = ("fast", "baseline")

# the engines are built from the config as `run training` builds them, without data, handlers or metrics
_ENGINE_ONLY = {
    "train#dataloader": "$[None]", "train#handlers": [], "train#key_metric": None,
    "validate#dataloader": "$[None]", "validate#handlers": [], "validate#key_metric": None,
    "validate#additional_metrics": None,
}


def _variant_parser(network: str, settings: dict, device: str = "cpu", text_cache: bool = True):
    """The config of ``network`` with ``settings`` on top, engines without data, handlers or metrics; with
    ``text_cache=False`` the frozen text encoder's cache is switched off (it has no config key)."""
    from scripts.networks.text_encoder import configure_text_cache

    parser = network_parser(network, {"device": f"$torch.device('{device}')", **_ENGINE_ONLY, **settings})
    if not text_cache:
        configure_text_cache(parser.get_parsed_content("network"), 0)
    return parser


def _path_parser(network: str, path: str, overrides: dict | None = None, device: str = "cpu"):
    """:func:`_variant_parser` for ``path`` ``fast`` (the config with ``overrides``) or ``baseline`` (the same
    with :data:`BASELINE` on top and the text cache off)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    baseline = path == "baseline"
    settings = {**(overrides or {}), **(BASELINE if baseline else {})}
    return _variant_parser(network, settings, device, text_cache=not baseline)


def _batch_maker(parser) -> Callable[[int, int], dict]:
    """``make(b, size)``: a random B×C×size×size batch with masks and the benchmark report tokenised as the config
    tokenises reports (the tokenizer is loaded once)."""
    ids, mask = parser.get_parsed_content("tokenizer")(_BENCH_REPORT)
    in_channels = int(parser["network_def"].get("in_channels", 1))

    def make(b: int, size: int) -> dict:
        g = torch.Generator().manual_seed(b)
        return {
            "image": torch.rand(b, in_channels, size, size, generator=g),
            "label": (torch.rand(b, 1, size, size, generator=g) > 0.7).float(),
            "report_ids": ids[None].expand(b, -1).clone(),
            "report_mask": mask[None].expand(b, -1).clone(),
        }

    return make


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
    path: str = "fast",
) -> dict:
    """Parameters, FLOPs, training step time, inference latency and peak memory of one network of the bundle, as
    its config builds it (``configs/networks/<network>.yaml`` on ``train.yaml``), on random size×size images.

    The step is the trainer's own iteration (``train#trainer``: its batch preparation and memory format, autocast,
    loss, backward, optimizer and post-processing), the latency the evaluator's forward pass (``validate#evaluator``:
    batch preparation, autocast, inferer) without gradients, per image, at each of ``batch_sizes``. ``path``
    ``fast`` takes the config as it is (with ``overrides``); ``baseline`` the same with :data:`BASELINE` on top
    and the frozen text encoder's cache off: the plain fp32 path.

    FLOPs are counted by ``torch.utils.flop_counter``: ``gflops`` for one image, eval-mode forward, with the report
    when the network reads one (2 FLOPs per multiply-add; halve for the MACs many papers call FLOPs);
    ``step_gflops`` for one training step as executed (a cached text encoder does no work). Peak memory: on CUDA
    the allocator's peak, on CPU the process's peak resident set above its size before the first forward pass
    (run each network and path in a fresh process for this figure, as ``python -m bundle bench model`` does).
    ``timing=False`` stops after the forward FLOPs (the rest come back as NaN).
    """
    import resource

    from torch.utils.flop_counter import FlopCounterMode

    parser = _path_parser(network, path, overrides, device)
    dev = torch.device(device)
    net = parser.get_parsed_content("network")
    prepare = parser.get_parsed_content("prepare_batch")
    # a network reads the report when the batch hands it the tokens and it has a text path (TMCA's use_text)
    reads_text = bool(prepare.text_keys) and getattr(net, "use_text", True)
    make_batch = _batch_maker(parser)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss_before = _rss_mb()

    net.eval()
    one = make_batch(1, size)
    text1 = {"text_ids": one["report_ids"].to(dev), "text_mask": one["report_mask"].to(dev)} if reads_text else {}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(one["image"].to(dev), **text1)
    row = {
        "network": network, "path": path, "class": type(net).__name__, "reads_text": reads_text,
        "params_total": total, "params_trainable": trainable, "gflops": counter.get_total_flops() / 1e9,
        "train_batch": train_batch, "size": size, "device": device, "overrides": overrides or {},
        "compute": _describe_path(parser),
    }
    nan = float("nan")
    if not timing:
        return {**row, "step_s": nan, "first_step_s": nan, "step_gflops": nan, "latency_s": {b: nan for b in batch_sizes},
                "peak_mb": nan}

    evaluator = parser.get_parsed_content("validate#evaluator")
    latency = {}
    for b in batch_sizes:
        image, _, args, kwargs = evaluator.prepare_batch(make_batch(b, size), dev)

        def forward() -> None:
            with torch.no_grad():
                evaluator.inferer(image, evaluator.network, *args, **kwargs)

        net.eval()
        latency[b] = _timed(forward, repeats, warmup, sync) / b

    step = _trainer_step(parser, make_batch(train_batch, size))
    start = time.perf_counter()
    step()  # the first step: text cache misses, oneDNN primitive creation, and compilation with compile=true
    sync()
    first_step_s = time.perf_counter() - start
    step_s = _timed(step, repeats, warmup, sync)
    step_flops = nan
    if not parser.get_parsed_content("compile"):
        with FlopCounterMode(display=False) as counter:
            step()
        step_flops = counter.get_total_flops() / 1e9
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {**row, "step_s": step_s, "first_step_s": first_step_s, "step_gflops": step_flops, "latency_s": latency,
            "peak_mb": peak_mb}


def _trainer_step(parser, batch: dict) -> Callable[[], None]:
    """One iteration of the config's ``train#trainer`` on ``batch``, as ``run training`` executes it."""
    trainer = parser.get_parsed_content("train#trainer")

    def step() -> None:
        trainer.state.batch = dict(batch)  # the engine decollates state.batch in place
        trainer._iteration(trainer, trainer.state.batch)

    return step


def profile_step(
    network: str = "tmca",
    path: str = "fast",
    size: int = 224,
    train_batch: int = 8,
    steps: int = 3,
    rows: int = 25,
    overrides: dict | None = None,
) -> str:
    """``torch.profiler`` table of the top operators (self CPU time) over ``steps`` training steps of the trainer,
    after two warm-up steps; forward and backward operators (``autograd::engine`` rows are backward nodes)."""
    from torch.profiler import ProfilerActivity, profile

    parser = _path_parser(network, path, overrides)
    step = _trainer_step(parser, _batch_maker(parser)(train_batch, size))
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"{network} {path} ({_describe_path(parser)}), batch {train_batch}, {size}², {steps} steps\n{table}"


def _describe_path(parser) -> str:
    from scripts.precision import describe

    parts = [describe(parser.get_parsed_content("compute_dtype"))]
    parts.append("channels-last" if parser.get_parsed_content("channels_last") else "contiguous")
    if parser.get_parsed_content("compile"):
        parts.append("compiled")
    return ", ".join(parts)


def conv_peak(threads: int | None = None, repeats: int = 10, device: str = "cpu") -> dict[str, float]:
    """GFLOP/s of a 3×3 convolution (96→96 channels, 56², batch 8, forward) in fp32 contiguous, fp32
    channels-last and bf16 channels-last: the machine's practical peak for the convolutions these networks run."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    conv = torch.nn.Conv2d(96, 96, 3, padding=1).to(dev)
    x = torch.rand(8, 96, 56, 56, device=dev)
    flops = 2 * 8 * 96 * 96 * 9 * 56 * 56
    out = {}
    for name, fmt, dtype in (("fp32 contiguous", torch.contiguous_format, None),
                             ("fp32 channels-last", torch.channels_last, None),
                             ("bf16 channels-last", torch.channels_last, torch.bfloat16)):
        c, xi = conv.to(memory_format=fmt), x.contiguous(memory_format=fmt)

        def run() -> None:
            with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                c(xi)

        out[name] = flops / _timed(run, repeats, 3, sync) / 1e9
    return out


def _cost_in_child(kwargs: dict) -> dict:
    torch.set_num_threads(kwargs.pop("threads"))
    return network_cost(**kwargs)


def network_costs(networks: Iterable[str], paths: Iterable[str] = ("fast",), **kwargs) -> list[dict]:
    """:func:`network_cost` of each network on each path, each in a fresh process (clean peak-memory figures)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    rows = []
    for name in networks:
        for path in paths:
            with ctx.Pool(1) as pool:
                rows.append(pool.apply(_cost_in_child, ({"network": name, "path": path,
                                                         "threads": torch.get_num_threads(), **kwargs},)))
    return rows


def json_rows(rows: list[dict]) -> list[dict]:
    """The rows in the flat form of ``--json``: ``network``, ``path``, ``step_b<n>_s``, ``latency_b<n>_ms``,
    ``peak_mb``, ``params_total``, ``params_trainable``, ``gflops`` (and the step's executed GFLOPs)."""
    out = []
    for r in rows:
        flat = {"network": r["network"], "path": r["path"], "compute": r["compute"],
                f"step_b{r['train_batch']}_s": r["step_s"], "first_step_s": r["first_step_s"]}
        flat.update({f"latency_b{b}_ms": v * 1e3 for b, v in r["latency_s"].items()})
        flat.update({k: r[k] for k in ("peak_mb", "params_total", "params_trainable", "gflops", "step_gflops")})
        flat.update({"size": r["size"], "device": r["device"], "overrides": r["overrides"]})
        out.append(flat)
    return out


def print_network_table(rows: list[dict], peak: dict[str, float] | None = None) -> None:
    """Markdown table of :func:`network_costs` rows; with ``peak`` (:func:`conv_peak`), the step's achieved GFLOP/s
    against the machine's 3×3-convolution peak, and each fast row's step and latency against its baseline row."""
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
    print(f"| network | path | text | params (M) total / trainable | GFLOPs/image | step b{base['train_batch']} (s) | "
          f"step GFLOP/s | {lat_cols} | peak memory (MB) | step vs {base['network']} ({base['path']}) |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(bs) + "---|---|")
    for r in rows:
        lat = " | ".join(f"{r['latency_s'][b] * 1e3:.1f}" for b in bs)
        settings = "".join(f", {k}={v}" for k, v in r["overrides"].items())
        print(f"| {r['network']} ({r['class']}{settings}) | {r['path']}: {r['compute']} | "
              f"{'yes' if r['reads_text'] else 'no'} | {r['params_total'] / 1e6:.2f} / "
              f"{r['params_trainable'] / 1e6:.2f} | {r['gflops']:.2f} | {r['step_s']:.3f} | "
              f"{r['step_gflops'] / r['step_s']:.0f} | {lat} | {r['peak_mb']:.0f} | {r['step_s'] / base['step_s']:.2f}× |")
    pairs = [(f, b) for f in rows for b in rows if f["path"] == "fast" and b["path"] == "baseline"
             and f["network"] == b["network"]]
    if pairs:
        print("\n| network | fast / baseline: step | " + " | ".join(f"latency b{b}" for b in bs) + " | peak memory |")
        print("|---|---|" + "---|" * len(bs) + "---|")
        for f, b in pairs:
            lat = " | ".join(f"{f['latency_s'][n] / b['latency_s'][n]:.2f}×" for n in bs)
            print(f"| {f['network']} | {f['step_s'] / b['step_s']:.2f}× | {lat} | {f['peak_mb'] / b['peak_mb']:.2f}× |")
    if peak:
        print("\n3×3 convolution (96 channels, 56², batch 8, forward), GFLOP/s on this machine: "
              + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))
        best = max(peak.values())
        for r in rows:
            achieved = r["step_gflops"] / r["step_s"]
            print(f"- {r['network']} {r['path']} step: {achieved:.0f} GFLOP/s = {achieved / best:.0%} of the best "
                  f"convolution figure ({r['step_gflops']:.1f} GFLOP per step)")


# -- fast path against fp32 on real images --------------------------------------------------------------------------

def inference_agreement(
    datalist: str | Path,
    ckpt: str | Path,
    split: str = "validation",
    network: str = "tmca",
    overrides: dict | None = None,
    limit: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Masks of the fast path (the config's precision and memory format) against the fp32 contiguous path, for
    the weights in ``ckpt`` on the ``split`` entries of ``datalist`` (train.yaml's deterministic transforms,
    batch 8): the share of pixels on which the thresholded masks agree, the images whose masks differ, and the
    per-image Dice of each path against the ground truth.
    """
    from monai.data import DataLoader, Dataset, load_decathlon_datalist
    from monai.metrics import DiceMetric
    from monai.transforms import Compose

    from scripts.precision import Autocast

    items = load_decathlon_datalist(str(datalist), True, split)[:limit]
    paths = {}
    weights = checkpoint_weights(ckpt)  # read once, loaded into both paths' networks
    for name in PATHS:
        parser = _path_parser(network, name, {"datalist": str(datalist), **(overrides or {})})
        net = fit_weights(parser.get_parsed_content("network"), weights, ckpt)
        net.float().eval()
        inferer = Autocast(parser.get_parsed_content("validate#inferer"), "cpu",
                           parser.get_parsed_content("compute_dtype"))
        paths[name] = (net, inferer, parser.get_parsed_content("prepare_batch"), _describe_path(parser))
    preprocessing = Compose(parser.get_parsed_content("train#deterministic_transforms"))
    loader = DataLoader(Dataset(items, preprocessing), batch_size=8, num_workers=0)
    agree = total = differing = 0
    dice = {k: DiceMetric(include_background=True, ignore_empty=False) for k in paths}
    seconds = dict.fromkeys(paths, 0.0)
    for batch in loader:
        masks = {}
        for name, (net, inferer, prepare, _) in paths.items():
            image, label, args, kwargs = prepare(batch, torch.device("cpu"))
            start = time.perf_counter()
            with torch.no_grad():
                masks[name] = torch.sigmoid(inferer(image, net, *args, **kwargs)) > 0.5
            seconds[name] += time.perf_counter() - start
            dice[name](masks[name].float(), label)
        same = masks["fast"] == masks["baseline"]
        agree += int(same.sum())
        total += same.numel()
        differing += int((~same).flatten(1).any(1).sum())
    result = {
        "images": len(items), "pixel_agreement": agree / total, "images_with_a_differing_pixel": differing,
        "dice_mean": {k: float(m.aggregate().mean()) for k, m in dice.items()},
        "forward_s": seconds, "paths": {k: v[3] for k, v in paths.items()},
    }
    log(f"{len(items)} images of {split}: masks agree on {result['pixel_agreement']:.4%} of pixels; "
        f"{differing} images differ in at least one pixel")
    for k in paths:
        log(f"  {k} ({result['paths'][k]}): dice_mean {result['dice_mean'][k]:.4f}, forward {seconds[k]:.1f} s")
    return result


# -- what each switch of the fast path is worth ---------------------------------------------------------------------

# each variant differs from the config's fast path in the settings named; "baseline" switches all of them off
SWITCH_VARIANTS: dict[str, dict] = {
    "fast": {},
    "fp32 (no autocast)": {"precision": "fp32"},
    "contiguous (no channels-last)": {"channels_last": False},
    "per-parameter AdamW (not fused)": {"optimizer#fused": False},
    "no text cache": {"text_cache": False},
    "baseline": {**BASELINE, "text_cache": False},
}


def switch_ablation(
    network: str = "tmca",
    size: int = 224,
    train_batch: int = 8,
    rounds: int = 6,
    compile_variant: bool = False,
    overrides: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """Median training-step seconds of the fast path, of each single switch turned off, and of the baseline, all
    built in this process and timed in interleaved rounds (each round runs every variant once), so that machine
    noise spreads over all of them alike. ``compile_variant`` adds ``compile=true`` and reports its first step
    (compilation) separately."""
    import statistics

    variants = dict(SWITCH_VARIANTS)
    if compile_variant:
        variants["compiled"] = {"compile": True}
    steps, first = {}, {}
    for name, settings in variants.items():
        settings = dict(settings)
        cache = settings.pop("text_cache", True)
        parser = _variant_parser(network, {**(overrides or {}), **settings}, text_cache=cache)
        steps[name] = _trainer_step(parser, _batch_maker(parser)(train_batch, size))
        start = time.perf_counter()
        steps[name]()
        first[name] = time.perf_counter() - start
        steps[name]()  # second warm-up step
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["baseline"])
    result = {}
    log(f"| variant of {network} (batch {train_batch}, {size}²) | step (s, median of {rounds}) | vs baseline | "
        "vs fast | first step (s) |")
    log("|---|---|---|---|---|")
    fast = statistics.median(times["fast"])
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"step_s": med, "first_step_s": first[name]}
        log(f"| {name} | {med:.3f} | {med / base:.2f}× | {med / fast:.2f}× | {first[name]:.1f} |")
    return result
