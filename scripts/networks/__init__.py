"""Networks of the bundle; each takes ``(image, text_ids=None, text_mask=None)`` and returns B×1×H×W logits
(some return a dict of training outputs in ``train()`` mode, for their own loss: see their docstrings)."""

from scripts.networks.guidedecoder import GuideDecoder
from scripts.networks.image_encoder import ConvNeXtEncoder
from scripts.networks.lvit import LViTStyle
from scripts.networks.reclmis import RecLMIS
from scripts.networks.ssa import SSA
from scripts.networks.tmca import TMCA

__all__ = ["TMCA", "GuideDecoder", "SSA", "RecLMIS", "LViTStyle", "ConvNeXtEncoder"]
