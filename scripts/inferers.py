"""Inferers that can carry a report to the network when the caller passes only the image (MONAI Label)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import SimpleInferer

from scripts.transforms import ReportToTemplate, TokenizeReport

__all__ = ["ReportInferer"]


class ReportInferer(SimpleInferer):
    """``network(inputs, text_ids=..., text_mask=...)`` with a fixed report when the caller gives no text.

    The bundle's workflows hand each sample's own report to the inferer as keyword arguments
    (``scripts.engine.ReportPrepareBatch``); those always win. MONAI Label calls ``inferer(image, network)`` only,
    so a report typed in its client reaches the network through ``displayable_configs#report`` and this inferer.
    An empty report means image-only inference (the networks' learned no-report path).

    Args:
        report: the report for calls without text keywords; ``""`` for none.
        tokenizer: the tokenizer the preprocessing's ``TokenizeReportd`` uses (``@tokenizer`` in the configs), so a
            report typed in MONAI Label gets the ids the same report in a datalist gets. None: ``TokenizeReport()``.
        report_to_template: the converter the preprocessing's ``ReportToTemplated`` uses (``@report_to_template``),
            so a report typed in MONAI Label is written in the training template as a datalist's is. None: the
            report is used as typed.
    """

    def __init__(
        self,
        report: str = "",
        tokenizer: TokenizeReport | None = None,
        report_to_template: ReportToTemplate | None = None,
    ) -> None:
        super().__init__()
        self.report = report or ""
        self.tokenize = tokenizer if tokenizer is not None else TokenizeReport()
        self.report_to_template = report_to_template

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """
        Args:
            inputs: B×C×H×W images.
            network: the network; called with the report's B×L ``text_ids``/``text_mask`` when the call brings no
                text of its own and a report is set.
        """
        report = self.report if "text_ids" not in kwargs else ""
        if report.strip() and self.report_to_template is not None:
            report = self.report_to_template(report, "the inferer's report (MONAI Label)")
        if report.strip():
            ids, mask = self.tokenize(report)
            batch = inputs.shape[0]
            kwargs["text_ids"] = ids[None].expand(batch, -1).to(inputs.device)
            kwargs["text_mask"] = mask[None].expand(batch, -1).to(inputs.device)
        return super().__call__(inputs, network, *args, **kwargs)
