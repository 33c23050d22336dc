"""Window (Swin-style) attention over a 3D token grid fixed at construction: nnFormer's blocks, CDPDNet's fusion,
the spatial aggregation of the CAT-Seg-style cost decoder (a 2D map is grid (1, H, W), window (1, w, w)).

Tokens are (B, N, C), N = D*H*W of ``grid`` in (d, h, w) raster order. A window is clamped to the grid per
axis; an axis the window covers is not shifted; partial windows are zero-padded (padded tokens take part
as keys, as in Swin and nnFormer); shifted windows are cyclically rolled by window // 2 and optionally
masked (-100) across the wrapped-around border.

``WindowAttention`` modes (all run through ``F.scaled_dot_product_attention``, scale head_dim^-0.5):
- ``"self"``: q, k, v = Linear(x) (parameter ``qkv``, 3C outputs).
- ``"skip"``: nnFormer's skip attention: k, v = Linear(x) (``kv``), q = the external query tensor, used
  without projection.
- ``"cross"``: q = Linear(query) (``q``), k, v = Linear(x) (``kv``) — CDPDNet's DINOv2 -> CNN fusion (Eq. 5).
- ``"guided"``: q, k = Linear([x, query]) (``q``, ``k``, input width C + guidance_dim), v = Linear(x) (``v``) —
  CAT-Seg's appearance-guided spatial aggregation, the query tensor being the guidance map.

Relative-position index (``index``): ``"nnformer"`` is nnFormer's own (not injective; its checkpoints depend
on it), ``"swin"`` Swin's injective mixed-radix index (the one ``RelativePositionBias3d`` computes). The table
has (2wd-1)(2wh-1)(2ww-1) rows either way; the index is a persistent buffer, so checkpoints carry it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import DropPath

__all__ = ["MLP_RATIO", "Mlp", "WindowAttention", "WindowedBlock", "CrossWindowBlock", "GuidedWindowBlock",
           "relative_position_index",
           "volume_to_tokens", "tokens_to_volume", "window_and_shift", "shift_mask", "partition", "merge"]

MLP_RATIO = 4
INDEX_KINDS = ("nnformer", "swin")
ATTENTION_MODES = ("self", "skip", "cross", "guided")


def volume_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, D*H*W, C), tokens in (d, h, w) raster order."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_volume(x: torch.Tensor, grid) -> torch.Tensor:
    """(B, D*H*W, C) -> (B, C, D, H, W)."""
    return _ContiguousGradient.apply(x).transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous. The gradient of ``tokens_to_volume`` is a
    transposed view; fed as is into a LayerNorm's backward (the tokens are usually normed just before), the CPU
    kernel returns a contiguous result where torch.compile's tracing predicts the transposed layout, and the
    compiled backward then fails on a view (seen with the aot_eager backend)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, hidden width ``ratio`` x dim (attribute names fc1/fc2 as in Swin and nnFormer)."""

    def __init__(self, dim: int, ratio: int = MLP_RATIO):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def relative_position_index(window: tuple[int, int, int], kind: str = "nnformer") -> torch.Tensor:
    """(N, N) index into the bias table, N = wd*wh*ww.

    ``"swin"``: offsets shifted to start at 0, flattened as dd*(2wh-1)(2ww-1) + dh*(2ww-1) + dw (injective).
    ``"nnformer"``: flattened as dd*(3wh-1) + dh*(2wh-1) + dw, exactly as nnFormer computes it. Not injective:
    for window 4 the 343 offsets use only 115 table entries, and e.g. offsets (0,0,0) and (1,-2,3) share one
    learned bias. Kept because the authors' weights were trained so.
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"relative position index kind {kind!r}: expected one of {INDEX_KINDS}")
    wd, wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel = rel + torch.tensor([wd - 1, wh - 1, ww - 1])
    if kind == "swin":
        return rel[..., 0] * (2 * wh - 1) * (2 * ww - 1) + rel[..., 1] * (2 * ww - 1) + rel[..., 2]
    return rel[..., 0] * (3 * wh - 1) + rel[..., 1] * (2 * wh - 1) + rel[..., 2]


class WindowAttention(nn.Module):
    """Multi-head attention among the N = wd*wh*ww tokens of each window, with a learned relative bias.

    Args:
        dim: C, channels of the tokens (queries have the same width).
        window: (wd, wh, ww) after clamping to the grid.
        num_heads: heads; C must be divisible by it.
        mode: ``"self"`` | ``"skip"`` | ``"cross"`` | ``"guided"`` (module docstring).
        qkv_bias: bias of the q/k/v projections (the output projection always has one).
        index: ``"nnformer"`` | ``"swin"`` relative-position index.
        guidance_dim: channels of the guidance tokens (``"guided"`` only).
    """

    def __init__(self, dim: int, window: tuple[int, int, int], num_heads: int, mode: str = "self",
                 qkv_bias: bool = True, index: str = "nnformer", guidance_dim: int = 0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode {mode!r}: expected one of {ATTENTION_MODES}")
        self.num_heads = num_heads
        self.mode = mode
        if mode == "self":
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        elif mode == "guided":
            self.q = nn.Linear(dim + guidance_dim, dim, bias=qkv_bias)
            self.k = nn.Linear(dim + guidance_dim, dim, bias=qkv_bias)
            self.v = nn.Linear(dim, dim, bias=qkv_bias)
        else:
            if mode == "cross":
                self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        wd, wh, ww = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1),
                                                                     num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # persistent: nnFormer's checkpoints carry it, so it is loaded (and shape-checked) with them
        self.register_buffer("relative_position_index", relative_position_index(tuple(window), index))

    def relative_bias(self) -> torch.Tensor:
        """-> (heads, N, N) additive attention bias."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, query: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B*nW, N, C) window tokens; query (B*nW, N, C) for "skip"/"cross", (B*nW, N, guidance_dim) for
        "guided"; mask (nW, N, N) additive (0 / -100, shifted windows) or None -> (B*nW, N, C)."""
        bw, n, c = x.shape
        heads, hd = self.num_heads, c // self.num_heads
        if self.mode == "self":
            q, k, v = self.qkv(x).reshape(bw, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        elif self.mode == "guided":
            if query is None:
                raise ValueError("guided attention needs a guidance tensor")
            guided = torch.cat([x, query], dim=-1)
            q, k, v = (t.reshape(bw, n, heads, hd).transpose(1, 2) for t in (self.q(guided), self.k(guided), self.v(x)))
        else:
            if query is None:
                raise ValueError(f"{self.mode} attention needs a query tensor")
            k, v = self.kv(x).reshape(bw, n, 2, heads, hd).permute(2, 0, 3, 1, 4)
            if self.mode == "cross":
                query = self.q(query)
            q = query.reshape(bw, n, heads, hd).transpose(1, 2)
        bias = self.relative_bias()
        if mask is None:
            attn_mask = bias[None]
        else:
            # windows are batch-major (b, window): split them so each window gets its own mask
            nw = mask.shape[0]
            q, k, v = (t.reshape(bw // nw, nw, heads, n, hd) for t in (q, k, v))
            attn_mask = bias[None] + mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))
        return self.proj(out.reshape(bw, heads, n, hd).transpose(1, 2).reshape(bw, n, c))


def window_and_shift(grid, window, shifted: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Clamp the window to the grid per axis; shift by window // 2 only along axes the window does not cover."""
    win = tuple(min(w, g) for w, g in zip(window, grid))
    shift = tuple(w // 2 if shifted and w < g else 0 for w, g in zip(win, grid))
    return win, shift


def shift_mask(grid, window, shift) -> torch.Tensor:
    """(nW, N, N) additive mask (-100 between tokens that only share a window because of the cyclic shift).

    Each padded axis is cut into [0, P-w), [P-w, P-s), [P-s, P) as in Swin; tokens of a window may attend to
    each other only if they come from the same piece along every axis.
    """
    labels = torch.zeros((), dtype=torch.long)
    for g, w, s in zip(grid, window, shift):
        p = -(-g // w) * w
        pos = torch.arange(p)
        piece = (pos >= p - w).long() + (pos >= p - s).long() if s else torch.zeros_like(pos)
        labels = labels[..., None] * 3 + piece
    windows = partition(labels[None, ..., None].float(), window, (0, 0, 0))[..., 0]  # (nW, N)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def partition(x: torch.Tensor, window, shift) -> torch.Tensor:
    """(B, D, H, W, C) -> zero-pad to window multiples -> cyclic shift by -shift -> (B*nW, wd*wh*ww, C)."""
    b, d, h, w, c = x.shape
    pd, ph, pw = ((-n) % k for n, k in zip((d, h, w), window))
    x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
    if any(shift):
        x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    (wd, wh, ww), (dp, hp, wp) = window, x.shape[1:4]
    x = x.reshape(b, dp // wd, wd, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, wd * wh * ww, c)


def merge(windows: torch.Tensor, window, shift, grid, batch: int) -> torch.Tensor:
    """Inverse of ``partition``: (B*nW, N, C) -> (B, D, H, W, C)."""
    (wd, wh, ww), c = window, windows.shape[-1]
    dp, hp, wp = (-(-n // k) * k for n, k in zip(grid, window))
    x = windows.reshape(batch, dp // wd, hp // wh, wp // ww, wd, wh, ww, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    x = x.reshape(batch, dp, hp, wp, c)
    if any(shift):
        x = torch.roll(x, shifts=tuple(shift), dims=(1, 2, 3))
    d, h, w = grid
    return x[:, :d, :h, :w]


class WindowedBlock(nn.Module):
    """Window bookkeeping and parameters shared by the block kinds; subclasses define forward.

    Holds norm1, attn (``WindowAttention``), drop_path, norm2, mlp (``Mlp``) and the non-persistent shift mask.
    The grid is fixed at construction (window partition and shift mask depend on it), so a block is a
    standalone function of its tokens.
    """

    def __init__(self, dim: int, grid, num_heads: int, window, shifted: bool = False, drop_path: float = 0.0,
                 shifted_window_mask: bool = True, mode: str = "self", qkv_bias: bool = True,
                 index: str = "nnformer", mlp_ratio: int = MLP_RATIO, guidance_dim: int = 0):
        super().__init__()
        self.grid = tuple(grid)
        self.window, self.shift = window_and_shift(self.grid, window, shifted)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, self.window, num_heads, mode=mode, qkv_bias=qkv_bias, index=index,
                                    guidance_dim=guidance_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        mask = shift_mask(self.grid, self.window, self.shift) if any(self.shift) and shifted_window_mask else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def _attend(self, x: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised tokens (B, N, C) [+ normalised queries (B, N, C) or guidance (B, N, G)] -> windowed attention
        output (B, N, C)."""
        b, n, c = x.shape

        def to_windows(t):
            return partition(t.reshape(b, *self.grid, t.shape[-1]), self.window, self.shift)

        out = self.attn(to_windows(x), None if query is None else to_windows(query), self.attn_mask)
        return merge(out, self.window, self.shift, self.grid, b).reshape(b, n, c)


class CrossWindowBlock(WindowedBlock):
    """Swin block with (shifted-)window cross-attention: (x, query) both (B, N, C) -> (B, N, C).

    x = x + DropPath(Attn(q = Linear(LN1(query)), k, v = Linear(LN1(x)))); x = x + DropPath(MLP(LN2(x))).
    The residual stream is x; the queries only steer where it attends. One pre-LayerNorm (norm1) serves both
    inputs, as in the Swin-based cross-attention CDPDNet uses (TransMorph's LWCA). Swin defaults: Swin
    relative-position index, shift mask on.
    """

    def __init__(self, dim: int, grid, num_heads: int, window, shifted: bool = False, drop_path: float = 0.0,
                 qkv_bias: bool = True, index: str = "swin", mlp_ratio: int = MLP_RATIO):
        super().__init__(dim, grid, num_heads, window, shifted, drop_path, shifted_window_mask=True, mode="cross",
                         qkv_bias=qkv_bias, index=index, mlp_ratio=mlp_ratio)

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._attend(self.norm1(x), self.norm1(query)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class GuidedWindowBlock(WindowedBlock):
    """Swin block with appearance-guided (shifted-)window attention, CAT-Seg's spatial aggregation:
    (x (B, N, C), guidance (B, N, G)) -> (B, N, C).

    x = x + DropPath(Attn(q, k = Linear([LN1(x), guidance]), v = Linear(LN1(x)))); x = x + DropPath(MLP(LN2(x))).
    The guidance is used as given: CAT-Seg normalises it once for the pair of blocks it feeds. Swin defaults:
    Swin relative-position index, shift mask on.
    """

    def __init__(self, dim: int, guidance_dim: int, grid, num_heads: int, window, shifted: bool = False,
                 drop_path: float = 0.0, qkv_bias: bool = True, index: str = "swin", mlp_ratio: int = MLP_RATIO):
        super().__init__(dim, grid, num_heads, window, shifted, drop_path, shifted_window_mask=True, mode="guided",
                         qkv_bias=qkv_bias, index=index, mlp_ratio=mlp_ratio, guidance_dim=guidance_dim)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._attend(self.norm1(x), guidance))
        return x + self.drop_path(self.mlp(self.norm2(x)))
