"""A 2D U-Net (Ronneberger et al., 2015) with configurable depth, width, input channels and normalisation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UNetConfig:
    in_channels: int = 4   # modalities (data.CHANNELS: FLAIR, T1, T1Gd, T2) x slices of context
    out_channels: int = 1  # one whole-tumour logit per pixel
    base: int = 32         # channels at the first level; doubles at each level down
    depth: int = 4         # number of down-sampling steps
    norm: str = "instance"  # instance | batch | group | none


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm: expected batch, instance, group or none, got {kind!r}")


class DoubleConv(nn.Sequential):
    """(3x3 conv → norm → ReLU) twice; the conv has no bias when a norm follows it."""

    def __init__(self, cin: int, cout: int, norm: str):
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=bias), make_norm(norm, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias), make_norm(norm, cout), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Encoder of max-pooled DoubleConvs, decoder of transposed convs with skip connections; logits out.

    Any input size works: the input is padded up to a multiple of 2**depth and the output cropped back.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base * 2**i for i in range(cfg.depth + 1)]
        self.down = nn.ModuleList([DoubleConv(cfg.in_channels, widths[0], cfg.norm)])
        self.down.extend(DoubleConv(widths[i], widths[i + 1], cfg.norm) for i in range(cfg.depth))
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(cfg.depth)))
        self.up = nn.ModuleList(DoubleConv(2 * widths[i], widths[i], cfg.norm) for i in reversed(range(cfg.depth)))
        self.head = nn.Conv2d(widths[0], cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, out_channels, H, W) at the input size."""
        h, w = x.shape[-2:]
        m = 2**self.cfg.depth
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for upsample, block in zip(self.upsample, self.up):
            x = block(torch.cat([skips.pop(), upsample(x)], dim=1))
        return self.head(x)[..., :h, :w]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
