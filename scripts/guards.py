"""Training guards: a non-finite loss skips its step (counted, logged, the run stopped after too many in a row),
and weights that are no longer finite stop the run before anything is saved.

Without them one NaN pixel or one unstable step turns every weight NaN, the run exits 0 and ``model.pt`` is
overwritten with NaN weights.
"""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from monai.engines import IterationEvents
from monai.utils import CommonKeys as Keys

__all__ = ["NonFiniteLossGuard", "FiniteWeightsGuard"]

logger = logging.getLogger(__name__)


def _skips_on_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours an ``optimizer.found_inf`` tensor on the device (PyTorch's fused
    Adam/AdamW/SGD, as ``GradScaler`` uses them): the step is then skipped without waiting for the device."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(
        optimizer.defaults.get("fused", False)
    )


class NonFiniteLossGuard:
    """Skips the optimizer step of every iteration whose loss is NaN or ±Inf, counts the skips, logs them, and
    stops the run when ``max_consecutive`` iterations in a row were skipped.

    With a fused optimizer (the configs' AdamW) the skip happens on the device through the optimizer's
    ``found_inf`` (as ``torch.amp.GradScaler`` does), so no iteration waits for the device; the count is read every
    ``log_every`` iterations and at each epoch's end. With another optimizer each iteration checks its loss on the
    host. MONAI's fp16 path (a gradient scaler) skips such steps by itself; the guard then still counts them.

    Args:
        max_consecutive: skipped iterations in a row that stop the run (``RuntimeError``).
        log_every: iterations between two readings of the count.
    """

    def __init__(self, max_consecutive: int = 10, log_every: int = 10) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive, self.log_every = int(max_consecutive), max(int(log_every), 1)
        self.skipped: torch.Tensor | None = None  # on the device: all skips, and the current run of them
        self.consecutive: torch.Tensor | None = None
        self.reported = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.before_step)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.after_step)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.log_every) | Events.EPOCH_COMPLETED, self.check)

    def before_step(self, engine: Engine) -> None:
        loss = engine.state.output[Keys.LOSS].detach()
        bad = (~torch.isfinite(loss)).to(torch.float32).reshape(())
        if self.skipped is None:
            self.skipped, self.consecutive = torch.zeros_like(bad), torch.zeros_like(bad)
        self.skipped += bad
        self.consecutive = (self.consecutive + 1) * bad
        optimizer = engine.optimizer
        if _skips_on_found_inf(optimizer):
            optimizer.found_inf = bad
        elif bool(bad):  # a host check: this optimizer cannot skip on the device
            optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are not stepped

    def after_step(self, engine: Engine) -> None:
        if hasattr(engine.optimizer, "found_inf"):
            del engine.optimizer.found_inf

    def check(self, engine: Engine) -> None:
        if self.skipped is None:
            return
        total = int(self.skipped.item())
        if total > self.reported:
            logger.warning(
                "%d training iteration(s) skipped for a non-finite loss (%d in this run, up to iteration %d)",
                total - self.reported, total, engine.state.iteration,
            )
            self.reported = total
        in_a_row = int(self.consecutive.item())
        if in_a_row >= self.max_consecutive:
            raise RuntimeError(
                f"{in_a_row} training iterations in a row had a non-finite loss (up to iteration "
                f"{engine.state.iteration}); stopped. Look for non-finite inputs, or lower the learning rate."
            )


class FiniteWeightsGuard:
    """Stops the run at the end of an epoch, before validation and before any checkpoint of that epoch is written,
    when a weight of the network is NaN or ±Inf: a checkpoint with such weights must never replace ``model.pt``.
    Attach it before the validation handler and the checkpoint savers.

    Args:
        network: the trained network.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        bad = [n for n, p in self.network.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise RuntimeError(
                f"epoch {engine.state.epoch}: {len(bad)} weight tensor(s) are not finite (first: {bad[0]}); stopped "
                "before validation and before saving, so the checkpoints on disk are those of the last good epoch"
            )
