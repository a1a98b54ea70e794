"""The bundle's files as objects: configs into a ``ConfigParser``, a checkpoint's weights into a network.

Every verb of ``python -m bundle`` that builds something from the configs or loads weights goes through here, so
that they read the configs as ``monai.bundle run`` does (configs merged in order, ``configs/metadata.json`` as
``_meta_``, ``bundle_root`` set) and load weights under one contract: ``weights_only``, a bare state dict or the
``"model"`` entry of a training checkpoint, strict, and errors that name the file.

``scripts.engine.ResumeLoader`` is not built on this: it is a MONAI ``CheckpointLoader`` handler that restores
network, optimizer, scheduler and trainer together inside a workflow, and ``scripts`` does not import ``bundle``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from scripts import BUNDLE_DIR

__all__ = ["BUNDLE_ROOT", "bundle_parser", "checkpoint_weights", "fit_weights", "load_checkpoint"]

BUNDLE_ROOT: Path = BUNDLE_DIR
"""The bundle folder this tooling belongs to (``configs/``, ``models/``, ``scripts/``)."""

PathLike = str | os.PathLike


def bundle_parser(
    config_files: PathLike | Sequence[PathLike],
    overrides: Mapping[str, Any] | None = None,
    root: PathLike = BUNDLE_ROOT,
) -> ConfigParser:
    """A ``ConfigParser`` of ``config_files`` (merged in order, later files win) with ``root``'s
    ``configs/metadata.json`` as ``_meta_``, ``bundle_root`` set to ``root`` and then ``overrides`` by id (so an
    override may replace ``bundle_root`` too), as ``monai.bundle run`` builds it. Nothing is instantiated.
    """
    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.read_meta(str(Path(root) / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(root), **(overrides or {})})
    return parser


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
