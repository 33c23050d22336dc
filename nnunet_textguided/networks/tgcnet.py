"""TGC-Net (seed 001, "TGC-Net: A Structure-Aware and Semantically-Aligned Framework for Text-Guided Medical Image
Segmentation"): frozen CLIP towers plus light trainable modules. No public code; METHODS.md lists what the paper
leaves open, and the choices made here are marked "choice".

Forward (what nnU-Net calls): ``x`` (B, C, H, W), the patch; the conditioner adds the note's frozen token states
(and the auxiliary note's) and the frozen CLIP ViT's dense tokens of the patch (``conditioning.dense``).

1. SSE (``SemanticStructuralEncoder``): the patch is resized to ``cnn_input`` (the paper: 768 x 768, CLIP gets
   336 x 336) for a CNN branch — nnU-Net's own ``PlainConvEncoder``, five stride-2 stages (choice) — giving
   F_cnn at 1/8, 1/16, 1/32. Eq. 1: F_fused = LN(P_V(F_clip) + P_C(F_cnn^1/32)), P_V / P_C linear maps to
   ``d_model`` (CLIP's token grid is resized bilinearly to the 1/32 grid when they differ; 336/14 = 768/32 = 24
   in the paper). The 1/8 and 1/16 maps are projected to d_model (1x1 conv + GroupNorm, Deformable-DETR's input
   projection), and the pyramid {1/8, 1/16, fused 1/32} is refined by a Deformable-DETR encoder of
   multi-scale deformable attention (eq. 3; ``blocks.deformable``).
   Ablations (Table 4): ``sse="vit"`` — CLIP only: F_V^1/32 = LN(P_V(F_clip)) and the 1/16, 1/8 maps are
   transposed-conv upsamplings of it (CAT-Seg's upsampling guidance), no CNN, no deformable attention;
   ``sse="cnn"`` — no CLIP: F_fused = LN(P_C(F_cnn^1/32)) (the trainer then loads no image tower at all).
2. DATE (``DomainAugmentedTextEncoder``), eqs. 5-6: F_infused = CrossAttn(Q = F_a, K = V = F_p),
   F_T = LN(F_p + F_infused), at the text tower's width. Both notes are padded to the same L, so the sum of
   eq. 6 pairs auxiliary row l with note row l (a consequence of the shared padding, not a claim of the paper); the text mask is the union of both masks (a row where only the auxiliary note has a token carries what
   that query gathered from the note). Rule for a case without an auxiliary note (choice): the infusion is zero,
   F_T = LN(F_p) — the primary note alone; the trainer drops auxiliary notes at random (``aux_dropout``) so the
   network learns both cases. Ablations (Table 5): ``text="main"`` F_T = F_p, ``text="aux"`` F_T = F_a (F_p for a
   case without one — a deviation from "auxiliary text only" that the paper never meets: its every case has one).
3. VLCM (``VisionLanguageCalibration``), eqs. 7-9, after a linear map of F_T to d_model. Gated network (choice):
       g_V = sigmoid(W_gV [F_V ; mean(F_T)]),   g_T = sigmoid(W_gT [F_T ; mean(F_V)])
       F_ctx = concat(g_V * W_V F_V,  g_T * W_T F_T)        (N + L context tokens)
   each modality's gate reads the other's summary, so the shared context keeps the cues both agree on. Then
   F_V' = LN(F_V + CrossAttn(F_V, F_ctx)), F_T' = LN(F_T + CrossAttn(F_T, F_ctx)) (residual + LN: choice, as in
   DATE). Ablations (Table 6): ``alignment="none"`` | ``"single"`` (F_V attends to F_T) | ``"bidirectional"``
   (F_V to F_T and F_T to F_V).
4. Cost-aggregating decoder (``blocks.cost_aggregation``): cost[b, l, t] = cos(F_V'(h, w), F_T'[l] + e_t) over
   the note's token positions l for each foreground class t, spatial and class aggregation, upsampling guided
   by F_V^1/16 and F_V^1/8, one logit map per class at 1/8 of ``cnn_input``, resized to the patch.
   Choices: the prompt axis P (CAT-Seg's prompt templates, embedded by Conv2d(P -> hidden)) is the note's L
   token positions, padded positions 0 — the paper writes F_T' as L x D_t and builds the cost from it; unlike
   templates, position l holds different words in different notes, so the embedding learns a mix of
   contextual token maps (the tokens are contextual, and DATE/VLCM have already mixed them). The classes are
   the dataset's foreground labels, told apart by a learned class embedding e_t (one class for a referring
   note).

Initialisation (choice; the paper gives none): the output projections of DATE's and VLCM's cross-attentions start
at zero (``zero_residual``), so both modules begin as LayerNorms and learn their residuals.

Output: (B, 1 + T, H, W) logits with the background fixed at 0, so nnU-Net's softmax / argmax give
sigmoid(l_t) > 1/2 for one class, and its Dice + CE loss is the paper's Dice + BCE for one class.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from torch import nn

from .blocks.attention import ConditionedAttention, masked_mean
from .blocks.cost_aggregation import CostAggregationDecoder
from .blocks.deformable import DeformableEncoder
from .conditioned import ConditionedNetwork

__all__ = ["TGCNet", "SemanticStructuralEncoder", "DomainAugmentedTextEncoder", "VisionLanguageCalibration",
           "SSE_MODES", "TEXT_MODES", "ALIGNMENT_MODES"]

SSE_MODES = ("full", "vit", "cnn")
TEXT_MODES = ("date", "main", "aux")
ALIGNMENT_MODES = ("vlcm", "none", "single", "bidirectional")
CNN_STAGES = 5  # 1/2 ... 1/32


def input_projection_groups(channels: int) -> int:
    """GroupNorm groups of the pyramid's input projections: Deformable-DETR's 32, fewer for narrow (tiny) widths
    (at least 2 channels per group). CAT-Seg's decoder keeps its own rule (channels // 16)."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


def _check(mode: str, modes: tuple, what: str) -> str:
    if mode not in modes:
        raise ValueError(f"{what} {mode!r}: expected one of {modes}")
    return mode


class SemanticStructuralEncoder(nn.Module):
    """SSE: (patch (B, C, H, W), CLIP tokens (B, E, g, g) or None) -> [F_V^1/8, F_V^1/16, F_V^1/32] at 1/8, 1/16,
    1/32 of ``cnn_input`` (the CNN branch sees the patch resized to it)."""

    def __init__(self, in_channels: int, clip_dim: int, cnn_features: Sequence[int], d_model: int, mode: str,
                 cnn_input: Sequence[int], msda_layers: int, msda_heads: int, msda_points: int, msda_ffn: int,
                 dropout: float):
        super().__init__()
        self.mode = _check(mode, SSE_MODES, "SSE mode")
        self.cnn_input = tuple(int(c) for c in cnn_input)
        feats = [int(f) for f in cnn_features]
        if len(feats) != CNN_STAGES:
            raise ValueError(f"the CNN branch has {CNN_STAGES} stride-2 stages (1/2 ... 1/32): give "
                             f"{CNN_STAGES} widths, got {feats}")
        if mode != "vit":
            self.cnn = PlainConvEncoder(in_channels, CNN_STAGES, feats, nn.Conv2d, 3, [2] * CNN_STAGES, 2,
                                        conv_bias=True, norm_op=nn.InstanceNorm2d, norm_op_kwargs={"affine": True},
                                        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, return_skips=True)
            self.proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(input_projection_groups(d_model), d_model))
                                      for c in feats[2:4])
            self.p_c = nn.Linear(feats[4], d_model)
            self.msda = DeformableEncoder(d_model, n_levels=3, n_heads=msda_heads, n_points=msda_points,
                                          ffn_dim=msda_ffn, layers=msda_layers, dropout=dropout)
        else:
            self.up = nn.ModuleList([nn.ConvTranspose2d(d_model, d_model, 4, stride=4),
                                     nn.ConvTranspose2d(d_model, d_model, 2, stride=2)])
        if mode != "cnn":
            self.p_v = nn.Linear(clip_dim, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, clip: torch.Tensor | None) -> list[torch.Tensor]:
        grid = tuple(s // 32 for s in self.cnn_input)
        if self.mode != "cnn":
            if tuple(clip.shape[-2:]) != grid:
                clip = F.interpolate(clip, size=grid, mode="bilinear", align_corners=False)
            v = self.p_v(clip.flatten(2).transpose(1, 2))
        if self.mode == "vit":
            f32 = self.norm(v).transpose(1, 2).reshape(x.shape[0], -1, *grid)
            return [self.up[0](f32), self.up[1](f32), f32]
        skips = self.cnn(F.interpolate(x, size=self.cnn_input, mode="bilinear", align_corners=False))
        c = self.p_c(skips[4].flatten(2).transpose(1, 2))
        fused = self.norm(c + v if self.mode == "full" else c).transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return self.msda([self.proj[0](skips[2]), self.proj[1](skips[3]), fused])


def zero_residual(attn: ConditionedAttention) -> ConditionedAttention:
    """Start a residual cross-attention branch at zero (its output projection zeroed), so DATE and VLCM begin as
    LN(F) and learn what to add (choice: the paper gives no initialisation). With the default initialisation the
    near-uniform attention of an untrained branch adds one shared vector to every image and text token, which
    flattens the cosine cost volume the decoder reads the note from (docs/tgcnet.md, "Slow start")."""
    nn.init.zeros_(attn.out.weight)
    nn.init.zeros_(attn.out.bias)
    return attn


class DomainAugmentedTextEncoder(nn.Module):
    """DATE (eqs. 5-6) and its ablations: (F_p, m_p, F_a, m_a) -> (F_T, m_T), all at the text tower's width."""

    def __init__(self, text_dim: int, num_heads: int, mode: str = "date"):
        super().__init__()
        self.mode = _check(mode, TEXT_MODES, "text mode")
        if mode == "date":
            self.attn = zero_residual(ConditionedAttention(text_dim, num_heads))
            self.norm = nn.LayerNorm(text_dim)

    def forward(self, fp, mp, fa, ma):
        has_aux = ma.any(1)
        if self.mode == "main":
            return fp, mp
        if self.mode == "aux":
            pick = has_aux[:, None]
            return torch.where(pick[..., None], fa, fp), torch.where(pick, ma, mp)
        infused = self.attn(fa, fp, key_valid=mp) * ma[..., None].to(fa.dtype)  # zero for a case without aux
        return self.norm(fp + infused), mp | ma


class VisionLanguageCalibration(nn.Module):
    """VLCM (eqs. 7-9, gating in the module docstring) and the Table 6 alternatives: (F_V (B, N, d), F_T (B, L, d),
    m_T) -> (F_V', F_T')."""

    def __init__(self, dim: int, num_heads: int, mode: str = "vlcm"):
        super().__init__()
        self.mode = _check(mode, ALIGNMENT_MODES, "alignment mode")
        if mode == "none":
            return
        self.attn_v, self.norm_v = zero_residual(ConditionedAttention(dim, num_heads)), nn.LayerNorm(dim)
        if mode in ("vlcm", "bidirectional"):
            self.attn_t, self.norm_t = zero_residual(ConditionedAttention(dim, num_heads)), nn.LayerNorm(dim)
        if mode == "vlcm":
            self.gate_v, self.gate_t = nn.Linear(2 * dim, dim), nn.Linear(2 * dim, dim)
            self.value_v, self.value_t = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def context(self, v, t, mt):
        """The gated network G(F_V, F_T) -> (F_ctx (B, N + L, d), its key mask)."""
        v_mean, t_mean = v.mean(1, keepdim=True), masked_mean(t, mt)[:, None]
        ctx_v = torch.sigmoid(self.gate_v(torch.cat((v, t_mean.expand_as(v)), -1))) * self.value_v(v)
        ctx_t = torch.sigmoid(self.gate_t(torch.cat((t, v_mean.expand_as(t)), -1))) * self.value_t(t)
        valid = torch.cat((torch.ones(v.shape[:2], dtype=torch.bool, device=v.device), mt), 1)
        return torch.cat((ctx_v, ctx_t), 1), valid

    def forward(self, v, t, mt):
        if self.mode == "none":
            return v, t
        if self.mode == "vlcm":
            ctx, valid = self.context(v, t, mt)
            return self.norm_v(v + self.attn_v(v, ctx, key_valid=valid)), \
                self.norm_t(t + self.attn_t(t, ctx, key_valid=valid))
        v2 = self.norm_v(v + self.attn_v(v, t, key_valid=mt))
        if self.mode == "single":
            return v2, t
        return v2, self.norm_t(t + self.attn_t(t, v))


class TGCNet(ConditionedNetwork):
    """TGC-Net's inference graph (module docstring). Frozen encoders live in the conditioner, outside the module.

    Args:
        in_channels, num_classes: nnU-Net's input channels and output channels (background + T classes).
        text_dim, clip_dim: widths of the frozen note token states and CLIP dense tokens.
        max_tokens: L, the note length (the cost volume's prompt axis).
        patch_size: (H, W) the network is built for; ``cnn_input``: the CNN branch's input size (multiples of 32).
        cnn_features: the CNN branch's five stage widths; d_model: SSE / VLCM width.
        msda_*: the deformable encoder; text_heads: DATE; fusion_heads: VLCM; hidden, agg_layers, agg_heads,
            window, decoder_dims, guidance_dims, cost_guidance_dim: the cost-aggregating decoder.
        sse, text, alignment: the variant (``SSE_MODES``, ``TEXT_MODES``, ``ALIGNMENT_MODES``).
    """

    def __init__(self, in_channels: int, num_classes: int, text_dim: int, clip_dim: int, max_tokens: int,
                 patch_size: Sequence[int], cnn_input: Sequence[int], cnn_features: Sequence[int] = (32, 64, 128, 256, 256),
                 d_model: int = 256, msda_layers: int = 2, msda_heads: int = 8, msda_points: int = 4,
                 msda_ffn: int = 1024, text_heads: int = 8, fusion_heads: int = 8, hidden: int = 128,
                 agg_layers: int = 2, agg_heads: int = 4, window: int = 12, decoder_dims: Sequence[int] = (64, 32),
                 guidance_dims: Sequence[int] = (32, 16), cost_guidance_dim: int = 128, dropout: float = 0.1,
                 sse: str = "full",
                 text: str = "date", alignment: str = "vlcm"):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"TGC-Net predicts background + at least one class, got num_classes={num_classes}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.cnn_input = tuple(int(c) for c in cnn_input)
        if len(self.patch_size) != 2 or len(self.cnn_input) != 2 or any(c % 32 for c in self.cnn_input):
            raise ValueError(f"TGC-Net is 2D and its CNN branch needs sizes divisible by 32: patch {patch_size}, "
                             f"cnn_input {cnn_input} (set cnn_input_size to multiples of 32: nnunet-textguided add-config ... "
                             "--set cnn_input_size=H,W; or none for the default 768/224 x patch)")
        self.num_classes, self.text_dim, self.clip_dim = int(num_classes), int(text_dim), int(clip_dim)
        self.max_tokens, self.variant = int(max_tokens), {"sse": sse, "text": text, "alignment": alignment}
        self.grid = tuple(c // 32 for c in self.cnn_input)
        self.sse = SemanticStructuralEncoder(in_channels, clip_dim, cnn_features, d_model, sse, self.cnn_input,
                                             msda_layers, msda_heads, msda_points, msda_ffn, dropout)
        self.date = DomainAugmentedTextEncoder(text_dim, text_heads, text)
        self.text_proj = nn.Linear(text_dim, d_model)
        self.vlcm = VisionLanguageCalibration(d_model, fusion_heads, alignment)
        self.class_embed = nn.Parameter(torch.randn(num_classes - 1, d_model) * 0.02)
        self.decoder = CostAggregationDecoder(self.max_tokens, d_model, d_model, (d_model, d_model), self.grid,
                                              hidden=hidden, appearance_guidance_dim=cost_guidance_dim,
                                              text_guidance_dim=cost_guidance_dim, layers=agg_layers,
                                              num_heads=agg_heads, window=window,
                                              decoder_dims=tuple(decoder_dims), guidance_proj_dims=tuple(guidance_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, cond = self.condition(x)
        return self.segment(x, cond)

    def segment(self, x: torch.Tensor, cond: dict) -> torch.Tensor:
        """x (B, C, H, W) and the conditioning {"tokens", "mask", "aux_tokens", "aux_mask", "image_tokens"}
        -> logits (B, num_classes, H, W)."""
        if tuple(x.shape[2:]) != self.patch_size:
            raise ValueError(f"TGC-Net was built for patches of {self.patch_size} (its decoder's window grid); got "
                             f"{tuple(x.shape[2:])}")
        tokens, mask = cond["tokens"], cond["mask"].bool()
        if tokens.shape[1:] != (self.max_tokens, self.text_dim):
            raise ValueError(f"note tokens must be (B, {self.max_tokens}, {self.text_dim}), got {tuple(tokens.shape)}")
        aux, aux_mask = cond.get("aux_tokens"), cond.get("aux_mask")
        if aux is None:
            aux, aux_mask = torch.zeros_like(tokens), torch.zeros_like(mask)
        f8, f16, f32 = self.sse(x, cond.get("image_tokens"))
        text, text_mask = self.date(tokens, mask, aux, aux_mask.bool())
        b, d = f32.shape[:2]
        v, t = self.vlcm(f32.flatten(2).transpose(1, 2), self.text_proj(text), text_mask)
        t = t[:, None] + self.class_embed[None, :, None]  # (B, T, L, d): one text per class
        appearance = v.transpose(1, 2).reshape(b, d, *self.grid)
        cost = torch.einsum("bdhw,btld->blthw", F.normalize(appearance, dim=1), F.normalize(t, dim=-1))
        cost = cost * text_mask[:, :, None, None, None].to(cost.dtype)
        guidance = masked_mean(t.flatten(0, 1), text_mask.repeat_interleave(t.shape[1], 0)).reshape(b, t.shape[1], d)
        logits = self.decoder(cost, appearance, guidance, [f16, f8])
        logits = F.interpolate(logits, size=self.patch_size, mode="bilinear", align_corners=False)
        return torch.cat((torch.zeros_like(logits[:, :1]), logits), 1)

    def parameter_groups(self) -> dict[str, int]:
        parts = {"sse": self.sse, "date": self.date, "text_proj": self.text_proj, "vlcm": self.vlcm,
                 "decoder": self.decoder}
        groups = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
        groups["decoder"] += self.class_embed.numel()
        return groups
