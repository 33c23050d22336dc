"""LViT-style UNet parts (Li et al., IEEE TMI 2023, nets/LViT.py), shared by RecLMIS (seed 004) and MPTPN
(seed 003): the Conv3x3-BN-ReLU unit, the max-pooling encoder and the decoder level with PLAM on the skip."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .plam import PLAM

__all__ = ["ConvBNReLU", "LViTEncoder", "UpBlockPLAM"]


class ConvBNReLU(nn.Sequential):
    """Conv3x3 (bias) -> BatchNorm2d -> ReLU: the authors' ``ConvBatchNorm``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


class LViTEncoder(nn.Module):
    """LViT's UNet encoder (RecLMIS's; MPTPN's PPE image branch is its first three stages): (B, C_in, H, W) -> [skip_0 .. skip_{n-1}], skip_s (B, features[s], H/S_s, W/S_s).

    Stage 0: one Conv-BN-ReLU (stride 1); stage s >= 1: MaxPool(kernel = stride = strides[s]) + 2 Conv-BN-ReLU.
    """

    def __init__(self, in_channels: int, features: Sequence[int], strides: Sequence[tuple[int, int]]):
        super().__init__()
        self.stages = nn.ModuleList([ConvBNReLU(in_channels, features[0])])
        for s in range(1, len(features)):
            pool = nn.MaxPool2d(strides[s], strides[s]) if strides[s] != (1, 1) else nn.Identity()
            self.stages.append(nn.Sequential(pool, ConvBNReLU(features[s - 1], features[s]),
                                             ConvBNReLU(features[s], features[s])))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UpBlockPLAM(nn.Module):
    """One LViT decoder level (``UpblockAttention``): coarse (B, C_below, h, w), skip (B, C_skip, H, W) ->
    (B, C_out, H, W) = 2 x Conv-BN-ReLU(cat[PLAM(skip), nearest_up(coarse)])."""

    def __init__(self, below_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.plam = PLAM(skip_channels)
        self.convs = nn.Sequential(ConvBNReLU(skip_channels + below_channels, out_channels),
                                   ConvBNReLU(out_channels, out_channels))

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # nearest upsampling by the stage's pooling factor (the authors' Upsample(x2)); sizing by the skip also
        # covers per-axis strides such as (1, 2)
        up = F.interpolate(coarse, size=skip.shape[2:], mode="nearest")
        return self.convs(torch.cat([self.plam(skip), up], 1))
