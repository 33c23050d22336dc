"""The 3D CLIP adapter of BiCLIP-nnFormer (seed 000, Sec. 3.1, Fig. 3).

Per-slice CLIP embeddings (B, D, E) -> CLIP-Adapter MLP with residual -> Conv1d over the slice axis
(D in-channels -> D_out out-channels = depth of the backbone's bottleneck) -> LayerNorm -> (B, D_out, C).
"""
from __future__ import annotations

import torch
from torch import nn


class SliceEmbeddingAdapter(nn.Module):
    """3D CLIP adapter.

    Args:
        embed_dim: E, size of one slice embedding (768 for PMC-CLIP / CoCa ViT-L-14).
        out_channels: C, channels of the bottleneck the result is fused with (1536 Synapse / 768 ACDC).
        num_slices: D, slices in the network's input patch (64 Synapse / 14 ACDC).
        out_depth: D_out, depth of the bottleneck grid (4 Synapse / 3 ACDC).
        hidden: MLP width (192 in the paper, i.e. E // 4).
        slice_kernel: kernel of the Conv1d along the channel axis. The paper gives only in/out channels;
            1 (a learned mix of slices) is the plain reading and the default.

    The residual of the CLIP-Adapter is the identity when E == C, else a bias-free linear projection
    (the paper's MLP 768x192x1536 cannot have an identity residual).
    """

    def __init__(self, embed_dim: int, out_channels: int, num_slices: int, out_depth: int,
                 hidden: int | None = None, slice_kernel: int = 1):
        super().__init__()
        hidden = hidden or max(embed_dim // 4, 8)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_channels), nn.ReLU(inplace=True))
        self.residual = nn.Identity() if embed_dim == out_channels else nn.Linear(embed_dim, out_channels, bias=False)
        self.slice_mix = nn.Conv1d(num_slices, out_depth, kernel_size=slice_kernel, padding=slice_kernel // 2)
        self.norm = nn.LayerNorm(out_channels)
        self.num_slices = num_slices

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D, E) -> (B, D_out, C)."""
        if emb.shape[1] != self.num_slices:
            raise ValueError(f"SliceEmbeddingAdapter expects {self.num_slices} slice embeddings per patch, "
                             f"got {emb.shape[1]}")
        x = self.mlp(emb) + self.residual(emb)
        return self.norm(self.slice_mix(x))
