"""PLAM, the pixel-level attention module of LViT (Li et al., IEEE TMI 2023), used on the decoder skips of
RecLMIS (seed 004, Sec. III-A) and MPTPN (seed 003).

From LViT's ``nets/pixlevel.py`` (RecLMIS imports the same module): two 1x1 convolutions (no bias) + ReLU
squeezed over the channels, one by the mean and one by the max, and their sum form a 3-channel descriptor per
pixel; a per-pixel MLP 3 -> 6 -> ReLU -> 1 turns it into one gate value that multiplies every channel of the
input. The gate has no sigmoid: it is an unbounded, learned per-pixel scale.

The authors also build a ``conv_sig`` (1x1 conv + sigmoid) that their forward never calls; it is not built
here (C^2 + C parameters that are never trained — noted in RecLMIS's parameter breakdown).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["PLAM"]


class PLAM(nn.Module):
    """Pixel-level attention: (B, C, *spatial) -> (B, C, *spatial), out = gate(x) * x with a (B, 1, *spatial) gate.

    gate = Linear(6 -> 1)(ReLU(Linear(3 -> 6)([a, m, a + m]))) per pixel, where
    a = mean_c ReLU(Conv1x1_avg(x)) and m = max_c ReLU(Conv1x1_max(x)).
    The per-pixel Linear layers are 1x1 convolutions (the same map and parameter count as LViT's Linear applied
    to the channel-last descriptor, without the transposes). Works for 2D and 3D inputs (``dims``).

    Parameters: 2 C^2 + 31.
    """

    def __init__(self, channels: int, hidden_ratio: int = 2, dims: int = 2):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"PLAM supports 2D or 3D feature maps, got dims={dims}")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.channels = int(channels)
        self.avg_branch = conv(channels, channels, kernel_size=1, bias=False)
        self.max_branch = conv(channels, channels, kernel_size=1, bias=False)
        hidden = 3 * hidden_ratio
        self.gate = nn.Sequential(conv(3, hidden, kernel_size=1), nn.ReLU(inplace=True), conv(hidden, 1, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"PLAM built for {self.channels} channels, got input {tuple(x.shape)}")
        a = torch.relu(self.avg_branch(x)).mean(1, keepdim=True)
        m = torch.relu(self.max_branch(x)).amax(1, keepdim=True)
        return self.gate(torch.cat([a, m, a + m], 1)) * x
