"""Inferers that can carry a report to the network when the caller passes only the image (MONAI Label)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import SimpleInferer

from scripts.transforms import TokenizeReport

__all__ = ["ReportInferer"]


class ReportInferer(SimpleInferer):
    """``network(inputs, text_ids=..., text_mask=...)`` with a fixed report when the caller gives no text.

    The bundle's workflows hand each sample's own report to the inferer as keyword arguments
    (``scripts.engine.ReportPrepareBatch``); those always win. MONAI Label calls ``inferer(image, network)`` only,
    so a report typed in its client reaches the network through ``displayable_configs#report`` and this inferer.
    An empty report means image-only inference (the networks' learned no-report path).

    Args:
        report: the report for calls without text keywords; ``""`` for none.
        tokenizer_dir: the text encoder's folder (None: the bundled MiniLM), as in ``TokenizeReportd``.
        max_length: tokens per report, as in ``TokenizeReportd``.
    """

    def __init__(self, report: str = "", tokenizer_dir: str | os.PathLike | None = None, max_length: int = 24) -> None:
        super().__init__()
        self.report = report or ""
        self.tokenize = TokenizeReport(tokenizer_dir, max_length) if self.report.strip() else None

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """
        Args:
            inputs: B×C×H×W images.
            network: the network; called with the report's B×L ``text_ids``/``text_mask`` when the call brings no
                text of its own and a report is set.
        """
        if self.tokenize is not None and "text_ids" not in kwargs:
            ids, mask = self.tokenize(self.report)
            batch = inputs.shape[0]
            kwargs["text_ids"] = ids[None].expand(batch, -1).to(inputs.device)
            kwargs["text_mask"] = mask[None].expand(batch, -1).to(inputs.device)
        return super().__call__(inputs, network, *args, **kwargs)
