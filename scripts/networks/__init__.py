"""Networks of the bundle; each takes ``(image, text_ids=None, text_mask=None)`` and returns B×1×H×W logits."""

from scripts.networks.text_unet import TextGuidedUNet

__all__ = ["TextGuidedUNet"]
