"""Health of TMCA's contrastive alignment on the validation set, every validation epoch, next to the Dice.

A contrastive term can sit at its chance value for a whole run and still be summed into the loss: then it is
noise. This handler makes that visible: per alignment level, the validation InfoNCE against its chance value,
report retrieval (does a lesion's target embedding find its own report among all distinct validation reports?)
against the most-common-report prior, and laterality (does the retrieved report name the same side?) against the
majority-side prior. The figures land in ``engine.state.metrics`` (``val_align_*``), where the validation MLflow
handler logs them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from scripts.zones import report_zones

__all__ = ["AlignmentHealth", "alignment_health"]

logger = logging.getLogger(__name__)


def _sides(text: str | None) -> tuple[bool, bool] | None:
    """(left named, right named) of a report, None when it names no location."""
    zones = report_zones(text) if text else None
    return None if zones is None else (bool(zones[0].any()), bool(zones[1].any()))


def alignment_health(
    targets: torch.Tensor, reports: torch.Tensor, keys: list[Hashable], texts: list[str], temperature: float = 0.07
) -> dict[str, float]:
    """The health figures of one level from per-sample embeddings.

    Args:
        targets: N×d image embeddings of the samples that take part: masked means under the lesion (target
            embeddings), or whole-image means for a network trained without the target.
        reports: N×d their reports' embeddings.
        keys: N hashable report identities (equal for equal reports).
        texts: N report texts (for laterality).
        temperature: τ of the logits, as in training.

    Returns:
        ``loss`` (InfoNCE of each target against every distinct report), ``chance`` (ln of the number of distinct
        reports), ``top1`` and ``top1_prior`` (share of the most common report), ``laterality`` and
        ``laterality_prior`` over the samples whose report names one side only (NaN without any).
    """
    bank_index: dict[Hashable, int] = {}
    for i, k in enumerate(keys):
        bank_index.setdefault(k, i)
    first = list(bank_index.values())
    own = torch.tensor([first.index(bank_index[k]) for k in keys])
    logits = F.normalize(targets.float(), dim=1) @ F.normalize(reports[first].float(), dim=1).T / temperature
    found = logits.argmax(dim=1)
    counts = np.unique([first.index(bank_index[k]) for k in keys], return_counts=True)[1]
    out = {
        "loss": float(F.cross_entropy(logits, own)),
        "chance": math.log(len(first)),
        "top1": float((found == own).float().mean()),
        "top1_prior": float(counts.max() / len(keys)),
    }
    sides = [_sides(t) for t in texts]
    bank_sides = [sides[i] for i in first]
    one_sided = [i for i, s in enumerate(sides) if s is not None and s[0] != s[1]]
    if one_sided:
        right = sum(sides[i][1] for i in one_sided)
        out["laterality"] = float(np.mean([bank_sides[int(found[i])] == sides[i] for i in one_sided]))
        out["laterality_prior"] = max(right, len(one_sided) - right) / len(one_sided)
    else:
        out["laterality"] = out["laterality_prior"] = float("nan")
    return out


class AlignmentHealth:
    """Validation handler: TMCA's alignment health per level, into ``engine.state.metrics`` as
    ``val_align_{loss,top1,laterality}_s<stride>`` and the levels' shared ``val_align_{chance,top1_prior,
    laterality_prior}``.

    Runs the network's encoder and alignment heads once more per validation batch (no decoder; float32, no
    gradient) and pools each level's image embeddings as the training loss does: under the ground truth (samples
    without a report or without a lesion take no part), or over the whole image where the loss is not
    target-sensitive (samples without a report take no part). Attach it before the tracking handlers of the
    evaluator. Under DDP each rank sees its own shard; the rank that logs reports its shard.

    Args:
        network: the TMCA module (``network_def``, not a DDP wrapper), with ``alignment_embeddings``.
        report_key: the batch key of the report text; its ``_ids``/``_mask`` keys hold the tokens.
        temperature: τ of the logits, as the training loss's.
        target_sensitive: the training loss's switch (:func:`scripts.losses.tmca.alignment_loss`); pooling
            otherwise than the loss would measure an objective the network was never trained on.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        report_key: str = "report",
        temperature: float = 0.07,
        target_sensitive: bool = True,
    ) -> None:
        self.network = network
        self.report_key = report_key
        self.temperature = float(temperature)
        self.target_sensitive = bool(target_sensitive)
        self._rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._keys: list[Hashable] = []
        self._texts: list[str] = []

    def attach(self, engine: Engine) -> None:
        if not getattr(self.network, "alignment_levels", ()):
            logger.info("alignment health: the network has no alignment levels; nothing to measure")
            return
        logger.info("alignment health: image embeddings pooled %s, as the training loss pools them",
                    "under the ground truth" if self.target_sensitive else "over the whole image")
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        # after the forward pass, while engine.state.batch and .output are still collated (MONAI decollates them
        # at MODEL_COMPLETED)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.compute)

    def reset(self, engine: Engine | None = None) -> None:
        self._rows, self._keys, self._texts = {}, [], []

    def update(self, engine: Engine) -> None:
        batch = engine.state.batch
        key = self.report_key
        if f"{key}_ids" not in batch or engine.state.output.get("label") is None:
            return
        image, label = engine.state.output["image"], engine.state.output["label"]  # on the device already
        ids, mask = batch[f"{key}_ids"].to(image.device), batch[f"{key}_mask"].to(image.device)
        texts = batch.get(key) or [""] * len(ids)
        was_training = self.network.training
        self.network.eval()
        try:
            levels = self.network.alignment_embeddings(image.as_subclass(torch.Tensor), ids, mask)
        finally:
            self.network.train(was_training)
        take = None
        for stride, (pixels, report) in levels.items():
            if self.target_sensitive:
                weight = F.interpolate(label.float(), size=pixels.shape[-2:], mode="area")[:, 0]
            else:
                weight = torch.ones_like(pixels[:, 0], dtype=torch.float32)
            area = weight.sum(dim=(1, 2))
            if take is None:
                take = (mask.bool().any(dim=1) & (area > 0)).cpu()
            target = torch.einsum("bdhw,bhw->bd", pixels.float(), weight) / area.clamp_min(1e-6)[:, None]
            self._rows.setdefault(stride, []).append((target.cpu()[take], report.float().cpu()[take]))
        for i in take.nonzero()[:, 0].tolist():
            self._keys.append(tuple(ids[i][mask[i].bool()].tolist()))
            self._texts.append(str(texts[i]))

    def compute(self, engine: Engine) -> None:
        if not self._keys:
            logger.warning("alignment health: no validation sample with a report and a lesion; nothing measured")
            return
        metrics: dict[str, Any] = engine.state.metrics
        for stride, rows in sorted(self._rows.items()):
            targets = torch.cat([r[0] for r in rows])
            reports = torch.cat([r[1] for r in rows])
            h = alignment_health(targets, reports, self._keys, self._texts, self.temperature)
            for name in ("loss", "top1", "laterality"):
                metrics[f"val_align_{name}_s{stride}"] = h[name]
            for name in ("chance", "top1_prior", "laterality_prior"):
                metrics[f"val_align_{name}"] = h[name]
        logger.info(
            "alignment health (chance %.3f, top-1 prior %.3f): %s", metrics["val_align_chance"],
            metrics["val_align_top1_prior"],
            ", ".join(f"s{s} loss {metrics[f'val_align_loss_s{s}']:.3f} top-1 {metrics[f'val_align_top1_s{s}']:.3f}"
                      for s in sorted(self._rows)),
        )
