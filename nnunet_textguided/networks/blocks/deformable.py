"""Multi-scale deformable attention and a Deformable-DETR encoder over a list of 2D feature maps.

Follows Deformable-DETR (fundamentalvision/Deformable-DETR, models/ops/modules/ms_deform_attn.py and
models/deformable_transformer.py) in pure PyTorch: the sampling is the reference `ms_deform_attn_core_pytorch`
(one bilinear `grid_sample` per level, zeros outside the map, align_corners=False) instead of the CUDA extension.
Every query attends to n_points learned offsets around its reference point on each of n_levels maps, weighted by a
softmax over levels x points; initialisation is the reference one (offsets fan out per head, uniform weights).

The encoder is the reference post-norm stack without padding: all maps are fully valid (valid ratios 1), so every
level shares one set of reference points (pixel centres); positions are DETR's normalised sine embedding plus a
learned level embedding. Sampling runs in float32 even under autocast, since fp16 locations in [0, 1] are off by
a tenth of a pixel on maps a hundred pixels wide.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _shape_list(spatial_shapes) -> list[tuple[int, int]]:
    """(L, 2) tensor or sequence of (H, W) -> python pairs (the encoder passes a list: no device sync, and meta
    tensors for parameter counting have no values to read)."""
    pairs = spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes
    return [(int(h), int(w)) for h, w in pairs]


def ms_deform_attn_core(value: torch.Tensor, spatial_shapes, sampling_locations: torch.Tensor,
                        attention_weights: torch.Tensor) -> torch.Tensor:
    """Bilinear multi-scale sampling and weighted sum.

    value (B, S, heads, head_dim), S = sum_l H_l*W_l, levels concatenated row-major; spatial_shapes (L, 2) long
    (H_l, W_l) or a list of (H_l, W_l); sampling_locations (B, Lq, heads, L, P, 2) as (x, y) in [0, 1] (outside reads zeros);
    attention_weights (B, Lq, heads, L, P). -> (B, Lq, heads*head_dim).
    """
    b, s, heads, head_dim = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    shapes = _shape_list(spatial_shapes)
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"spatial_shapes {shapes} cover {sum(h * w for h, w in shapes)} positions, value has {s}")
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (value_l, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        value_l = value_l.flatten(2).transpose(1, 2).reshape(b * heads, head_dim, h, w)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*heads, Lq, P, 2)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(b * heads, 1, lq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(b, heads * head_dim, lq)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: (B, Lq, C) queries attend to a flattened multi-level input (B, S, C)."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference init: head h starts its points k = 1..P at k * (direction 2*pi*h/heads, max-norm 1) pixels."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                spatial_shapes, input_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Lq, C); reference_points (B, Lq, L, 2) as (x, y) in [0, 1]; input_flatten (B, S, C);
        spatial_shapes (L, 2) long (H, W) or a list of (H, W); input_padding_mask (B, S), True = padding. -> (B, Lq, C)."""
        b, lq, _ = query.shape
        s = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(b, s, self.n_heads, self.d_model // self.n_heads)
        shape = (b, lq, self.n_heads, self.n_levels, self.n_points)
        offsets = self.sampling_offsets(query).float().view(*shape, 2)
        weights = F.softmax(self.attention_weights(query).float().view(b, lq, self.n_heads, -1), -1).view(shape)
        # offsets are in pixels of each level: divide by (W_l, H_l) to move in normalised (x, y)
        shapes = _shape_list(spatial_shapes)
        # divided by python numbers: a (W, H) tensor built here would cost a host-to-device copy (and sync) per call
        offsets = torch.stack([torch.stack((offsets[:, :, :, lvl, :, 0] / w, offsets[:, :, :, lvl, :, 1] / h), -1)
                               for lvl, (h, w) in enumerate(shapes)], 3)
        locations = reference_points.float()[:, :, None, :, None, :] + offsets
        out = ms_deform_attn_core(value.float(), shapes, locations, weights).to(value.dtype)
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention over all levels, then ReLU FFN, each with residual + LayerNorm."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 ffn_dim: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        # DeformableTransformer._reset_parameters xavier-initialises every matrix outside MSDeformAttn
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src, pos (B, S, C); reference_points (B, S, L, 2); spatial_shapes (L, 2) or (H, W) pairs. -> (B, S, C)."""
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, spatial_shapes,
                                                            padding_mask)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


def sine_position_embedding(height: int, width: int, num_pos_feats: int, temperature: float = 10000.0,
                            device: torch.device | None = None) -> torch.Tensor:
    """DETR's normalised PositionEmbeddingSine (Deformable-DETR's half-pixel-centred variant) for an unpadded map.

    -> (H*W, 2*num_pos_feats) float32, row-major positions, channels (y features, x features).
    """
    scale, eps = 2 * math.pi, 1e-6
    y = (torch.arange(1, height + 1, dtype=torch.float32, device=device) - 0.5) / (height + eps) * scale
    x = (torch.arange(1, width + 1, dtype=torch.float32, device=device) - 0.5) / (width + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)

    def embed(t: torch.Tensor) -> torch.Tensor:
        t = t[:, None] / dim_t
        return torch.stack((t[:, 0::2].sin(), t[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = embed(y)[:, None].expand(height, width, num_pos_feats)
    pos_x = embed(x)[None].expand(height, width, num_pos_feats)
    return torch.cat((pos_y, pos_x), dim=-1).reshape(height * width, 2 * num_pos_feats)


class DeformableEncoder(nn.Module):
    """Deformable-DETR encoder: a list of (B, d_model, H_l, W_l) maps -> refined maps of the same shapes."""

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4,
                 ffn_dim: int = 1024, layers: int = 6, dropout: float = 0.1):
        super().__init__()
        if d_model % 4:
            raise ValueError(f"d_model {d_model} must be divisible by 4 (sine embedding: d_model/2 features of "
                             "sin/cos pairs per axis)")
        self.d_model, self.n_levels = d_model, n_levels
        self.layers = nn.ModuleList(DeformableEncoderLayer(d_model, n_levels, n_heads, n_points, ffn_dim, dropout)
                                    for _ in range(layers))
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        nn.init.normal_(self.level_embed)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != self.n_levels:
            raise ValueError(f"DeformableEncoder was built for {self.n_levels} levels, got {len(features)} maps")
        b, device = features[0].shape[0], features[0].device
        shapes = [(f.shape[-2], f.shape[-1]) for f in features]
        src = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)
        pos = torch.cat([sine_position_embedding(h, w, self.d_model // 2, device=device) + self.level_embed[lvl]
                         for lvl, (h, w) in enumerate(shapes)])[None]
        # pixel centres as (x, y) in [0, 1]; with no padding every level sees the same normalised point
        ref = torch.cat([torch.stack(torch.meshgrid(
            (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w,
            (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h, indexing="xy"), -1).reshape(-1, 2)
            for h, w in shapes])
        ref = ref[None, :, None].expand(b, -1, self.n_levels, -1)
        for layer in self.layers:
            src = layer(src, pos, ref, shapes)
        return [m.transpose(1, 2).reshape(b, self.d_model, h, w)
                for m, (h, w) in zip(src.split([h * w for h, w in shapes], dim=1), shapes)]
