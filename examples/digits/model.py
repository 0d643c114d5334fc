"""A small shared CNN trunk with one linear classification head per task (hard parameter sharing)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MultiDigitNet(nn.Module):
    """Two 3 × 3 convolutions (the second with stride 2) and a fully connected layer shared by all tasks, then one
    linear head per task. No BatchNorm and no dropout, so the extra forward passes of F-MTL and of selective group
    updates see exactly the network the clean pass saw.

    Args:
        num_classes: the number of classes of each task (one head each).
        canvas: the input's (height, width); both must be even (one stride-2 convolution).
        channels: the two convolutions' output channels.
        width: the shared feature size fed to the heads.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        canvas: tuple[int, int],
        channels: tuple[int, int] = (16, 32),
        width: int = 256,
    ) -> None:
        super().__init__()
        height, breadth = canvas
        self.trunk = nn.Sequential(
            nn.Conv2d(1, channels[0], 3, padding=1),
            nn.ReLU(),
            # Stride 2 instead of a max-pool: the same downsampling at a fraction of the CPU time.
            nn.Conv2d(channels[0], channels[1], 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(channels[1] * (height // 2) * (breadth // 2), width),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(width, classes) for classes in num_classes)

    def forward(self, x: Tensor) -> list[Tensor]:
        """The K tasks' logits for a batch of images (B, 1, H, W)."""
        features = self.trunk(x)
        return [head(features) for head in self.heads]
