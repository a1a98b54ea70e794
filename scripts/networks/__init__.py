"""Networks of the bundle; each takes ``(image, text_ids=None, text_mask=None)`` and returns B×1×H×W logits
(TMCA returns a dict of training outputs in ``train()`` mode, see its docstring)."""

from scripts.networks.image_encoder import ConvNeXtEncoder
from scripts.networks.text_unet import TextGuidedUNet
from scripts.networks.tmca import TMCA

__all__ = ["TMCA", "TextGuidedUNet", "ConvNeXtEncoder"]
