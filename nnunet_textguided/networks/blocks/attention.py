"""Global self-attention over a 3D token grid, for backbones without attention layers of their own.

Built like nnFormer's bottleneck block with window = whole grid; on an nnFormer backbone BiCLIP copies
nnFormer's own last bottleneck block instead (networks/nnformer.py), as the paper does.

Pre-LayerNorm -> multi-head attention (qkv bias, scale head_dim^-0.5, learned relative-position bias)
-> projection -> residual; LayerNorm -> MLP 4x GELU -> residual. Attention runs through torch SDPA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability p during training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class RelativePositionBias3d(nn.Module):
    """Learned bias table of (2d-1)(2h-1)(2w-1) x heads, indexed by token-pair offsets.

    One entry per offset (Swin's injective mixed-radix index over (2d-1, 2h-1, 2w-1)). nnFormer's own index
    (multipliers 3h-1 and 2h-1) is not injective — several offsets share an entry — so its blocks are not
    interchangeable with this one; nnFormer backbones keep theirs (networks/nnformer.py).
    """

    def __init__(self, grid: tuple[int, int, int], num_heads: int):
        super().__init__()
        d, h, w = grid
        self.grid = tuple(grid)
        self.table = nn.Parameter(torch.zeros((2 * d - 1) * (2 * h - 1) * (2 * w - 1), num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :]  # (3, N, N)
        rel[0] += d - 1
        rel[1] += h - 1
        rel[2] += w - 1
        index = rel[0] * (2 * h - 1) * (2 * w - 1) + rel[1] * (2 * w - 1) + rel[2]
        self.register_buffer("index", index, persistent=False)

    def forward(self) -> torch.Tensor:
        """-> (heads, N, N) additive attention bias."""
        n = self.index.shape[0]
        return self.table[self.index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


class GlobalSelfAttentionBlock(nn.Module):
    """One transformer block over all tokens of a (D, H, W) grid: (B, N, C) -> (B, N, C), N = D*H*W."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int, int], mlp_ratio: float = 4.0,
                 drop_path: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.bias = RelativePositionBias3d(grid, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=self.bias().to(qkv.dtype)[None])
        x = x + self.drop_path(self.proj(attn.transpose(1, 2).reshape(b, n, c)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
