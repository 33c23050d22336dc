"""Attention blocks: global self-attention over a 3D token grid (backbones without attention layers of their
own), and multi-head (conditioned) attention over token sequences (RecLMIS, TGC-Net).

``GlobalSelfAttentionBlock`` is built like nnFormer's bottleneck block with window = whole grid; on an nnFormer backbone BiCLIP copies
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


#: added to W before its log (RecLMIS's ``gauss_weight + 1e-10``): items of zero interest keep a tiny weight
CONDITION_EPS = 1e-10
#: where the condition W enters the attention: "logits" = the paper's eq. 7 / 9, softmax((q k^T / sqrt(d)) ⊙ W);
#: "probabilities" = the authors' code (``gauss_weight``), softmax(q k^T / sqrt(d)) * W renormalised
CONDITION_PLACEMENTS = ("logits", "probabilities")


def conditioned_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor | None = None,
                          key_valid: torch.Tensor | None = None, causal: bool = False,
                          placement: str = "logits") -> torch.Tensor:
    """Conditioned scaled dot-product attention (eq. 7 / 9): q (B, h, Lq, d_h), k, v (B, h, Lk, d_h),
    weights W (B, Lk) over the keys, key_valid (B, Lk) bool -> (B, h, Lq, d_h).

    placement "logits" (eq. 7 / 9):  A = softmax((q k^T / sqrt(d_h)) ⊙ W), W broadcast over the queries;
      since W scales key j's column, (q k_j^T) w_j = q (w_j k_j)^T: SDPA on the keys scaled by W (exact).
    placement "probabilities" (the authors' code):  A = softmax(q k^T / sqrt(d_h)) * (W + 1e-10), each row
      renormalised = softmax(q k^T / sqrt(d_h) + log(W + 1e-10)): SDPA with that additive mask.
    Keys with key_valid False and, with ``causal``, keys after the query are -inf (weight exactly 0); a row left
    without any key falls back to uniform attention over its unmasked scores, so the output is never NaN.
    """
    if placement not in CONDITION_PLACEMENTS:
        raise ValueError(f"condition placement must be one of {CONDITION_PLACEMENTS}, got {placement!r}")
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    bias = torch.zeros(b, 1, lq, lk, device=q.device, dtype=torch.float32)
    if weights is not None and placement == "logits":
        k = k * weights.to(k.dtype)[:, None, :, None]
    elif weights is not None:
        # in float32: 1e-10 underflows in half precision
        bias = bias + torch.log(weights.float() + CONDITION_EPS)[:, None, None, :]
    if key_valid is not None:
        bias = bias.masked_fill(~key_valid.to(torch.bool)[:, None, None, :], float("-inf"))
    if causal:
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
        bias = bias.masked_fill(future, float("-inf"))
    bias = bias.masked_fill(torch.isinf(bias).all(-1, keepdim=True), 0.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


class ConditionedAttention(nn.Module):
    """Multi-head attention with an optional condition W on the keys: query (B, Lq, d), context (B, Lk, d)
    -> (B, Lq, d). Projections with bias (4 d^2 + 4 d parameters, as the authors' in_proj + out_proj); no
    attention dropout (theirs is 0)."""

    def __init__(self, dim: int, num_heads: int, placement: str = "logits"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if placement not in CONDITION_PLACEMENTS:
            raise ValueError(f"condition placement must be one of {CONDITION_PLACEMENTS}, got {placement!r}")
        self.num_heads, self.placement = num_heads, placement
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, query, context, weights=None, key_valid=None, causal: bool = False) -> torch.Tensor:
        b, lq, d = query.shape
        h = self.num_heads

        def heads(t):
            return t.reshape(b, t.shape[1], h, d // h).transpose(1, 2)

        out = conditioned_attention(heads(self.q(query)), heads(self.k(context)), heads(self.v(context)), weights,
                                    key_valid, causal, self.placement)
        return self.out(out.transpose(1, 2).reshape(b, lq, d))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the valid tokens: (B, L, D), (B, L) bool -> (B, D); 0 for a sample without any valid token."""
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)
