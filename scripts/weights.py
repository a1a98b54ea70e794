"""Network weights from checkpoint files, under one contract: ``weights_only``, a bare state dict or the ``"model"``
entry of a training checkpoint, strict, and errors that name the file.

Used by the tooling (``bundle.load``) and by the MLflow model logger; ``scripts.engine.ResumeLoader`` is not built
on this: it is a MONAI ``CheckpointLoader`` handler that restores network, optimizer, scheduler and trainer together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["checkpoint_weights", "fit_weights", "load_checkpoint"]

PathLike = str | os.PathLike


def checkpoint_weights(path: PathLike, map_location: str | torch.device = "cpu") -> Mapping[str, Any]:
    """The network weights that the checkpoint file ``path`` holds: the file's state dict, or the ``"model"``
    entry of a training checkpoint (network, optimizer, scheduler and trainer state, as ``CheckpointSaver`` writes
    it). Read with ``weights_only=True``: a checkpoint is data, never code to run.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not a PyTorch checkpoint, or holds something other than network weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # torch.load's own errors do not name the file, and some say nothing useful (a text file: KeyError '101')
        raise ValueError(f"checkpoint {path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not (isinstance(state, Mapping) and all(isinstance(k, str) for k in state)):
        raise ValueError(
            f"checkpoint {path}: holds a {type(state).__name__}, not network weights (a state dict, or a training "
            "checkpoint with a 'model' entry)"
        )
    return state


def fit_weights(network: torch.nn.Module, weights: Mapping[str, Any], source: PathLike) -> torch.nn.Module:
    """Loads ``weights`` (read from ``source``, which the error names) into ``network`` strictly, as the configs'
    ``CheckpointLoader`` does: every key must match. Frozen text-encoder weights are left out of checkpoints by
    design, and the encoder's load hook accounts for them. Returns ``network``.

    Raises:
        RuntimeError: the weights do not fit ``network`` (missing or unexpected keys, shapes that differ).
    """
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"checkpoint {source}: does not fit {type(network).__name__}: {e}") from e
    return network


def load_checkpoint(
    network: torch.nn.Module, path: PathLike, map_location: str | torch.device = "cpu"
) -> torch.nn.Module:
    """``network`` with the weights of the checkpoint file ``path`` (:func:`checkpoint_weights`, then
    :func:`fit_weights`); tensors are read onto ``map_location``. Lower-precision weights (e.g. float16) load into a
    float32 network as float32.

    Raises:
        FileNotFoundError, ValueError, RuntimeError: as :func:`checkpoint_weights` and :func:`fit_weights`, each
        naming ``path`` and what is wrong with it.
    """
    return fit_weights(network, checkpoint_weights(path, map_location), path)
