"""U-Net encoder/decoder with pixel-level attention on the skips (paper section III-A; LViT's PLAM)."""

from __future__ import annotations

import torch
from torch import nn


class ConvBatchNorm(nn.Sequential):
    """conv3x3 -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvBatchNorm(in_channels, out_channels), ConvBatchNorm(out_channels, out_channels))


class DownBlock(nn.Sequential):
    """max-pool x2 -> 2x (conv-BN-ReLU)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class PixelLevelAttention(nn.Module):
    """PLAM: a per-pixel gate from channel statistics.

    avg = mean_c ReLU(W_a x), max = max_c ReLU(W_m x) (1x1 convs); gate = MLP(avg, max, avg + max) per pixel
    (3 -> 6 -> 1); output = gate * x.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_avg = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.conv_max = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.mlp = nn.Sequential(nn.Linear(3, 6), nn.ReLU(inplace=True), nn.Linear(6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = torch.relu(self.conv_avg(x)).mean(dim=1)  # (B, H, W)
        peak = torch.relu(self.conv_max(x)).amax(dim=1)  # (B, H, W)
        stats = torch.stack((avg, peak, avg + peak), dim=-1)  # (B, H, W, 3)
        return self.mlp(stats).squeeze(-1).unsqueeze(1) * x


class UpBlock(nn.Module):
    """upsample x2, gate the skip with PLAM, concatenate, 2x (conv-BN-ReLU)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2)
        self.attention = PixelLevelAttention(in_channels // 2)
        self.convs = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat((self.attention(skip), self.up(x)), dim=1))


class UNetEncoder(nn.Module):
    """Channels c, 2c, 4c, 8c, 8c; returns the five stages, the last at 1/16 resolution."""

    def __init__(self, in_channels: int, c: int) -> None:
        super().__init__()
        self.inc = ConvBatchNorm(in_channels, c)
        self.down1 = DownBlock(c, 2 * c)
        self.down2 = DownBlock(2 * c, 4 * c)
        self.down3 = DownBlock(4 * c, 8 * c)
        self.down4 = DownBlock(8 * c, 8 * c)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = [self.inc(x)]
        for down in (self.down1, self.down2, self.down3, self.down4):
            stages.append(down(stages[-1]))
        return stages


class UNetDecoder(nn.Module):
    """Decodes the (interacted) stage-4 feature with the four skips to one logit channel."""

    def __init__(self, c: int, out_channels: int = 1) -> None:
        super().__init__()
        self.up4 = UpBlock(16 * c, 4 * c)
        self.up3 = UpBlock(8 * c, 2 * c)
        self.up2 = UpBlock(4 * c, c)
        self.up1 = UpBlock(2 * c, c)
        self.head = nn.Conv2d(c, out_channels, kernel_size=1)

    def forward(self, bottom: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = bottom
        for up, skip in zip((self.up4, self.up3, self.up2, self.up1), reversed(skips), strict=True):
            x = up(x, skip)
        return self.head(x)
