"""What a run prints: third-party messages that are not the user's business are kept out of it."""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["FreshStartFilter", "drop_fresh_start_line", "quiet_third_party"]


def quiet_third_party() -> None:
    """Silences messages a user of this bundle can do nothing about:

    - MONAI's nvImageCodec notice (a logger warning and a ``UserWarning``, each once per ``LoadImage``): the GPU
      DICOM decoder is optional, and pydicom's decoders read every file this bundle supports;
    - ``torch.meshgrid``'s ``indexing`` notice, raised inside MONAI's sin–cos position embedding;
    - transformers' "Loading weights" bar, drawn each time a local text or image encoder is read.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by transformers when it is imported
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")
    warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release")


class FreshStartFilter(logging.Filter):
    """Drops ignite's "Engine run resuming from iteration 0, ..." line: it starts every fresh run and every
    validation pass, so it says nothing; a real resume (iteration > 0) is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Engine run resuming from iteration 0,"))


def drop_fresh_start_line(logger: logging.Logger) -> None:
    """Adds :class:`FreshStartFilter` to an engine's logger once (engines of one class share their logger)."""
    if not any(isinstance(f, FreshStartFilter) for f in logger.filters):
        logger.addFilter(FreshStartFilter())
