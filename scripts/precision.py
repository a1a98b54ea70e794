"""The compute path of a run: autocast precision and memory format, chosen once from what the device supports.

``configs/train.yaml`` and ``configs/inference.yaml`` ask :func:`autocast_dtype` once (``precision: auto``); the
engines of :mod:`scripts.engine` then run the forward pass under :class:`Autocast`. Measured gains and the
accuracy check behind these defaults: ``docs/performance.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

__all__ = [
    "PRECISIONS", "Autocast", "autocast_dtype", "cpu_supports_bf16", "describe", "memory_format", "set_cudnn_benchmark",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (AVX-512 BF16 or AMX), which oneDNN uses for bf16
    convolutions and matrix products. Without them bf16 is emulated and slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def autocast_dtype(device: str | torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``device`` (None: plain fp32), logging once which path runs and why.

    Args:
        device: where the network runs.
        precision: ``auto`` picks bf16 where the device computes it natively (a CPU with AVX-512 BF16 or AMX, a
            CUDA device of compute capability 8.0 or newer), fp16 on older CUDA devices (the trainer then scales
            the loss) and fp32 elsewhere; ``bf16``, ``fp16`` and ``fp32`` force one.

    Raises:
        ValueError: an unknown ``precision``, or fp16 on a CPU (no fp16 autocast path for training there).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = _device(device)
    if precision == "auto":
        if dev.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            why = f"CUDA device {torch.cuda.get_device_name(dev)}"
        elif dev.type == "cpu" and cpu_supports_bf16():
            dtype, why = torch.bfloat16, "the CPU has native bf16 (AVX-512 BF16 or AMX)"
        else:
            dtype, why = None, f"no native bf16 on {dev.type}"
    else:
        dtype, why = _DTYPES[precision], f"precision={precision} in the config"
        if dtype is torch.float16 and dev.type != "cuda":
            raise ValueError("precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    logger.info("compute path on %s: %s (%s)", dev, describe(dtype), why)
    return dtype


def describe(dtype: torch.dtype | None) -> str:
    """``'bf16 autocast'``, ``'fp16 autocast'`` or ``'fp32'``."""
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype] + " autocast"


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` or ``torch.contiguous_format``, for ``Module.to`` and the batch's images."""
    return torch.channels_last if channels_last else torch.contiguous_format


def _to_float32(x: Any) -> Any:
    return x.float() if torch.is_tensor(x) and x.is_floating_point() and x.dtype != torch.float32 else x


class Autocast:
    """Runs a callable (an inferer: ``inferer(inputs, network, *args, **kwargs)``) under autocast and hands its
    floating outputs back in float32.

    The boundary cast keeps what follows the forward pass (losses, sigmoid and threshold, metrics, saved maps) in
    fp32, whatever precision the network computed in: a Dice or BCE reduction over 50k pixels in bf16 loses
    digits. MONAI's engines autocast only on CUDA (``torch.autocast("cuda")``); this covers the CPU too.

    Args:
        fn: the wrapped callable.
        device_type: ``"cpu"`` or ``"cuda"``.
        dtype: the autocast dtype; None calls ``fn`` unchanged.
    """

    def __init__(self, fn: Callable, device_type: str, dtype: torch.dtype | None) -> None:
        self.fn, self.device_type, self.dtype = fn, device_type, dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.dtype is None:
            return self.fn(*args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.fn(*args, **kwargs)
        return tree_map(_to_float32, out)

    def __getattr__(self, name: str) -> Any:
        # an inferer's own attributes (ReportInferer's report, roi sizes) stay reachable through the wrapper
        if name in ("fn", "device_type", "dtype"):
            raise AttributeError(name)
        return getattr(self.fn, name)


def set_cudnn_benchmark(enabled: bool) -> None:
    """cuDNN autotuning on CUDA (fastest convolution algorithms for fixed input sizes, at the price of bitwise
    reproducibility); it must run after ``monai.utils.set_determinism``, which turns it off."""
    if enabled and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
