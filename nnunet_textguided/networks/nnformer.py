"""nnFormer (Zhou et al., "nnFormer: Interleaved Transformer for Volumetric Segmentation") for nnU-Net v2 plans.

Reimplemented after the authors' 282857341/nnFormer network_architecture/nnFormer_{synapse,acdc}.py: same
math, shapes and parameter structure (so parameter counts match and their checkpoints load), one class for
both files. Pure PyTorch; nnU-Net builds it from plans through ``get_network_from_plans``
(network_class_name ``nnunet_textguided.networks.nnformer.NnFormer``).

Architecture, input (B, C_in, D, H, W) with (D, H, W) == crop_size:
- Patch embedding: two conv pairs (Conv3d k3 -> GELU -> LayerNorm, twice) splitting ``patch_size`` into two
  strides, then LayerNorm -> stage-0 grid crop // patch_size, ``embed_dim`` channels.
- Encoder stage k (dim E*2^k): ``depths[k]`` Swin blocks, window-based multi-head self-attention with
  shifted windows in every second block, nnFormer's relative-position index; the stage output goes through
  LayerNorm ``norm{k}`` and becomes skip k. Patch merging (GELU -> LayerNorm -> Conv3d C -> 2C, kernel 3
  and stride 2 along the axes that are downsampled, kernel 1 / stride 1 elsewhere) feeds stage k+1.
  The last stage is the bottleneck; in both paper configurations its window is the whole grid, i.e. plain
  global self-attention (shift forced to 0).
- Decoder stage k (k = n-2 .. 0): patch expanding (LayerNorm -> ConvTranspose3d 2C -> C), then nnFormer's
  skip attention block (queries = the upsampled tokens, keys/values = the encoder skip, no query
  projection), then ``depths[k] - 1`` shifted-window Swin blocks.
- Heads: ConvTranspose3d(E*2^k -> num_classes, kernel = stride = patch_size) on decoder stage k, so output
  k has the shape grid_k * patch_size: the input crop for k = 0, coarser for deep supervision.

Configurations (the two authors' files, expressed by one constructor):
- Synapse: crop [64,128,128], embed_dim 192, depths [2,2,2,2], num_heads [6,12,24,48], patch [2,4,4],
  window_size [4,4,8,4], down_stride None (= patch * 2^k per stage).
- ACDC: crop [14,160,160], embed_dim 96, num_heads [3,6,12,24], patch [1,4,4],
  window_size [[3,5,5],[3,5,5],[7,10,10],[3,5,5]], down_stride [[1,4,4],[1,8,8],[2,16,16],[4,32,32]].

Deviations, all equal to the authors' code on both paper configurations:
- A window larger than the grid is clamped per axis, and an axis whose window covers the grid is not
  shifted. The Synapse file clamps a cubic window to min(grid) on all axes; the ACDC file only unshifts a
  window that equals the grid.
- Merging along an odd-sized axis uses padding 0 (the ACDC file's 7 -> 3 depth merge), so every grid is
  crop // down_stride; the matching decoder ConvTranspose3d gets output_padding 1 (the ACDC file's 3 -> 7).
- ``shifted_window_mask=True`` masks attention across the wrapped-around border of shifted windows, as the
  Synapse file (and Swin) do. The ACDC file rolls the windows without that mask; ``False`` reproduces it.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

# the window machinery lives in blocks/windows.py (CDPDNet's fusion reuses it); relative_position_index is
# re-exported here with nnFormer's default index
from .blocks.windows import (WindowAttention, WindowedBlock, relative_position_index,
                             tokens_to_volume as _tokens_to_volume, volume_to_tokens as _volume_to_tokens)

__all__ = ["NnFormer", "load_nnformer_checkpoint", "relative_position_index"]


def _triple(value) -> tuple[int, int, int]:
    t = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * 3
    if len(t) != 3:
        raise ValueError(f"expected one int or three, got {value!r}")
    return t


class SwinBlock(WindowedBlock):
    """nnFormer's (shifted-)window self-attention block: (B, N, C) -> (B, N, C), N = D*H*W of ``grid``.

    Pre-LayerNorm -> window attention -> DropPath residual; LayerNorm -> MLP 4x -> DropPath residual.
    The grid is fixed at construction (window partition and shift mask depend on it), so the block is a
    standalone function of its tokens; with a window covering the grid it is global self-attention.
    """

    def __init__(self, dim: int, grid, num_heads: int, window, shifted: bool = False, drop_path: float = 0.0,
                 shifted_window_mask: bool = True):
        super().__init__(dim, grid, num_heads, window, shifted, drop_path, shifted_window_mask, mode="self")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._attend(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SkipAttentionBlock(WindowedBlock):
    """nnFormer's skip attention (first block of each decoder stage), unshifted windows.

    (x_up, skip) both (B, N, C) -> (B, N, C): the residual stream is x_up + skip; attention takes keys and
    values from LayerNorm(skip) and uses LayerNorm(x_up) directly as queries (shared LayerNorm).
    """

    def __init__(self, dim: int, grid, num_heads: int, window, drop_path: float = 0.0):
        super().__init__(dim, grid, num_heads, window, False, drop_path, False, mode="skip")

    def forward(self, x_up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = x_up + skip + self.drop_path(self._attend(self.norm1(skip), self.norm1(x_up)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvProjection(nn.Module):
    """One half of the patch embedding: Conv3d k3 (stride) -> GELU -> LayerNorm -> Conv3d k3 [-> GELU -> LayerNorm].

    The second GELU/LayerNorm is left out in the last half (``last``), where the embedding's own norm follows.
    """

    def __init__(self, in_dim: int, out_dim: int, stride, last: bool):
        super().__init__()
        self.conv1 = nn.Conv3d(in_dim, out_dim, kernel_size=3, stride=stride, padding=1)
        self.conv2 = nn.Conv3d(out_dim, out_dim, kernel_size=3, stride=1, padding=1)
        self.activate = nn.GELU()
        self.norm1 = nn.LayerNorm(out_dim)
        self.norm2 = None if last else nn.LayerNorm(out_dim)

    @staticmethod
    def _channel_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.movedim(1, -1)).movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self._channel_norm(self.norm1, self.activate(self.conv1(x))))
        if self.norm2 is not None:
            x = self._channel_norm(self.norm2, self.activate(x))
        return x


class PatchEmbed(nn.Module):
    """(B, C_in, D, H, W) -> (B, E, D/pd, H/ph, W/pw). Each patch axis p in {1, 2, 4} is split into strides
    (min(p, 2), p // min(p, 2)) over the two halves — the split both authors' files use."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size):
        super().__init__()
        stride1 = tuple(min(p, 2) for p in patch_size)
        stride2 = tuple(p // s for p, s in zip(patch_size, stride1))
        self.proj1 = ConvProjection(in_chans, embed_dim // 2, stride1, last=False)
        self.proj2 = ConvProjection(embed_dim // 2, embed_dim, stride2, last=True)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj2(self.proj1(x)).movedim(1, -1)).movedim(-1, 1)


class PatchMerging(nn.Module):
    """Tokens (B, N, C) on ``grid`` -> GELU -> LayerNorm -> Conv3d(C -> 2C) -> tokens (B, N', 2C) on grid // stride.

    Kernel 3 / stride 2 along downsampled axes (padding 1 if the axis is even, 0 if odd, so the output is
    always n // 2), kernel 1 / stride 1 along the others (the ACDC file's k[1,3,3] s[1,2,2] merge).
    """

    def __init__(self, dim: int, grid, stride):
        super().__init__()
        self.grid = tuple(grid)
        kernel = tuple(3 if s == 2 else 1 for s in stride)
        padding = tuple(1 if s == 2 and n % 2 == 0 else 0 for s, n in zip(stride, self.grid))
        self.norm = nn.LayerNorm(dim)
        self.reduction = nn.Conv3d(dim, 2 * dim, kernel_size=kernel, stride=tuple(stride), padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(x))
        return _volume_to_tokens(self.reduction(_tokens_to_volume(x, self.grid)))


class PatchExpanding(nn.Module):
    """Tokens (B, N, 2C) on ``grid`` -> LayerNorm -> ConvTranspose3d(2C -> C, kernel = stride) -> (B, N', C)
    on ``out_grid``; output_padding restores an odd axis that merging floored (ACDC: 3 -> 7)."""

    def __init__(self, dim: int, grid, out_grid, stride):
        super().__init__()
        self.grid = tuple(grid)
        output_padding = tuple(o - g * s for o, g, s in zip(out_grid, self.grid, stride))
        self.norm = nn.LayerNorm(dim)
        self.up = nn.ConvTranspose3d(dim, dim // 2, kernel_size=tuple(stride), stride=tuple(stride),
                                     output_padding=output_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _volume_to_tokens(self.up(_tokens_to_volume(self.norm(x), self.grid)))


class EncoderStage(nn.Module):
    """``depth`` Swin blocks (shifted in every second one); holds the stage's patch merging, which the encoder
    applies after taking the skip (the skip is normalised, the merged tokens are not)."""

    def __init__(self, dim, grid, depth, num_heads, window, drop_paths, downsample: PatchMerging | None,
                 shifted_window_mask: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, grid, num_heads, window, shifted=i % 2 == 1, drop_path=drop_paths[i],
                      shifted_window_mask=shifted_window_mask) for i in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class DecoderStage(nn.Module):
    """Patch expanding of the coarser tokens, skip attention with the encoder skip, ``depth - 1`` shifted
    Swin blocks (the authors shift all of them, not every second one)."""

    def __init__(self, dim, grid, coarse_grid, stride, depth, num_heads, window, drop_paths,
                 shifted_window_mask: bool):
        super().__init__()
        self.upsample = PatchExpanding(2 * dim, coarse_grid, grid, stride)
        self.blocks = nn.ModuleList([SkipAttentionBlock(dim, grid, num_heads, window, drop_paths[0])] + [
            SwinBlock(dim, grid, num_heads, window, shifted=True, drop_path=drop_paths[i],
                      shifted_window_mask=shifted_window_mask) for i in range(1, depth)])

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0](self.upsample(coarse), skip)
        for block in self.blocks[1:]:
            x = block(x)
        return x


class Head(nn.Module):
    """ConvTranspose3d(C -> classes, kernel = stride = patch_size): decoder grid -> grid * patch_size."""

    def __init__(self, dim: int, num_classes: int, patch_size):
        super().__init__()
        self.up = nn.ConvTranspose3d(dim, num_classes, kernel_size=tuple(patch_size), stride=tuple(patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class NnFormerEncoder(nn.Module):
    """(B, C_in, *crop_size) -> skips [k]: (B, E*2^k, *grids[k]); the last skip is the bottleneck after norm{n-1}."""

    def __init__(self, input_channels, crop_size, embed_dim, depths, num_heads, patch_size, windows, grids,
                 merge_strides, drop_path_rate, shifted_window_mask):
        super().__init__()
        self.crop_size = tuple(crop_size)
        self.grids = grids
        n = len(depths)
        self.patch_embed = PatchEmbed(input_channels, embed_dim, patch_size)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for k in range(n):
            dim = embed_dim * 2 ** k
            down = PatchMerging(dim, grids[k], merge_strides[k]) if k < n - 1 else None
            self.layers.append(EncoderStage(dim, grids[k], depths[k], num_heads[k], windows[k],
                                            dpr[sum(depths[:k]):sum(depths[:k + 1])], down, shifted_window_mask))
        for k in range(n):
            self.add_module(f"norm{k}", nn.LayerNorm(embed_dim * 2 ** k))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if tuple(x.shape[2:]) != self.crop_size:
            raise ValueError(f"nnFormer is built for crop {self.crop_size} (windows and masks are fixed), "
                             f"got input {tuple(x.shape)}")
        x = _volume_to_tokens(self.patch_embed(x))
        skips = []
        for k, layer in enumerate(self.layers):
            x = layer(x)
            skips.append(_tokens_to_volume(getattr(self, f"norm{k}")(x), self.grids[k]))
            if layer.downsample is not None:
                x = layer.downsample(x)
        return skips


class NnFormerDecoder(nn.Module):
    """skips (as the encoder returns them) -> logits (B, classes, *crop_size), or with ``deep_supervision``
    one output per decoder stage, highest resolution first: [k] has shape grids[k] * patch_size."""

    def __init__(self, num_classes, embed_dim, depths, num_heads, patch_size, windows, grids, merge_strides,
                 drop_path_rate, deep_supervision, shifted_window_mask):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.grids = grids
        n = len(depths)
        # drop path grows towards the output: the deepest decoder stage takes the first rates
        dpr = torch.linspace(0, drop_path_rate, sum(depths[:-1]), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for k in range(n - 1):
            start = sum(depths[k + 1:n - 1])
            self.layers.append(DecoderStage(embed_dim * 2 ** k, grids[k], grids[k + 1], merge_strides[k],
                                            depths[k], num_heads[k], windows[k], dpr[start:start + depths[k]],
                                            shifted_window_mask))
        # one head per decoder stage even without deep supervision, because nnU-Net toggles it at run time
        self.final = nn.ModuleList(Head(embed_dim * 2 ** k, num_classes, patch_size) for k in range(n - 1))

    def forward(self, skips: list[torch.Tensor]):
        x = _volume_to_tokens(skips[-1])
        outs = []
        for k in reversed(range(len(self.layers))):
            x = self.layers[k](x, _volume_to_tokens(skips[k]))
            outs.append(x)
        outs = outs[::-1]  # stage 0 (finest) first
        if not self.deep_supervision:
            return self.final[0](_tokens_to_volume(outs[0], self.grids[0]))
        return [head(_tokens_to_volume(o, g)) for head, o, g in zip(self.final, outs, self.grids)]


def _check_conv_op(conv_op) -> None:
    name = conv_op if isinstance(conv_op, str) else f"{conv_op.__module__}.{conv_op.__qualname__}"
    if name.rsplit(".", 1)[-1] != "Conv3d":
        raise ValueError(f"nnFormer is 3D only; conv_op {name} is not supported")


class NnFormer(nn.Module):
    """nnFormer as an nnU-Net v2 network: ``cls(input_channels=, num_classes=, **arch_kwargs)`` with JSON kwargs.

    Args:
        input_channels, num_classes: from nnU-Net (modalities; labels incl. background).
        crop_size: [D, H, W] input patch = the plans' patch_size; the network only accepts this size.
        embed_dim: E, channels of stage 0 (stage k has E*2^k).
        depths, num_heads: per stage (blocks, heads); the last stage is the bottleneck.
        patch_size: per-axis patch of the embedding, each 1, 2 or 4.
        window_size: per stage one int (cubic window, Synapse) or [wd, wh, ww] (ACDC).
        down_stride: per stage the cumulative stride of its grid w.r.t. the input; [0] must equal patch_size
            and consecutive ratios must be 1 or 2 per axis. None: patch_size * 2^k (Synapse).
        drop_path_rate: stochastic depth, linear from 0 over the encoder blocks (and again over the decoder).
        deep_supervision: return one output per decoder stage (see ``deep_supervision_strides``).
        conv_op: accepted for nnU-Net-style plans; only Conv3d.
        strides: the plans' "strides" (nnU-Net reads its deep-supervision scales from them); if given it
            must equal ``deep_supervision_strides(patch_size, len(depths), down_stride)``.
        shifted_window_mask: mask shifted windows across the wrap-around border (Synapse file, Swin);
            False reproduces the ACDC file.
        **ignored: other plans keys, ignored with a warning.

    ``encoder(x)`` -> skips, ``decoder(skips)`` -> logits, ``forward = decoder(encoder(x))``.
    ``grids`` lists the per-stage (D, H, W) token grids and ``channels`` the per-stage widths.
    """

    def __init__(self, input_channels: int, num_classes: int, crop_size: list[int], embed_dim: int,
                 depths: list[int], num_heads: list[int], patch_size: list[int], window_size: list,
                 down_stride: list[list[int]] | None = None, drop_path_rate: float = 0.2,
                 deep_supervision: bool = True, conv_op=None, strides: list[list[int]] | None = None,
                 shifted_window_mask: bool = True, **ignored):
        super().__init__()
        if ignored:
            warnings.warn(f"NnFormer ignores arch_kwargs {sorted(ignored)}", stacklevel=2)
        if conv_op is not None:
            _check_conv_op(conv_op)
        n = len(depths)
        if n < 2 or len(num_heads) != n or len(window_size) != n:
            raise ValueError("depths, num_heads and window_size need one entry per stage (at least 2 stages)")
        crop, patch = _triple(crop_size), _triple(patch_size)
        if any(p not in (1, 2, 4) for p in patch):
            raise ValueError(f"patch_size {patch}: each axis must be 1, 2 or 4 (two conv strides of 1 or 2)")
        if embed_dim % 2:
            raise ValueError("embed_dim must be even (the first embedding half has embed_dim // 2 channels)")
        cumulative = self._cumulative_strides(patch, n, down_stride)
        merge_strides = [tuple(b // a for a, b in zip(cumulative[k], cumulative[k + 1])) for k in range(n - 1)]
        for k in range(n - 1):
            if any(c % s for c, s in zip(crop, cumulative[k])):
                raise ValueError(f"crop {crop} must be divisible by the stride {cumulative[k]} of stage {k} "
                                 "(only the bottleneck may round down)")
        if strides is not None:
            expected = self.deep_supervision_strides(patch, n, down_stride)
            if [list(s) for s in strides] != expected:
                raise ValueError(f"plans strides {strides} do not describe nnFormer's deep-supervision outputs; "
                                 f"use {expected}")
        self.grids = [tuple(c // s for c, s in zip(crop, cumulative[k])) for k in range(n)]
        self.channels = [embed_dim * 2 ** k for k in range(n)]
        windows = [_triple(w) for w in window_size]
        self.encoder = NnFormerEncoder(input_channels, crop, embed_dim, depths, num_heads, patch, windows,
                                       self.grids, merge_strides, drop_path_rate, shifted_window_mask)
        self.decoder = NnFormerDecoder(num_classes, embed_dim, depths, num_heads, patch, windows, self.grids,
                                       merge_strides, drop_path_rate, deep_supervision, shifted_window_mask)

    @staticmethod
    def _cumulative_strides(patch, num_stages: int, down_stride) -> list[tuple[int, int, int]]:
        if down_stride is None:
            return [tuple(p * 2 ** k for p in patch) for k in range(num_stages)]
        cumulative = [_triple(s) for s in down_stride]
        if len(cumulative) != num_stages or cumulative[0] != tuple(patch):
            raise ValueError(f"down_stride {down_stride} needs {num_stages} entries starting with patch_size")
        for a, b in zip(cumulative, cumulative[1:]):
            if any(y % x or y // x not in (1, 2) for x, y in zip(a, b)):
                raise ValueError(f"down_stride {down_stride}: consecutive stages must differ by 1 or 2 per axis")
        return cumulative

    @staticmethod
    def deep_supervision_strides(patch_size: list[int], num_stages: int,
                                 down_stride: list[list[int]] | None = None) -> list[list[int]]:
        """The "strides" (``pool_op_kernel_sizes``) the plans must carry for nnFormer.

        nnU-Net's deep-supervision scales are ``1 / cumprod(strides)[:-1]``. nnFormer's output k has shape
        grid_k * patch_size = crop / (down_stride[k] / down_stride[0]), k = 0 .. n-2, so the rule is
        strides = [[1, 1, 1]] + [down_stride[k] / down_stride[k-1] for k = 1 .. n-1], i.e. the patch-merging
        strides behind a unit first entry. Synapse: [[1,1,1],[2,2,2],[2,2,2],[2,2,2]];
        ACDC: [[1,1,1],[1,2,2],[2,2,2],[2,2,2]]. This yields exactly one scale per output. As for its own
        UNets, nnU-Net then gives the coarsest output loss weight 0 (weights 1, 1/2, 0 normalised), whereas
        the authors' trainer weighted all three 1 : 1/2 : 1/4.
        """
        cumulative = NnFormer._cumulative_strides(_triple(patch_size), num_stages, down_stride)
        return [[1, 1, 1]] + [[b // a for a, b in zip(cumulative[k - 1], cumulative[k])]
                              for k in range(1, num_stages)]

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))

    def bottleneck_blocks(self) -> list[SwinBlock]:
        """The bottleneck stage's blocks, each ``block(tokens)`` on (B, N, C), N = D_b*H_b*W_b in (d, h, w)
        raster order. Global self-attention when the window covers the grid (both paper configurations).
        A deepcopy works standalone: grid, relative index and mask live in the block."""
        return list(self.encoder.layers[-1].blocks)

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """Per-module init for ``network.apply``: what the authors' code ends up with.

        Conv3d / ConvTranspose3d: He normal (negative slope 1e-2), bias 0 — nnU-Net's InitWeights_He, which
        nnFormer's trainer applies when it restarts; relative-position bias tables: truncated normal
        (std 0.02) as the authors initialise them. Linear and LayerNorm keep PyTorch's default init, which
        nnFormer never overrides.
        """
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(module.weight, a=1e-2)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, WindowAttention):
            nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)


# authors' key prefixes -> ours (applied after stripping 'module.'); Patch_Expanding's attribute was 'Upsample'
_KEY_PREFIXES = (("model_down.", "encoder."), ("final.", "decoder.final."))


def _authors_key_to_ours(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    for theirs, ours in _KEY_PREFIXES:
        if key.startswith(theirs):
            key = ours + key[len(theirs):]
            break
    return key.replace(".Upsample.", ".upsample.")


def load_nnformer_checkpoint(network: nn.Module, path, weights_only: bool = True) -> dict:
    """Load an nnFormer checkpoint (authors' .model / .pth, or one of ours) into ``network``.

    Accepts a bare state dict or a dict holding it under 'state_dict' (nnFormer / nnU-Net v1 trainers) or
    'network_weights' (nnU-Net v2). Key mapping: strip 'module.' (DataParallel), 'model_down.' -> 'encoder.',
    'final.' -> 'decoder.final.', '.Upsample.' -> '.upsample.'; everything else is named as the authors do.
    Tensors with the right name and shape are loaded (strict=False); the rest is reported, never dropped
    silently. nnU-Net v1 '.model' files pickle numpy objects: pass weights_only=False for such trusted files.

    Returns {"matched": n loaded, "missing": our keys left as initialised, "unexpected": checkpoint keys
    with no counterpart, "shape_mismatch": ["ckpt_key -> our_key: ckpt shape vs ours", ...]}.
    ACDC-trained checkpoints (no deep supervision) lack decoder.final.1/2, which show up as missing.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    state = checkpoint
    for holder in ("state_dict", "network_weights"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(holder), dict):
            state = checkpoint[holder]
            break
    ours = network.state_dict()
    to_load, unexpected, shape_mismatch, mismatched = {}, [], [], set()
    for key, value in state.items():
        mapped = _authors_key_to_ours(key)
        if mapped not in ours:
            unexpected.append(key)
        elif ours[mapped].shape != value.shape:
            shape_mismatch.append(f"{key} -> {mapped}: {tuple(value.shape)} vs {tuple(ours[mapped].shape)}")
            mismatched.add(mapped)
        else:
            to_load[mapped] = value
    network.load_state_dict(to_load, strict=False)
    missing = [k for k in ours if k not in to_load and k not in mismatched]
    return {"matched": len(to_load), "missing": missing, "unexpected": unexpected, "shape_mismatch": shape_mismatch}
