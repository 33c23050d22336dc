"""CAT-Seg-style cost-aggregating decoder (Cho et al., CAT-Seg; KU-CVLAB/CAT-Seg transformer/model.py), TGC-Net's.

cost (B, P, T, H, W) image-text cosine similarities, P prompt channels, T classes -> logits (B, T, 4H, 4W):
1. cost embedding: Conv2d(P -> hidden, 7x7) on every class map;
2. ``layers`` x (spatial aggregation, class aggregation):
   - spatial: two Swin blocks per class map (the second shifted), q/k from [LN(x), LN(appearance guidance)], v
     from LN(x) (``GuidedWindowBlock`` in windows.py); the guidance is shared by the T maps of a sample;
   - class: per pixel, multi-head linear attention (elu + 1 feature map, "Transformers are RNNs") across the T
     maps, q/k from [LN(x), text guidance], v from LN(x), output projection, residual; LN -> MLP 4x ReLU ->
     residual. It is a set operation: the decoder is permutation-equivariant over classes, and any T >= 1 works;
3. upsampling: two blocks ConvTranspose2d(2, stride 2) -> concat projected guidance features -> 2 x (Conv3x3
   -> GroupNorm -> ReLU), then Conv3x3 -> 1 logit map per class.

Choices:
- windows follow windows.py: clamped to the grid per axis, an axis the window covers is not shifted, partial
  windows are zero-padded (CAT-Seg instead clamps to a square min(H, W) window and never pads);
- the Swin attention keeps windows.py's learned relative-position bias and the class attention has an output
  projection (CAT-Seg's modified blocks have neither);
- the class aggregation runs at full resolution: no CAT-Seg average pooling, no padding to a fixed class count;
- ConvTranspose2d(in -> out_i) before the guidance concat, 1x1 guidance projections (CAT-Seg: in -> in - g_i,
  3x3 projections);
- GroupNorm groups: the largest divisor of C that is at most max(1, C // 16) — CAT-Seg's C // 16 where that
  divides C (4 for 64, 2 for 32), and always a valid group count;
- the class-attention MLP uses ReLU, the Swin MLP GELU, as in CAT-Seg.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .windows import GuidedWindowBlock

__all__ = ["CostAggregationDecoder", "linear_attention", "group_count"]


def group_count(channels: int) -> int:
    """GroupNorm groups for ``channels``: largest divisor not above max(1, channels // 16)."""
    return max(g for g in range(1, max(1, channels // 16) + 1) if channels % g == 0)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Linear attention along dim 1 (Katharopoulos et al.; CAT-Seg's LinearAttention): q, k, v (B, L, ..., heads, d).

    Softmax-free, so written with einsum rather than scaled_dot_product_attention. v is divided by L and the
    result multiplied back, as CAT-Seg does, to keep the key-value sum within fp16 range under autocast.
    """
    q, k = F.elu(q) + 1, F.elu(k) + 1
    length = v.shape[1]
    kv = torch.einsum("bl...d,bl...e->b...de", k, v / length)
    norm = 1.0 / (torch.einsum("bl...d,b...d->bl...", q, k.sum(dim=1)) + eps)
    return torch.einsum("bl...d,b...de,bl...->bl...e", q, kv, norm) * length


class SpatialAggregation(nn.Module):
    """Two guided Swin blocks (plain, shifted) over every class map: (B*T, N, C), guidance (B, N, G) -> (B*T, N, C).

    One LayerNorm normalises the guidance for both blocks, as in CAT-Seg's SwinTransformerBlockWrapper.
    """

    def __init__(self, dim: int, guidance_dim: int, grid: tuple[int, int], num_heads: int, window: int):
        super().__init__()
        grid3, window3 = (1, *grid), (1, window, window)
        self.guidance_norm = nn.LayerNorm(guidance_dim)
        self.blocks = nn.ModuleList([GuidedWindowBlock(dim, guidance_dim, grid3, num_heads, window3, shifted=s)
                                     for s in (False, True)])

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        guidance = self.guidance_norm(guidance).repeat_interleave(x.shape[0] // guidance.shape[0], dim=0)
        for block in self.blocks:
            x = block(x, guidance)
        return x


class ClassAggregation(nn.Module):
    """Per-pixel linear attention across classes: x (B, T, N, C), text guidance (B, T, G) -> (B, T, N, C)."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.ReLU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, t, n, c = x.shape
        y = self.norm1(x)
        guided = torch.cat([y, text[:, :, None].expand(-1, -1, n, -1)], dim=-1)
        q, k, v = (p.reshape(b, t, n, self.num_heads, c // self.num_heads)
                   for p in (self.q(guided), self.k(guided), self.v(y)))
        x = x + self.proj(linear_attention(q, k, v).reshape(b, t, n, c))
        return x + self.mlp(self.norm2(x))


class AggregatorLayer(nn.Module):
    """Spatial then class aggregation: x (B, T, N, C), appearance (B, N, Ga), text (B, T, Gt) -> (B, T, N, C)."""

    def __init__(self, dim: int, appearance_dim: int, text_dim: int, grid: tuple[int, int], num_heads: int,
                 window: int):
        super().__init__()
        self.spatial = SpatialAggregation(dim, appearance_dim, grid, num_heads, window)
        self.classes = ClassAggregation(dim, text_dim, num_heads)

    def forward(self, x: torch.Tensor, appearance: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, t, n, c = x.shape
        x = self.spatial(x.reshape(b * t, n, c), appearance).reshape(b, t, n, c)
        return self.classes(x, text)


class UpBlock(nn.Module):
    """ConvTranspose2d(2, stride 2) -> concat guidance -> 2 x (Conv3x3 -> GroupNorm -> ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        layers = []
        for c_in in (out_channels + guidance_channels, out_channels):
            # no conv bias: GroupNorm's shift replaces it
            layers += [nn.Conv2d(c_in, out_channels, 3, padding=1, bias=False),
                       nn.GroupNorm(group_count(out_channels), out_channels), nn.ReLU()]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), guidance], dim=1))


class CostAggregationDecoder(nn.Module):
    """Cost volume -> per-class logits at 4x its resolution (module docstring).

    Args:
        prompt_channels: P, the prompt axis of the cost volume.
        appearance_dim: Ca, channels of the appearance guidance at the cost resolution.
        text_dim: Dt, width of the per-class text vectors.
        guidance_dims: (C16, C8), channels of the upsampling guidance at 2x and 4x the cost resolution.
        grid: (H, W) of the cost volume, fixed (window partition and shift masks depend on it).
        hidden: width of the cost embedding and the aggregator.
        appearance_guidance_dim / text_guidance_dim: projected guidance widths.
        layers: aggregator layers (spatial + class aggregation each).
        num_heads: heads of both attentions; hidden must be divisible by it.
        window: Swin window (clamped to the grid per axis); the shifted block shifts by window // 2.
        decoder_dims: output channels of the two upsampling blocks.
        guidance_proj_dims: projected widths of the two upsampling guidance maps.
    """

    def __init__(self, prompt_channels: int, appearance_dim: int, text_dim: int, guidance_dims: tuple[int, int],
                 grid: tuple[int, int], hidden: int = 128, appearance_guidance_dim: int = 128,
                 text_guidance_dim: int = 128, layers: int = 2, num_heads: int = 4, window: int = 12,
                 decoder_dims: tuple[int, int] = (64, 32), guidance_proj_dims: tuple[int, int] = (32, 16)):
        super().__init__()
        if len(guidance_dims) != 2 or len(decoder_dims) != 2 or len(guidance_proj_dims) != 2:
            raise ValueError("guidance_dims, decoder_dims and guidance_proj_dims need two entries each")
        self.prompt_channels = prompt_channels
        self.appearance_dim = appearance_dim
        self.text_dim = text_dim
        self.guidance_dims = tuple(guidance_dims)
        self.grid = tuple(grid)
        self.cost_embed = nn.Conv2d(prompt_channels, hidden, kernel_size=7, padding=3)
        self.appearance_proj = nn.Sequential(nn.Conv2d(appearance_dim, appearance_guidance_dim, 3, padding=1),
                                             nn.ReLU())
        self.text_proj = nn.Sequential(nn.Linear(text_dim, text_guidance_dim), nn.ReLU())
        self.layers = nn.ModuleList([AggregatorLayer(hidden, appearance_guidance_dim, text_guidance_dim, self.grid,
                                                     num_heads, window) for _ in range(layers)])
        self.guidance_proj = nn.ModuleList([nn.Sequential(nn.Conv2d(c, p, 1), nn.ReLU())
                                            for c, p in zip(guidance_dims, guidance_proj_dims)])
        self.up = nn.ModuleList([UpBlock(c_in, c_out, g) for c_in, c_out, g in
                                 zip((hidden, decoder_dims[0]), decoder_dims, guidance_proj_dims)])
        self.head = nn.Conv2d(decoder_dims[1], 1, 3, padding=1)

    def _check(self, cost: torch.Tensor, appearance: torch.Tensor, text: torch.Tensor,
               guidance: list[torch.Tensor]) -> None:
        h, w = self.grid
        if cost.ndim != 5 or cost.shape[1] != self.prompt_channels or tuple(cost.shape[-2:]) != self.grid:
            raise ValueError(f"cost {tuple(cost.shape)}: expected (B, P={self.prompt_channels}, T, {h}, {w})")
        b, t = cost.shape[0], cost.shape[2]
        if tuple(appearance.shape) != (b, self.appearance_dim, h, w):
            raise ValueError(f"appearance {tuple(appearance.shape)}: expected ({b}, {self.appearance_dim}, {h}, {w})")
        if tuple(text.shape) != (b, t, self.text_dim):
            raise ValueError(f"text {tuple(text.shape)}: expected ({b}, T={t}, {self.text_dim})")
        if len(guidance) != 2:
            raise ValueError(f"guidance: expected 2 maps (at 2x and 4x the cost grid), got {len(guidance)}")
        for g, c, s in zip(guidance, self.guidance_dims, (2, 4)):
            if tuple(g.shape) != (b, c, s * h, s * w):
                raise ValueError(f"guidance {tuple(g.shape)}: expected ({b}, {c}, {s * h}, {s * w})")

    def forward(self, cost: torch.Tensor, appearance: torch.Tensor, text: torch.Tensor,
                guidance: list[torch.Tensor]) -> torch.Tensor:
        """cost (B, P, T, H, W), appearance (B, Ca, H, W), text (B, T, Dt), guidance [(B, C16, 2H, 2W),
        (B, C8, 4H, 4W)] -> logits (B, T, 4H, 4W)."""
        self._check(cost, appearance, text, guidance)
        b, _, t, h, w = cost.shape
        x = self.cost_embed(cost.transpose(1, 2).flatten(0, 1))                # (B*T, hidden, H, W)
        x = x.flatten(2).transpose(1, 2).reshape(b, t, h * w, -1)              # (B, T, N, hidden)
        appearance = self.appearance_proj(appearance).flatten(2).transpose(1, 2)
        text = self.text_proj(text)
        for layer in self.layers:
            x = layer(x, appearance, text)
        x = x.flatten(0, 1).transpose(1, 2).reshape(b * t, -1, h, w)
        for up, proj, g in zip(self.up, self.guidance_proj, guidance):
            x = up(x, proj(g).repeat_interleave(t, dim=0))
        return self.head(x).reshape(b, t, 4 * h, 4 * w)
