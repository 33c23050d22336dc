"""BiCLIP (seed 000) on any nnU-Net encoder/decoder backbone (PlainConvUNet, ResEnc UNet; nnFormer later).

Per-slice embedding streams (PMC-CLIP image embedding, CoCa caption embedding) -> one 3D CLIP adapter each
-> (B, D_b, C) -> broadcast over the bottleneck's H x W -> summed over streams (pixel-level combination) ->
concatenated with the bottleneck features -> per-voxel MLP (2C -> C -> C) -> two global self-attention
blocks -> replaces the bottleneck skip -> the backbone's decoder.
With no streams (ablation Net1) the forward is exactly the backbone's.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import GlobalSelfAttentionBlock, SliceEmbeddingAdapter
from .conditioned import ConditionedNetwork


class BiCLIPNetwork(ConditionedNetwork):
    """Args:
        backbone: an nn.Module with ``encoder(x) -> list of skips`` and ``decoder(skips)`` (nnU-Net's UNets).
        streams: {stream name: embedding size E} — e.g. {"image": 768, "caption": 768}; empty for Net1.
        num_slices: D, slices in the input patch (patch_size[0]).
        bottleneck_grid: (D_b, H_b, W_b) of the deepest skip for that patch.
        bottleneck_channels: C of the deepest skip.
        num_heads: heads of the two global self-attention blocks (default C // 32, at least 1).
        adapter_hidden: adapter MLP width (default E // 4: 192 for 768-d embeddings as in the paper).
        num_attention_blocks: 2 in the paper.
        attention_init: "bottleneck" (the paper: the new layers are built like the backbone's last bottleneck
            layer and start from its weights — copied, not shared; needs ``backbone.bottleneck_blocks()``, as
            nnFormer has) or "fresh" (new global self-attention blocks; the only option for CNN backbones).
        fusion_hidden: width of the fusion MLP 2C -> hidden -> C (default C; the paper gives none).
        combine: how the per-stream CLIP maps combine pixel-wise: "sum" (the plain reading) or "mean".
    """

    def __init__(self, backbone: nn.Module, streams: dict[str, int], num_slices: int,
                 bottleneck_grid: tuple[int, int, int], bottleneck_channels: int, num_heads: int | None = None,
                 adapter_hidden: int | None = None, num_attention_blocks: int = 2, drop_path: float = 0.0,
                 attention_init: str = "fresh", fusion_hidden: int | None = None, combine: str = "sum"):
        super().__init__()
        self.backbone = backbone
        self.stream_names = tuple(streams)
        if combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {combine!r}")
        self.combine = combine
        c = bottleneck_channels
        self.adapters = nn.ModuleDict({
            name: SliceEmbeddingAdapter(e, c, num_slices, bottleneck_grid[0], hidden=adapter_hidden)
            for name, e in streams.items()})
        if streams:
            heads = num_heads or max(1, c // 32)
            hidden = fusion_hidden or c
            self.fuse = nn.Sequential(nn.Linear(2 * c, hidden), nn.GELU(), nn.Linear(hidden, c))
            if attention_init not in ("bottleneck", "fresh"):
                raise ValueError(f"attention_init must be 'bottleneck' or 'fresh', got {attention_init!r}")
            if attention_init == "bottleneck":
                if not hasattr(backbone, "bottleneck_blocks"):
                    raise ValueError(f"attention_init='bottleneck' copies the backbone's last bottleneck attention "
                                     f"layer, but {type(backbone).__name__} has none; use attention_init='fresh'")
                last = backbone.bottleneck_blocks()[-1]
                self.attention = nn.ModuleList(copy.deepcopy(last) for _ in range(num_attention_blocks))
            else:
                self.attention = nn.ModuleList(
                    GlobalSelfAttentionBlock(c, heads, tuple(bottleneck_grid), drop_path=drop_path)
                    for _ in range(num_attention_blocks))

    def reset_attention_from_bottleneck(self) -> None:
        """Copy the backbone's last bottleneck layer into the fused attention layers again (after loading
        pretrained backbone weights, so that they start from those weights as in the paper)."""
        if hasattr(self, "attention") and hasattr(self.backbone, "bottleneck_blocks"):
            last = self.backbone.bottleneck_blocks()[-1].state_dict()
            for block in self.attention:
                block.load_state_dict(last)

    @property
    def decoder(self):
        # nnU-Net toggles deep supervision through network.decoder.deep_supervision
        return self.backbone.decoder

    @property
    def encoder(self):
        return self.backbone.encoder

    def fuse_bottleneck(self, feat: torch.Tensor, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        """feat (B, C, D_b, H_b, W_b), embeddings {stream: (B, D, E)} -> fused (B, C, D_b, H_b, W_b)."""
        b, c, d, h, w = feat.shape
        clip = sum(self.adapters[n](embeddings[n].to(feat.dtype)) for n in self.stream_names)  # (B, D_b, C)
        if self.combine == "mean":
            clip = clip / len(self.stream_names)
        # fuse[0] maps concat(feat, clip broadcast over H x W) per voxel; its clip half is the same for every
        # voxel of a bottleneck slice, so it runs once per slice and is added (the same function and parameters
        # as the concatenation, without materialising it: half the first layer's work at (B, N, 2C))
        first = self.fuse[0]
        per_voxel = F.linear(feat.flatten(2).transpose(1, 2), first.weight[:, :c])  # (B, N, hidden)
        per_slice = F.linear(clip, first.weight[:, c:], first.bias)  # (B, D_b, hidden)
        hidden = (per_voxel.view(b, d, h * w, -1) + per_slice[:, :, None]).flatten(1, 2)
        tokens = self.fuse[2](self.fuse[1](hidden))
        for block in self.attention:
            tokens = block(tokens)
        return tokens.transpose(1, 2).reshape(b, c, d, h, w)

    def forward(self, x: torch.Tensor):
        if not self.stream_names:
            if self.conditioner is not None:
                x, _ = self.condition(x)
            return self.backbone(x)
        x, embeddings = self.condition(x)
        skips = self.backbone.encoder(x)
        skips = list(skips[:-1]) + [self.fuse_bottleneck(skips[-1], embeddings)]
        return self.backbone.decoder(skips)
