"""The trained network as an MLflow model, logged into the training's run ("Logged models" in the MLflow UI).

MLflow's own ``mlflow.pytorch.log_model`` in its ``pt2`` format: ``torch.export`` of the network with its three
inputs, so loading it back (``mlflow.pytorch.load_model``) runs no pickled code and needs neither this package nor
the text encoder's folder (the frozen encoder is part of the exported graph). The signature names the inputs and
output with their shapes and dtypes:

- ``image``: B×C×H×W float32 in [0, 1] (the inference preprocessing: min-max scaled, resized to ``spatial_size``);
- ``text_ids``, ``text_mask``: B×L int64, the report tokenised by the bundle's ``tokenizer`` (an all-zero
  ``text_mask`` row: no report, the image-only path);
- ``pred``: B×1×H×W float32 logits (``sigmoid > 0.5`` is lesion).

A network whose ``forward`` takes the image alone (MONAI's ``UNet``) is logged with the ``image`` input only. SSA
cannot be exported (its zone guidance parses the report's tokens on the host); its run gets the tag
``model_not_logged`` with the reason instead (:class:`scripts.engine.ResumableMLFlowHandler`).
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from scripts.weights import load_checkpoint

__all__ = ["EXAMPLE_REPORT", "INPUT_NAMES", "example_inputs", "model_signature", "NetworkModelLogger"]

logger = logging.getLogger(__name__)

INPUT_NAMES = ("image", "text_ids", "text_mask")
# a QaTa-COV19 report, the input example's first row
EXAMPLE_REPORT = "bilateral pulmonary infection, two infected areas, all left lung and middle lower right lung."


def model_signature(in_channels: int, spatial_size: Sequence[int], max_tokens: int | None) -> Any:
    """MLflow ``ModelSignature`` of the network: ``image``, ``text_ids``, ``text_mask`` → ``pred`` (shapes above; the
    batch axis free); ``max_tokens`` None: ``image`` alone."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    h, w = (int(s) for s in spatial_size)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, in_channels, h, w), "image")] + ([
            TensorSpec(np.dtype(np.int64), (-1, max_tokens), "text_ids"),
            TensorSpec(np.dtype(np.int64), (-1, max_tokens), "text_mask"),
        ] if max_tokens is not None else [])),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, h, w), "pred")]),
    )


def example_inputs(
    tokenizer: Callable[[str | None], tuple[torch.Tensor, torch.Tensor]],
    in_channels: int,
    spatial_size: Sequence[int],
    report: str = EXAMPLE_REPORT,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two rows of ``(image, text_ids, text_mask)``: a seeded random image with ``report``, and the same image
    without one. Two rows, because ``torch.export`` fixes an axis of size 1: a batch of 2 keeps the batch axis free.

    Args:
        tokenizer: the bundle's ``TokenizeReport`` (``report`` → L token ids and mask).
    """
    ids, mask = (torch.as_tensor(t).long().reshape(-1) for t in tokenizer(report))
    image = torch.rand((1, in_channels, *(int(s) for s in spatial_size)), generator=torch.Generator().manual_seed(0))
    return (
        image.repeat(2, 1, 1, 1).numpy(),
        torch.stack([ids, torch.zeros_like(ids)]).numpy(),
        torch.stack([mask, torch.zeros_like(mask)]).numpy(),
    )


class NetworkModelLogger:
    """Logs the best weights of a training (``weights``, its ``model.pt``) in ``network`` as an MLflow model of a run.

    Called by :class:`scripts.engine.ResumableMLFlowHandler` with its run when the training completes, before the run
    is closed. The network is copied onto the CPU in float32 and eval mode, so the training's own network is left as
    it is.

    Args:
        network: the network the weights are for (not DDP-wrapped).
        weights: the weights file (a state dict or a training checkpoint); a missing file is logged and skipped.
        tokenizer: the bundle's ``TokenizeReport``, for the input example.
        in_channels: C of the network's image input.
        spatial_size: H, W of the network's input.
        name: the model's name in the run.
        registered_model_name: also register it under this name in the model registry (None: not registered).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        weights: str | os.PathLike,
        tokenizer: Callable[[str | None], tuple[torch.Tensor, torch.Tensor]],
        in_channels: int,
        spatial_size: Sequence[int],
        name: str = "model",
        registered_model_name: str | None = None,
    ) -> None:
        self.network = network
        self.weights = weights
        self.tokenizer = tokenizer
        self.in_channels = int(in_channels)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.name = name
        self.registered_model_name = registered_model_name

    def __call__(self, run_id: str, tracking_uri: str) -> Any:
        """Logs the model into run ``run_id`` of ``tracking_uri``; returns MLflow's ``ModelInfo`` (None: skipped)."""
        import mlflow

        if not os.path.isfile(self.weights):
            logger.warning("MLflow model not logged: no weights file %s (no validation ran?)", self.weights)
            return None
        net = copy.deepcopy(self.network).to("cpu", torch.float32, memory_format=torch.contiguous_format)
        net = load_checkpoint(net, self.weights).eval()
        inputs = example_inputs(self.tokenizer, self.in_channels, self.spatial_size)
        takes_report = len(inspect.signature(net.forward).parameters) >= len(INPUT_NAMES)
        inputs = inputs if takes_report else inputs[:1]
        signature = model_signature(self.in_channels, self.spatial_size, inputs[1].shape[1] if takes_report else None)
        with torch.no_grad():
            net(*(torch.from_numpy(x) for x in inputs))  # eager first: caches built on real tensors, not export's
        # log_model reads the global tracking URI, and set_tracking_uri also exports it as MLFLOW_TRACKING_URI,
        # which MONAI's MLFlowHandler puts before its own tracking_uri: restoring get_tracking_uri()'s value (the
        # default ./mlflow.db when none was set) would send every later MLflow handler of this process there
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(tracking_uri)
        try:
            # the run made active: log_model puts the model in the active run's experiment (given only run_id, it
            # would file it under the default experiment, in ./mlruns of the working folder); leaving the block
            # ends the run FINISHED, as the handler's close does next. no_grad: the frozen text encoder's own
            # no_grad would otherwise enter the exported graph as a set_grad_enabled node, which torch.export's
            # verifier rejects
            with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None), torch.no_grad():
                info = mlflow.pytorch.log_model(
                    net, name=self.name,
                    signature=signature, input_example=inputs, registered_model_name=self.registered_model_name,
                    pip_requirements=_requirements(),
                )
        finally:
            mlflow.set_tracking_uri(previous)  # None unsets both the global URI and the variable
        logger.info("MLflow model logged: %s (run %s, weights %s)", info.model_uri, run_id, self.weights)
        return info


def _requirements() -> list[str]:
    """What loading the exported model needs: torch (the ``pt2`` format) and MLflow itself. Given rather than
    inferred, because MLflow infers them by loading the model again in a subprocess."""
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
