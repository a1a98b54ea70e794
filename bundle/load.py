"""The bundle's files as objects: configs into a ``ConfigParser``, a checkpoint's weights into a network.

Every verb of ``python -m bundle`` that builds something from the configs or loads weights goes through here, so
that they read the configs as ``monai.bundle run`` does (configs merged in order, ``configs/metadata.json`` as
``_meta_``, ``bundle_root`` set) and load weights under one contract (``scripts.weights``: ``weights_only``, a
bare state dict or the ``"model"`` entry of a training checkpoint, strict, and errors that name the file).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from scripts import BUNDLE_DIR
from scripts.weights import checkpoint_weights, fit_weights, load_checkpoint

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
