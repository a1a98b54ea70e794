"""``python -m bundle device-check``: a fixed number of TMCA training steps at the papers' size, with the figures
that say whether a GPU is kept fed (``bundle/device_check.sh`` runs it on a lent GPU machine; docs/performance.md).

The trainer is ``configs/train.yaml``'s own (``train#trainer``: data loader, batch preparation, autocast, loss,
optimizer), without validation, checkpoints or tracking. Per iteration it records the time spent waiting for the
next batch (Ignite's ``GET_BATCH_STARTED`` → ``GET_BATCH_COMPLETED``) and the iteration's wall time, synchronising
the device at the end of each iteration so that the wait is time the device sat idle.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["CheckResult", "device_check", "prepare_payload", "format_results"]


@dataclass
class CheckResult:
    """Figures of one device check run (times in seconds, memory in MiB)."""

    device: str
    compute: str
    workers: int
    batch_size: int
    steps: int
    timed_steps: int
    samples_per_s: float
    step_s: float
    data_wait_fraction: float
    peak_gpu_mb: float
    loss_first: float
    loss_last: float
    setup_s: float


def device_check(
    datalist: str | os.PathLike,
    steps: int = 60,
    warmup: int = 10,
    batch_size: int = 32,
    workers: Sequence[int] = (8,),
    encoder_size: str = "tiny",
    size: int = 224,
    device: str | None = None,
    text_encoder_dir: str | None = None,
    overrides: dict | None = None,
    log: Callable[[str], None] = print,
) -> list[CheckResult]:
    """Trains TMCA for ``steps`` iterations per loader worker count and measures each run.

    Args:
        datalist: a datalist JSON with a ``training`` list (QaTa-COV19's train split).
        steps: iterations per run (the data loader restarts when the list is shorter).
        warmup: first iterations left out of the timings (worker start-up, cuDNN autotuning, cache misses).
        batch_size, encoder_size, size: the papers' setting by default (32, ConvNeXt-Tiny, 224²).
        workers: loader worker counts to compare.
        device: default: the config's (``cuda:0`` when available).
        text_encoder_dir: a local text encoder folder (default: the config's).
        overrides: further config overrides.
    """
    from ignite.engine import Events
    from monai.handlers import from_engine

    from bundle.bench import network_parser
    from scripts.precision import describe

    if steps <= warmup:
        raise ValueError(f"steps ({steps}) must exceed warmup ({warmup})")
    datalist = _covering_datalist(datalist, steps * batch_size, log)
    results = []
    for w in workers:
        start = time.perf_counter()
        settings = {
            "datalist": str(Path(datalist).resolve()), "batch_size": batch_size, "image_encoder_size": encoder_size,
            "spatial_size": [size, size], "num_workers": w, "train#handlers": [], "train#key_metric": None,
            "train#trainer#epoch_length": steps, "max_epochs": 1, **(overrides or {}),
        }
        if text_encoder_dir:
            settings["text_encoder_dir"] = str(text_encoder_dir)
        if device:
            settings["device"] = f"$torch.device('{device}')"
        parser = network_parser("tmca", settings)
        if not device:
            parser["device"] = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
        parser.get_parsed_content("initialize")  # seeds, cuDNN autotuning, as `run training` does first
        trainer = parser.get_parsed_content("train#trainer")
        dev = torch.device(parser.get_parsed_content("device"))
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        wait, iter_end, losses = [], [], []
        marks: dict[str, float] = {}
        loss_of = from_engine(["loss"], first=True)

        @trainer.on(Events.GET_BATCH_STARTED)
        def _get_started(engine) -> None:
            marks["get"] = time.perf_counter()

        @trainer.on(Events.GET_BATCH_COMPLETED)
        def _get_completed(engine) -> None:
            wait.append(time.perf_counter() - marks["get"])

        @trainer.on(Events.ITERATION_COMPLETED)
        def _iteration_completed(engine) -> None:
            sync()
            iter_end.append(time.perf_counter())
            if engine.state.iteration in (1, steps):  # the two loss readings (each a host sync)
                losses.append(float(loss_of(engine.state.output)))

        @trainer.on(Events.STARTED)
        def _started(engine) -> None:
            marks["setup_done"] = time.perf_counter()

        trainer.run()
        # iteration i's wall time runs from the end of iteration i-1 (batch fetch included) to its own end
        step_times = [b - a for a, b in zip(iter_end[warmup - 1 :], iter_end[warmup:])]
        timed_wait = wait[warmup:]
        n = len(step_times)
        total = sum(step_times)
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else math.nan
        result = CheckResult(
            device=str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
            compute=describe(parser.get_parsed_content("compute_dtype"))
            + (", channels-last" if parser.get_parsed_content("channels_last") else ""),
            workers=w, batch_size=batch_size, steps=steps, timed_steps=n,
            samples_per_s=n * batch_size / total if total else math.nan,
            step_s=statistics.median(step_times) if step_times else math.nan,
            data_wait_fraction=sum(timed_wait) / total if total else math.nan,
            peak_gpu_mb=peak, loss_first=losses[0], loss_last=losses[-1],
            setup_s=marks["setup_done"] - start,
        )
        log(format_results([result], header=not results))
        results.append(result)
        del trainer, parser
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _covering_datalist(datalist: str | os.PathLike, needed: int, log: Callable[[str], None]) -> Path:
    """``datalist`` itself, or a copy beside it whose training list is repeated to ``needed`` entries, so that the
    timed steps are one pass of the loader (a restart every few batches would show up as data wait)."""
    path = Path(datalist)
    content = json.loads(path.read_text())
    training = content.get("training", [])
    if not training:
        raise ValueError(f"{path}: no training entries")
    if len(training) >= needed:
        return path
    content["training"] = [training[i % len(training)] for i in range(needed)]
    out = path.with_name(path.stem + "_repeated.json")
    out.write_text(json.dumps(content))
    log(f"{path}: {len(training)} training entries, repeated to {needed} to cover the steps ({out})")
    return out


def format_results(results: list[CheckResult], header: bool = True) -> str:
    """Markdown rows of the check's figures."""
    lines = []
    if header:
        lines += ["| device | compute | workers | batch | steps (timed) | samples/s | step (s, median) | data wait | "
                  "peak GPU memory (MiB) | loss first → last | set-up (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        peak = "n/a" if math.isnan(r.peak_gpu_mb) else f"{r.peak_gpu_mb:.0f}"
        lines.append(f"| {r.device} | {r.compute} | {r.workers} | {r.batch_size} | {r.steps} ({r.timed_steps}) | "
                     f"{r.samples_per_s:.1f} | {r.step_s:.3f} | {r.data_wait_fraction:.1%} | {peak} | "
                     f"{r.loss_first:.3f} → {r.loss_last:.3f} | {r.setup_s:.0f} |")
    return "\n".join(lines)


def write_json(results: list[CheckResult], path: str | os.PathLike) -> None:
    from bundle.bench import machine
    from scripts.io import atomic_write_text

    atomic_write_text(path, json.dumps({"machine": machine(), "results": [asdict(r) for r in results]}, indent=2))


# -- the payload a bare GPU machine needs ---------------------------------------------------------------------------

# what the lent machine's Python lacks (its image has torch and transformers); pure-Python wheels
# (PNG training imports neither nibabel nor pydicom: scripts/dicom.py imports pydicom only for DICOM files)
PAYLOAD_PACKAGES = ("monai==1.6.1", "pytorch-ignite==0.5.5")


def prepare_payload(out: str | os.PathLike, qata_dir: str | os.PathLike, num_images: int = 128,
                    python_version: str = "3.12") -> Path:
    """Writes what ``bundle/device_check.sh`` needs on a machine that has PyTorch but nothing else of ours, within
    the device tool's 64 MiB together with the repository (~11 MB): pure-Python wheels of
    :data:`PAYLOAD_PACKAGES` (2 MB), the default text encoder with its weights stored in float16 (45 MB; they load
    back as float32), and the first ``num_images`` QaTa-COV19 training images with masks and reports in the
    bundle's ``folder`` layout (4 MB for 128; :func:`device_check` repeats a short list to cover its steps).
    """
    from transformers import AutoModel, AutoTokenizer

    from scripts.text import default_text_encoder_dir

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    wheels = out / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "-d", str(wheels), *PAYLOAD_PACKAGES], check=True)
    src = default_text_encoder_dir()
    model = AutoModel.from_pretrained(src).half()
    model.save_pretrained(out / "text_encoder")
    AutoTokenizer.from_pretrained(src).save_pretrained(out / "text_encoder")
    qata = Path(qata_dir)
    ids = json.loads((qata / "split.json").read_text())["train"][:num_images]
    for sub, suffix in (("images", ".png"), ("masks", ".png"), ("reports", ".txt")):
        (out / "qata" / sub).mkdir(parents=True)
        for sid in ids:
            shutil.copy2(qata / sub / f"{sid}{suffix}", out / "qata" / sub / f"{sid}{suffix}")
    (out / "qata" / "split.json").write_text(json.dumps({"train": ids}))
    return out
