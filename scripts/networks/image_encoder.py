"""ConvNeXt image encoder from ``transformers`` (no torchvision or timm, which would replace the pinned torch)."""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["CONVNEXT_SIZES", "ConvNeXtEncoder"]

# hidden sizes and depths per stage (strides 4, 8, 16, 32)
CONVNEXT_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "tiny": ((96, 192, 384, 768), (3, 3, 9, 3)),  # ConvNeXt-T, the published methods' setting
    "nano": ((80, 160, 320, 640), (2, 2, 8, 2)),  # ConvNeXt-N
    "atto": ((40, 80, 160, 320), (2, 2, 6, 2)),  # ConvNeXt-A
    "cpu": ((32, 64, 128, 256), (2, 2, 4, 2)),  # this bundle's CPU recipe
}


class ConvNeXtEncoder(nn.Module):
    """Multi-scale ConvNeXt features at strides 4, 8, 16 and 32.

    Args:
        size: one of :data:`CONVNEXT_SIZES`; ignored when ``pretrained_dir`` is given.
        pretrained_dir: local folder of a Hugging Face ConvNeXt (``from_pretrained``); None: random init.
        in_channels: image channels. Single-channel images are repeated to the three channels a pretrained model
            expects; a randomly initialised encoder takes them as they are.
        drop_path_rate: stochastic depth of a randomly initialised encoder.
    """

    def __init__(
        self,
        size: str = "cpu",
        pretrained_dir: str | os.PathLike | None = None,
        in_channels: int = 1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        from transformers import ConvNextConfig, ConvNextModel

        if pretrained_dir:
            self.model = ConvNextModel.from_pretrained(str(pretrained_dir))
            expected = int(self.model.config.num_channels)
            if in_channels not in (1, expected):
                raise ValueError(f"pretrained ConvNeXt takes {expected} channels; cannot adapt {in_channels}")
            self.repeat = expected if in_channels == 1 and expected != 1 else 1
        else:
            if size not in CONVNEXT_SIZES:
                raise ValueError(f"unknown ConvNeXt size {size!r}; choose one of {sorted(CONVNEXT_SIZES)}")
            hidden, depths = CONVNEXT_SIZES[size]
            config = ConvNextConfig(
                num_channels=in_channels, hidden_sizes=list(hidden), depths=list(depths), drop_path_rate=drop_path_rate
            )
            self.model = ConvNextModel(config)
            self.repeat = 1
        # the final norm only serves the pooled classification output: unused here, and unused parameters would
        # stall DistributedDataParallel
        self.model.layernorm = nn.Identity()
        self.channels: tuple[int, ...] = tuple(int(c) for c in self.model.config.hidden_sizes)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """
        Args:
            image: B×C×H×W, H and W divisible by 32.

        Returns:
            four feature maps B×Cᵢ×H/s×W/s for s = 4, 8, 16, 32.
        """
        if self.repeat > 1:
            image = image.expand(-1, self.repeat, -1, -1)
        hidden = self.model(pixel_values=image, output_hidden_states=True).hidden_states
        return list(hidden[1:5])
