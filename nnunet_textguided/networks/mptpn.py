"""MPTPN (Han et al., "Multiscale Progressive Text Prompt Network for Medical Image Segmentation", seed 003) for
2D nnU-Net patches. Pure PyTorch.

After the paper (Sec. 3, Algorithm 1, Fig. 3-5) and the authors' codehxj/MPTPN-for--Medical-Image-Segmentation
(nets/LViT_encoder.py = the PPE, nets/LViT_decoder.py = MSFF + UpAttention, nets/Vit.py, simsiam/builder.py).
Widths in terms of C = ``base_channels`` (64 in the paper), grid g = patch / 16 (14 x 14 at 224):

``PromptEncoder`` (PPE), x (B, C_in, H, W), note token states (B, L, D), mask (B, L) -> [F0, F1, F2]:

1. Image branch (eq. 1): Conv3x3-BN-ReLU to C @ H; two DownBlocks (max-pool 2 + 2 Conv-BN-ReLU) to 2C @ H/2 and
   4C @ H/4 — the first three stages of the LViT encoder (``blocks.lvit``).
2. Text branch (eq. 2): the frozen token states through Conv1d(k3) D -> 8C -> 4C -> 2C -> C over the token axis
   (768 -> 512 -> 256 -> 128 -> 64 in the paper with BERT-base; D is the configured text encoder's width).
3. U-shaped ViT (eq. 3-6), one level per image scale i = 0, 1, 2 (width C_i = 2^i C): patch embedding Conv(k = s
   = 16 / 8 / 4) -> g x g tokens at every scale, + a learned position embedding, dropout 0.1. The text enters the
   first DownViT only: ConvTransBN(L -> g^2) over the word axis (Conv1d k3 + BN + ReLU) maps the (L, C) text to
   (g^2, C), added to the level-0 tokens. Each DownViT runs one transformer block (8 heads, MLP 4x, qkv bias);
   levels 1 and 2 then halve their width (ConvTransBN C_i -> C_i / 2 over the channel axis) and concatenate the
   previous level's output: Y_i (g^2, C_i). UpViTs (own blocks) from the bottom: Y_2 = block(Y_2); Y_i =
   block(Y_i) + ConvTransBN(2 C_i -> C_i)(Y_{i+1}).
4. Reconstruction (eq. 7): Y_i as a g x g map, nearest upsampling x 16 / 8 / 4, Conv1x1-BN-ReLU, added to the
   image branch's map: F_i (C_i @ H / 2^i).

``MultiscaleFeatureFusion`` (MSFF, Sec. 3.3.1, Fig. 4): Swin's PatchMerging (2x2 neighbours concatenated -> LN ->
Linear 4c -> 2c, no bias) and PatchExpand (channels split into 2 x 2 x c/4 sub-pixels -> LN -> Linear c/4 -> c/2,
no bias) carry every F_i to every scale; the three copies per scale are concatenated: 3C @ H, 6C @ H/2,
12C @ H/4.

``UpAttention`` decoder (Sec. 3.3.2, Fig. 5): two LViT decoder levels (nearest x2 upsampling of the coarser map,
PLAM on the skip, concatenation, 2 x Conv3x3-BN-ReLU): (12C, 6C) -> 6C @ H/2, (6C, 3C) -> 3C @ H; a 1x1 conv
to one sigmoid logit per foreground class. (The paper's text describes UpAttention as CBAM-like GAP/GMP pooling;
the released code — and Fig. 5's structure — is LViT's PLAM level, used here.)

Output: (B, num_classes, H, W) logits with the background fixed at 0, so nnU-Net's softmax gives the sigmoid of
the paper's head for a binary task (softmax([0, s]) = [1 - sigmoid(s), sigmoid(s)]) and its argmax thresholds
the sigmoid at 0.5.

Ablations (Table 3): ``down_vit=False`` — the tokens are the patch embeddings (with position) of each scale
and nothing else; as in the authors' ablation code the text then does not enter at all (it only ever enters
through the first DownViT); ``up_vit=False`` — the reconstruction reads the DownViT outputs; ``msff=False`` —
UpAttention on F0 / F1 / F2 directly ((4C, 2C) -> 2C, (2C, C) -> C, head from C); ``up_attention=False`` —
PatchExpand of the 6C and 12C maps to H (3C each), concatenated with the 3C map (9C) and the 1x1 head.

What the authors' code does where the paper is silent (kept): zero-initialised position embeddings; the ViT's
MLP is Linear -> GELU -> Dropout -> Linear -> GELU -> Dropout (0.1) (a GELU after the second linear too); the
ConvTransBN kernel is 3 (padding 1) in every use, so the width-halving convolutions also mix tokens that are
neighbours in raster order.

Deviations, by choice:
- Padding: token states at mask False are zeroed before every text convolution (each k3 window would otherwise
  mix them into the real tokens next to them), so the word -> patch convolution sees exact zeros for absent
  words and a note's tokens do not depend on the padding length's content.
- The up-ViTs' own patch embeddings, which the authors build but never call, are not built.
- Sizes: any patch whose sides are multiples of 16 (g = H / 16 x W / 16 tokens); ``adapt_ppe_state`` resamples
  a stage-1 PPE's position embeddings and word -> patch convolution to another grid and its stem to another
  number of input channels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks.lvit import LViTEncoder, UpBlockPLAM
from .conditioned import ConditionedNetwork

__all__ = ["PromptEncoder", "MultiscaleFeatureFusion", "PatchMerging", "PatchExpand", "MPTPN", "SimSiamPredictors",
           "adapt_ppe_state", "PATCH_SIZES"]

#: patch-embedding kernels of the three levels (the grid is the same at every scale)
PATCH_SIZES = (16, 8, 4)


class ConvTransBN(nn.Module):
    """Conv1d(k3, padding 1) -> BatchNorm1d -> ReLU over (B, C_in, n) -> (B, C_out, n) (the authors' ConvTransBN)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block (B, N, C) -> (B, N, C): SDPA self-attention (qkv bias) and the authors' MLP."""

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViT width {dim} is not divisible by {num_heads} heads (base_channels must be a "
                             f"multiple of {num_heads})")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.GELU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class PatchEmbedding(nn.Module):
    """(B, C, H, W) -> (B, g_h g_w, C): Conv(k = s = patch) + learned position embedding + dropout."""

    def __init__(self, channels: int, patch: int, grid: tuple[int, int], dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, grid[0] * grid[1], channels))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.conv(x).flatten(2).transpose(1, 2) + self.position)


class Reconstruct(nn.Module):
    """Tokens (B, g_h g_w, C) -> (B, C_out, g_h s, g_w s): nearest upsampling x s, Conv1x1-BN-ReLU."""

    def __init__(self, channels: int, scale: int, grid: tuple[int, int]):
        super().__init__()
        self.scale, self.grid = scale, grid
        self.conv = nn.Conv2d(channels, channels, kernel_size=1)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        x = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], *self.grid)
        x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return torch.relu(self.norm(self.conv(x)))


def _zero_padding(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, C) with the padded tokens' rows set to 0."""
    return t * mask[..., None].to(t.dtype)


class PromptEncoder(nn.Module):
    """The prior prompt encoder (module docstring): (x, tokens, mask) -> [F0 (C @ H), F1 (2C @ H/2), F2 (4C @ H/4)].

    Args:
        in_channels: image channels (3 in stage 1; nnU-Net's input channels in stage 2, see ``adapt_ppe_state``).
        base_channels: C. text_dim: D of the token states. max_tokens: L (10 in the paper).
        image_size: (H, W), multiples of 16; fixes the token grid g = (H / 16, W / 16).
        num_heads: heads of every ViT block (8). down_vit / up_vit: the U-shaped ViT's halves (Table 3).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, text_dim: int = 768, max_tokens: int = 10,
                 image_size: Sequence[int] = (224, 224), num_heads: int = 8, dropout: float = 0.1,
                 down_vit: bool = True, up_vit: bool = True):
        super().__init__()
        size = tuple(int(s) for s in image_size)
        if len(size) != 2 or any(s % PATCH_SIZES[0] or s < PATCH_SIZES[0] for s in size):
            raise ValueError(f"the PPE needs a 2D size whose sides are multiples of {PATCH_SIZES[0]}, got {image_size}")
        c = int(base_channels)
        self.in_channels, self.base_channels, self.text_dim = int(in_channels), c, int(text_dim)
        self.max_tokens, self.image_size = int(max_tokens), size
        self.grid = (size[0] // PATCH_SIZES[0], size[1] // PATCH_SIZES[0])
        self.down_vit, self.up_vit = bool(down_vit), bool(up_vit)
        widths = [c, 2 * c, 4 * c]
        n = self.grid[0] * self.grid[1]
        self.image = LViTEncoder(in_channels, widths, [(1, 1), (2, 2), (2, 2)])
        self.embed = nn.ModuleList(PatchEmbedding(w, p, self.grid, dropout) for w, p in zip(widths, PATCH_SIZES))
        if self.down_vit:  # the note's only way in
            text_widths = [self.text_dim, 8 * c, 4 * c, 2 * c, c]
            self.text = nn.ModuleList(nn.Conv1d(a, b, kernel_size=3, padding=1)
                                      for a, b in zip(text_widths[:-1], text_widths[1:]))
            self.text_to_patches = ConvTransBN(self.max_tokens, n)
            self.down_blocks = nn.ModuleList(ViTBlock(w, num_heads, dropout=dropout) for w in widths)
            self.halve = nn.ModuleList(ConvTransBN(w, w // 2) for w in widths[1:])
        if self.up_vit:
            self.up_blocks = nn.ModuleList(ViTBlock(w, num_heads, dropout=dropout) for w in widths)
            self.from_below = nn.ModuleList(ConvTransBN(2 * w, w) for w in widths[:-1])
        self.reconstruct = nn.ModuleList(Reconstruct(w, p, self.grid) for w, p in zip(widths, PATCH_SIZES))

    @property
    def widths(self) -> list[int]:
        return [self.base_channels, 2 * self.base_channels, 4 * self.base_channels]

    def text_features(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D), (B, L) -> (B, L, C): the Conv1d chain with padded tokens held at zero."""
        t = _zero_padding(tokens, mask)
        for conv in self.text:
            t = _zero_padding(conv(t.transpose(1, 2)).transpose(1, 2), mask)
        return t

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        if tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"the PPE was built for {self.image_size} inputs (its token grid {self.grid}); got "
                             f"{tuple(x.shape[2:])}")
        if tokens.shape[1:] != (self.max_tokens, self.text_dim):
            raise ValueError(f"note tokens must be (B, {self.max_tokens}, {self.text_dim}), got {tuple(tokens.shape)}")
        maps = self.image(x)
        if self.down_vit:
            text = self.text_features(tokens, mask.bool())
            ys = []
            for i, (m, embed, block) in enumerate(zip(maps, self.embed, self.down_blocks)):
                y = embed(m)
                if i == 0:
                    y = y + self.text_to_patches(text)
                y = block(y)
                if i > 0:
                    y = torch.cat([self.halve[i - 1](y.transpose(1, 2)).transpose(1, 2), ys[-1]], 2)
                ys.append(y)
        else:  # the authors' ablation: patch embeddings only, so the note does not enter
            ys = [embed(m) for m, embed in zip(maps, self.embed)]
        if self.up_vit:
            ys[2] = self.up_blocks[2](ys[2])
            for i in (1, 0):
                ys[i] = self.up_blocks[i](ys[i]) + self.from_below[i](ys[i + 1].transpose(1, 2)).transpose(1, 2)
        return [rec(y) + m for rec, y, m in zip(self.reconstruct, ys, maps)]


class PatchMerging(nn.Module):
    """Swin's patch merging on maps: (B, c, H, W) -> (B, 2c, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * channels)
        self.reduction = nn.Linear(4 * channels, 2 * channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x)).permute(0, 3, 1, 2)


class PatchExpand(nn.Module):
    """Swin-Unet's patch expanding on maps: (B, c, H, W) -> (B, c/2, 2H, 2W) (channels as 2 x 2 x c/4 sub-pixels,
    LN, Linear c/4 -> c/2)."""

    def __init__(self, channels: int):
        super().__init__()
        if channels % 4:
            raise ValueError(f"PatchExpand splits channels into 2 x 2 sub-pixels: {channels} is not divisible by 4")
        self.norm = nn.LayerNorm(channels // 4)
        self.expand = nn.Linear(channels // 4, channels // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.permute(0, 2, 3, 1).reshape(b, h, w, 2, 2, c // 4).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, -1)
        return self.expand(self.norm(x)).permute(0, 3, 1, 2)


class MultiscaleFeatureFusion(nn.Module):
    """MSFF: [C @ H, 2C @ H/2, 4C @ H/4] -> [3C @ H, 6C @ H/2, 12C @ H/4]."""

    def __init__(self, base_channels: int):
        super().__init__()
        c = base_channels
        self.merge_0_1, self.merge_1_2 = PatchMerging(c), PatchMerging(2 * c)  # F0 -> H/2 -> H/4
        self.expand_1_0, self.merge_1_2b = PatchExpand(2 * c), PatchMerging(2 * c)  # F1 -> H and -> H/4
        self.expand_2_1, self.expand_1_0b = PatchExpand(4 * c), PatchExpand(2 * c)  # F2 -> H/2 -> H

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        f0, f1, f2 = features
        f0_1 = self.merge_0_1(f0)
        f2_1 = self.expand_2_1(f2)
        return [torch.cat([f0, self.expand_1_0(f1), self.expand_1_0b(f2_1)], 1),
                torch.cat([f0_1, f1, f2_1], 1),
                torch.cat([self.merge_1_2(f0_1), self.merge_1_2b(f1), f2], 1)]


class MPTPN(ConditionedNetwork):
    """MPTPN's segmentation network (stage 2): PPE -> MSFF -> UpAttention -> background-fixed logits.

    Args:
        in_channels, num_classes: nnU-Net's input channels and output channels (background + K classes).
        text_dim, max_tokens: D and L of the note token states.
        patch_size: (H, W), multiples of 16. base_channels: C. num_heads: the PPE's ViT heads.
        down_vit, up_vit, msff, up_attention: the Table 3 ablations (module docstring).
    """

    def __init__(self, in_channels: int, num_classes: int, text_dim: int, max_tokens: int,
                 patch_size: Sequence[int], base_channels: int = 64, num_heads: int = 8, dropout: float = 0.1,
                 down_vit: bool = True, up_vit: bool = True, msff: bool = True, up_attention: bool = True):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"MPTPN predicts background + at least one class, got num_classes={num_classes}")
        self.num_classes, self.patch_size = int(num_classes), tuple(int(p) for p in patch_size)
        self.variant = {"down_vit": bool(down_vit), "up_vit": bool(up_vit), "msff": bool(msff),
                        "up_attention": bool(up_attention)}
        c = int(base_channels)
        self.ppe = PromptEncoder(in_channels, c, text_dim, max_tokens, self.patch_size, num_heads, dropout,
                                 down_vit, up_vit)
        self.msff = MultiscaleFeatureFusion(c) if msff else None
        w = [3 * c, 6 * c, 12 * c] if msff else [c, 2 * c, 4 * c]
        if up_attention:
            self.up = nn.ModuleList([UpBlockPLAM(w[2], w[1], w[1]), UpBlockPLAM(w[1], w[0], w[0])])
            head_in = w[0]
        else:  # the authors' ablation: every scale expanded to H and concatenated
            self.expand = nn.ModuleList([PatchExpand(w[1]), PatchExpand(w[2]), PatchExpand(w[1])])
            head_in = w[0] + w[1] // 2 + w[1] // 2
        self.head = nn.Conv2d(head_in, self.num_classes - 1, kernel_size=1)

    @property
    def text_dim(self) -> int:
        return self.ppe.text_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, cond = self.condition(x)
        return self.segment(x, cond["tokens"], cond["mask"])

    def segment(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W), tokens (B, L, D), mask (B, L) -> logits (B, num_classes, H, W), background 0."""
        f = self.ppe(x, tokens, mask)
        if self.msff is not None:
            f = self.msff(f)
        if hasattr(self, "up"):
            y = self.up[1](self.up[0](f[2], f[1]), f[0])
        else:
            y = torch.cat([f[0], self.expand[0](f[1]), self.expand[2](self.expand[1](f[2]))], 1)
        logits = self.head(y)
        return torch.cat((torch.zeros_like(logits[:, :1]), logits), 1)

    def parameter_groups(self) -> dict[str, int]:
        parts = {"ppe": self.ppe, "msff": self.msff, "up_attention": getattr(self, "up", None),
                 "expand": getattr(self, "expand", None), "head": self.head}
        return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if m is not None}


#: stage 1's projection: "dense" = Algorithm 1 (P = G(Y) on the PPE's feature maps, compared pixel by pixel);
#: "pool" = the authors' simsiam/builder.py (a global average pool, then an MLP on the pooled vectors)
SIMSIAM_PROJECTIONS = ("dense", "pool")


class SimSiamPredictors(nn.Module):
    """Stage 1's predictor G per scale (seed 003, Algorithm 1, lines 4-6: Y = F(X, X_text), P = G(Y),
    L = D(P_1, Y_2) + D(P_2, Y_1)).

    ``projection="dense"`` (the paper): Y_i is the PPE's feature map (B, c_i, H_i, W_i) itself and G_i a
    convolutional head Conv1x1(c, c, no bias) -> LeakyReLU -> Conv1x1(c, c), so P_i has Y_i's shape and D compares
    the two views pixel by pixel (views are never cropped or flipped, so their pixels correspond). Algorithm 1 has
    no pooling; the related-work sentence "This paper uses a simple convolutional projection head to obtain dense
    pixel-level features" (§2.2) is the dense reading. The head's layers are the paper's silence ("The predictor
    layer", §3.2.1): the authors' MLP, as 1x1 convolutions.
    ``projection="pool"`` (the authors' simsiam/builder.py): z_i = GAP(F_i) (B, c_i), then Linear(c, c, no bias) ->
    LeakyReLU -> Linear(c, c). Both have the same parameters (2 c^2 + c per scale) and load into each other.
    """

    def __init__(self, widths: Sequence[int], projection: str = "dense"):
        super().__init__()
        if projection not in SIMSIAM_PROJECTIONS:
            raise ValueError(f"projection must be one of {SIMSIAM_PROJECTIONS}, got {projection!r}")
        self.projection = projection
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(w, w, bias=False), nn.LeakyReLU(inplace=True),
                                                 nn.Linear(w, w)) for w in widths)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """PPE outputs -> (targets z_i, predictions p_i): (B, c_i, H_i, W_i) each when dense, (B, c_i) pooled."""
        if self.projection == "pool":
            z = [f.mean((2, 3)) for f in features]
            return z, [head(zi) for head, zi in zip(self.heads, z)]
        # a Linear over the channel axis of every pixel is a 1x1 convolution
        return list(features), [head(f.movedim(1, -1)).movedim(-1, 1) for head, f in zip(self.heads, features)]


def _resample_grid(t: torch.Tensor, old: tuple[int, int], new: tuple[int, int], dim: int) -> torch.Tensor:
    """Resample axis ``dim`` of ``t`` (length old_h * old_w, raster order) to new_h * new_w, bicubic."""
    t = t.movedim(dim, -1)
    lead = t.shape[:-1]
    grid = t.reshape(-1, 1, *old).float()
    out = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return out.reshape(*lead, new[0] * new[1]).movedim(-1, dim).to(t.dtype)


def adapt_ppe_state(state: dict[str, torch.Tensor], source: dict, target: PromptEncoder) -> tuple[dict, list[str]]:
    """A stage-1 PPE state dict made loadable into ``target``; returns (state, what was adapted).

    ``source``: the stage-1 geometry {"in_channels", "image_size"}. Adaptations (both standard for pretrained
    ViTs / CNNs fine-tuned elsewhere):
    - another token grid (another patch size): the position embeddings and the word -> patch ConvTransBN
      (its output channels are the grid's patches: weight, bias, BN affine and running statistics) are
      resampled bicubically over the grid (the running variances in log space, so they stay positive);
    - another number of input channels: the stem's weights are summed over the RGB channels for one channel (a
      grey image then gives exactly what its RGB copy gave in stage 1, both being z-scored per channel), or
      cycled and scaled by 3 / C_in otherwise.
    Keys of ablated modules the target lacks (e.g. the up-ViTs of ``up_vit=False``) are dropped and reported.
    """
    state, notes = dict(state), []
    src_grid = tuple(s // PATCH_SIZES[0] for s in source["image_size"])
    if src_grid != target.grid:
        keys = [k for k in state if k.startswith("embed.") and k.endswith(".position")]
        keys += [k for k in state if k.startswith("text_to_patches.") and not k.endswith("num_batches_tracked")]
        for k in keys:
            dim = 1 if k.endswith(".position") else 0
            if k.endswith("running_var"):  # bicubic overshoot must not make a variance negative
                state[k] = _resample_grid(state[k].clamp_min(1e-12).log(), src_grid, target.grid, dim).exp()
            else:
                state[k] = _resample_grid(state[k], src_grid, target.grid, dim)
        notes.append(f"token grid {src_grid[0]}x{src_grid[1]} -> {target.grid[0]}x{target.grid[1]}: position "
                     "embeddings and the word-to-patch convolution resampled (bicubic)")
    stem = "image.stages.0.0.weight"
    c_src, c_dst = int(source["in_channels"]), target.in_channels
    if c_src != c_dst:
        w = state[stem]
        if c_dst == 1:
            state[stem] = w.sum(1, keepdim=True)
        else:
            state[stem] = w[:, [i % c_src for i in range(c_dst)]] * (c_src / c_dst)
        notes.append(f"stem: {c_src} -> {c_dst} input channels ("
                     + ("weights summed over channels" if c_dst == 1 else f"cycled, scaled by {c_src}/{c_dst}") + ")")
    own = target.state_dict()
    dropped = sorted(k for k in state if k not in own)
    for k in dropped:
        del state[k]
    if dropped:
        groups = sorted({k.split(".")[0] for k in dropped})
        notes.append(f"not in this variant, not loaded: {', '.join(groups)}")
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise ValueError(f"the stage-1 PPE lacks {len(missing)} tensors this network needs (e.g. {missing[0]}): it "
                         "was pretrained with another architecture; pretrain again with this trainer's settings")
    bad = [k for k in own if state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"the stage-1 PPE's {bad[0]} is {tuple(state[bad[0]].shape)}, this network needs "
                         f"{tuple(own[bad[0]].shape)}: pretrain with the same base channels, text encoder and "
                         "max tokens as the trainer")
    return state, notes

