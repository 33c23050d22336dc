"""RecLMIS (Huang et al., "Cross-Modal Conditioned Reconstruction for Language-guided Medical Image
Segmentation", seed 004) for 2D nnU-Net patches. Pure PyTorch.

After the paper (Sec. III) and the authors' ShawnHuang497/RecLMIS (nets/RecLMIS.py, nets/Interactor.py,
nets/transformer/{__init__,decoder,mutihead_attention}.py, LViT's nets/pixlevel.py for PLAM).

Inference graph, ``RecLMIS`` — x (B, C_in, H, W), frozen token states (B, L, D), mask (B, L) -> logits:

1. UNet encoder (LViT's): Conv3x3-BN-ReLU stem to features[0]; each later stage MaxPool(stride) + 2 x
   Conv3x3-BN-ReLU. The deepest stage is the bottleneck V (B, d, h, w), d = features[-1].
2. Text: the frozen token states (CLIP ViT-B/32 ``ln_final(x) @ text_projection``: D = 512) -> Conv1d(D -> d,
   k=3) over the token axis -> E (B, L, d).
3. CI, conditioned interaction (Sec. III-B1, eq. 1): V -> 1x1 conv + learned position embedding (N x d,
   N = h w) + dropout = V_emb; the text-to-vision encoder V' = MHA(Q=V_emb, K=V=E); 4 heads, attention dropout,
   no residuals, no norms. V' replaces the bottleneck. The vision-to-text encoder E' = MHA(Q=E, K=V=V_emb) only
   feeds W_woi, so it is training-only (``RecLMISAuxiliary``), as Sec. III-E says. The authors' ``Interactor``
   lets V' attend to E' instead (``image_reads="text_ci"``): see ``ConditionedInteraction`` for why the paper's
   form is the default.
4. LViT decoder: per level, nearest upsampling of the coarser map to the skip's size, PLAM on the skip,
   concat [PLAM(skip), up], 2 x Conv3x3-BN-ReLU; a 1x1 conv to num_classes logits (the code's sigmoid is the
   loss's / the predictor's business).

Training-only, ``RecLMISAuxiliary`` (never part of the inference graph, built and optimised by the trainer):
interest heads W_woi (eq. 3) / W_poi (eq. 2), probability-weighted masking, the conditioned reconstructors
CVR (eq. 7) and CLR (eq. 9), and the three auxiliary losses L_T2V (eq. 8), L_V2T (eq. 10), L_CCL (eq. 5-6)
(``losses.reclmis``).

What the authors' code does where the paper is silent (kept here):
- The interest head of the words reads Conv1d(k3)+BN+ReLU(E') (the Interactor's ``CTBN``, whose output feeds
  nothing else) before its MLP (d -> d -> ReLU -> 1); the patch head reads V' directly. Optional dropout before
  the MLPs (their ``config.dropout``: off for QaTa, 0.5 for MosMed) is ``interest_dropout``.
- The image is masked on the raw bottleneck tokens V (before CI's embedding), the text on E (the Conv1d
  output). CVR's keys/values are E, CLR's are V; CCL compares V and E.
- A conditioned reconstructor Psi is the code's ``DualTransformer`` run with ``decoding=2``: a *context encoder*
  (``layers`` post-LN layers of W-conditioned self-attention + FFN over the key/value modality) and a
  *reconstructor* (``layers`` post-LN layers of self-attention over the masked queries, W-conditioned
  cross-attention to the encoded context, FFN ReLU ``ffn_dim``); dropout on the residual branches, none in the
  attention. Both self-attentions are causal (the decoder's future mask): this is the only positional signal
  the reconstructor gets — masked items are all-zero queries and no position embedding is added — so it is kept
  (``causal=True``).
- Conditioned attention: the paper's eq. 7 / 9 is A = softmax((Q K^T / sqrt(D)) ⊙ W), W over the keys,
  broadcast over the queries; since (q k_j^T) w_j = q (w_j k_j)^T it is SDPA on keys scaled by W
  (``conditioned_attention``, ``condition_placement="logits"``, the default). The authors' code (``gauss_weight``)
  multiplies after the softmax instead: A = softmax(Q K^T / sqrt(d_h)) * (W + 1e-10), renormalised, i.e. SDPA
  with the additive mask log(W + 1e-10) (``condition_placement="probabilities"``, kept because the paper's numbers
  come from that code). Padded tokens and the causal future are -inf either way.

Deviations from the authors' code, by choice:
- Padding: token states at mask False are zeroed before the text Conv1d (its 3-tap window would otherwise mix
  them into the real tokens next to them) and excluded as keys of every attention over text (the authors'
  CI and reconstructors attend to padded positions); so padding never changes the logits.
- Masking draws k = max(floor(n * rate), 1) distinct items with ``torch.multinomial`` on W restricted to the n
  real items (floored at 1e-12 so k draws always exist; the code falls back to uniform draws for zero weights).
- The reconstruction MSE is weighted by W as in eq. 8 / 10 (the code: a plain mean), see
  ``losses.reclmis.weighted_reconstruction_loss``; CCL uses W once (the code re-softmaxes it) and excludes
  padded tokens from its max and sum; no silent try/except around the auxiliary losses; no fairseq.
- CVR's target: ``cvr_target="image_ci"`` = V' (the code's ``img_feat_inter``) or ``"image"`` = V (eq. 8's text).
- CLR's target is the frozen token states (D-dim); when D != d the reconstructor ends with Linear(d -> D)
  (none when D == d, the paper's CLIP configuration).
- Not built: PLAM's ``conv_sig`` (never called) and the cross-attention sub-layers of the context encoder
  (``DualTransformer.decoder1`` runs without an encoder output, so they never receive a gradient).

Parameter breakdown at the paper configuration (features 64, 128, 256, 512, 512; 224 x 224; D = d = 512; 4
heads; FFN 1024), counted by tests/networks/test_reclmis.py:

| inference graph (``RecLMIS``)                          |        params |
|--------------------------------------------------------|--------------:|
| encoder: stem + 4 stages (conv3x3 + BN)                |     9,373,824 |
| text Conv1d 512 -> 512, k3                             |       786,944 |
| CI: 1x1 embedding 262,656 + position 100,352 + 1 MHA   |     1,413,632 |
| decoder: 4 x (PLAM + 2 conv3x3 + BN) + 1x1 head        |     4,680,893 |
| total (the paper's CI)                                 |    16,255,293 |
| total with the authors' CI (+ the vision-to-text MHA 1,050,624) | 17,305,917 |

| training-only (``RecLMISAuxiliary``)                   |  layers = 3   |  layers = 4   |
|--------------------------------------------------------|--------------:|--------------:|
| CI's vision-to-text MHA (the paper's CI)               |     1,050,624 |     1,050,624 |
| word interest: CTBN (Conv1d k3 + BN) 787,968 + MLP     |     1,051,137 |     1,051,137 |
| patch interest: MLP 512 -> 512 -> 1                    |       263,169 |       263,169 |
| CVR: context encoder (2,102,784 / layer) + recon (3,154,432 / layer) | 15,771,648 | 21,028,864 |
| CLR: same                                              |    15,771,648 |    21,028,864 |
| total                                                  |    33,908,226 |    44,422,658 |

Training total (network + training-only): 50,163,519 (3 layers) / 60,677,951 (4 layers), the same whichever
CI variant.

Not counted anywhere here: the frozen text encoder (CLIP ViT-B/32's text tower: 63,428,096 with its 25.3 M token
embedding; it alone exceeds 23.7 M, so the paper's inference figure cannot include it).

The paper's figures (Table II: 23.7 M at inference, 74.2 M in training) against the authors' released modules:
- 74.2 - 23.7 = 50.5 M is exactly the two ``DualTransformer`` at the QaTa code configuration (4 + 4 layers,
  3,154,432 parameters per layer including decoder1's never-used cross-attention): 2 x 25,235,456 = 50,470,912
  (0.06 % off). With the paper text's 3 layers they hold 37,853,184. So the training figure counts every
  reconstructor parameter of the 4-layer configuration, trained or not; ours at 4 layers trains 42,057,728 of
  them (the 8,413,184 of decoder1's unused cross-attention sub-layers are not built).
- Everything else the authors build outside CLIP (the inference graph with their CI + PLAM's unused conv_sig 349,120 +
  CTBN 787,968 + the two interest MLPs 526,338) is 18,969,343, 4.73 M short of 23.7 M; 69,440,255 with the
  reconstructors, 4.76 M short of 74.2 M. The same ~4.74 M is missing from both figures and is not in the
  released code; it matches, e.g., 3 AIM-style adapters (512 -> 128 -> 512) in each of CLIP's 12 text blocks
  (4,741,632; the ``Adapter`` class sits unused in their module_clip.py, while the module_transformer.py that
  builds the text tower is not published) or one more 512 -> 512 double-conv stage (4,721,664). Neither can be
  confirmed, so neither is reproduced.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..losses.reclmis import conditioned_contrastive_loss, weighted_reconstruction_loss
from .blocks.attention import ConditionedAttention, conditioned_attention  # noqa: F401 (re-exported)
from .blocks.lvit import LViTEncoder, UpBlockPLAM
from .conditioned import ConditionedNetwork

__all__ = ["RecLMIS", "RecLMISAuxiliary", "ConditionedInteraction", "RecLMISDecoder", "ConditionedAttention",
           "ConditionedReconstructor", "conditioned_attention", "sample_interest_mask"]


def _stride_pair(stride, stage: int) -> tuple[int, int]:
    s = tuple(int(v) for v in stride) if isinstance(stride, (list, tuple)) else (int(stride),) * 2
    if len(s) != 2 or min(s) < 1:
        raise ValueError(f"strides[{stage}]: expected one positive int or two (2D), got {stride!r}")
    return s


def _nonempty(valid: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: a row without any True becomes all True, so no softmax/max runs over an empty set (NaN).
    A note always yields at least its start token; this only keeps a broken input finite."""
    return valid | ~valid.any(-1, keepdim=True)


class RecLMISDecoder(nn.Module):
    """Decoder: fused bottleneck (B, d, h, w) + skips [skip_0 .. skip_{n-2}] -> logits (B, num_classes, H, W).

    The level on skip s outputs features[max(s - 1, 0)] channels (the authors' up4..up1 at 64..512: 256, 128,
    64, 64). ``deep_supervision`` exists for nnU-Net's toggle; RecLMIS has one output whatever its value.
    """

    def __init__(self, features: Sequence[int], num_classes: int):
        super().__init__()
        self.deep_supervision = False
        n = len(features)
        blocks, below = [], features[-1]
        for s in range(n - 2, -1, -1):
            out = features[max(s - 1, 0)]
            blocks.append(UpBlockPLAM(below, features[s], out))
            below = out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(features[0], num_classes, kernel_size=1)

    def forward(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = bottleneck
        for block, skip in zip(self.blocks, reversed(skips)):
            x = block(x, skip)
        return self.head(x)


class ConditionedInteraction(nn.Module):
    """CI (Sec. III-B1, eq. 1): bottleneck (B, d, h, w), text E (B, L, d), mask (B, L)
    -> (V_emb (B, N, d), E' (B, L, d) or None, V' (B, N, d)), N = h w.

    V_emb = Dropout(Conv1x1(V) + P) with a learned position embedding P (1, N, d) (zero-initialised as the
    authors'); text-to-vision encoder V' = MHA(Q=V_emb, K=V=E), padded tokens excluded as keys; no residuals,
    no norms. ``image_reads``:

    - ``"text"`` (the paper, default): V' attends to the text features E, and the vision-to-text encoder E' =
      MHA(Q=E, K=V=V_emb) — which only feeds W_woi — is training-only (``RecLMISAuxiliary``). This is what Sec.
      III-E keeps at inference ("visual encoder, visual decoder, and text-to-vision encoder in the CI module").
    - ``"text_ci"`` (the authors' ``Interactor``): V' attends to E' instead, so E' is part of the inference graph.
      Then the values V' mixes are summaries of the image (E' is attention over V_emb), and the note only
      reaches the decoder through attention weights. On the synthetic referring dataset (500 images, 2d_tiny,
      3000 iterations) this variant sat at the vision-only Dice (~0.49) for 7 of 12 epochs and reached 0.65
      with true notes (0.24 shuffled); the paper's variant left it after 2 epochs and reached 0.99 (0.00).

    ``attention="self"`` (Table V's "Self-Attn" CI): one MHA over the concatenation [V_emb; E] (padded tokens
    excluded as keys); its image part is V', its text part E' (so E' is computed here, as with "text_ci").
    """

    def __init__(self, dim: int, grid: tuple[int, int], num_heads: int = 4, dropout: float = 0.1,
                 image_reads: str = "text", attention: str = "cross"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"bottleneck width {dim} is not divisible by num_heads {num_heads}")
        if image_reads not in ("text", "text_ci"):
            raise ValueError(f"image_reads must be 'text' (the paper) or 'text_ci' (the authors' code), "
                             f"got {image_reads!r}")
        if attention not in ("cross", "self"):
            raise ValueError(f"CI attention must be 'cross' (the paper) or 'self' (Table V), got {attention!r}")
        self.grid, self.image_reads, self.attention = tuple(grid), image_reads, attention
        self.embed = nn.Conv2d(dim, dim, kernel_size=1)
        self.position = nn.Parameter(torch.zeros(1, math.prod(self.grid), dim))
        self.dropout = nn.Dropout(dropout)
        self.text_attention = (nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
                               if image_reads == "text_ci" and attention == "cross" else None)
        self.image_attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

    @property
    def computes_text_ci(self) -> bool:
        """Whether forward returns E' (else E' is training-only, in ``RecLMISAuxiliary``)."""
        return self.attention == "self" or self.text_attention is not None

    def forward(self, bottleneck: torch.Tensor, text: torch.Tensor, mask: torch.Tensor):
        v = self.dropout(self.embed(bottleneck).flatten(2).transpose(1, 2) + self.position)
        if self.attention == "self":
            joint = torch.cat([v, text], 1)
            pad = torch.cat([torch.zeros_like(v[..., 0], dtype=torch.bool), ~_nonempty(mask)], 1)
            out = self.image_attention(joint, joint, joint, key_padding_mask=pad, need_weights=False)[0]
            return v, out[:, v.shape[1]:], out[:, :v.shape[1]]
        text_ci = None if self.text_attention is None else self.text_attention(text, v, v, need_weights=False)[0]
        keys = text if text_ci is None else text_ci
        image_ci = self.image_attention(v, keys, keys, key_padding_mask=~_nonempty(mask), need_weights=False)[0]
        return v, text_ci, image_ci


class RecLMIS(ConditionedNetwork):
    """Inference graph: LViT-style UNet with PLAM on the skips + text Conv1d + CI (conditioned interaction).

    Args:
        in_channels: image channels C_in.
        num_classes: output logit channels (no sigmoid/softmax).
        text_dim: D, width of the frozen token states (512 CLIP ViT-B/32; 384 MiniLM).
        features: widths per stage (>= 2 stages); d = features[-1] is the CI width.
        strides: per stage; stage 0 must be 1; later stages pool by max-pooling with kernel = stride (one int
            or per axis, e.g. [2, 2] or [1, 2]).
        patch_size: (H, W) the network is trained and predicted on; fixes the bottleneck grid of the position
            embedding (224 / 16 = 14 x 14 in the paper).
        num_heads, dropout: CI's heads and dropout (embedding and attention).
        image_reads: "text" (the paper: V' attends to E) or "text_ci" (the authors' code: to E'); see
            ``ConditionedInteraction``.
        ci_attention: "cross" (the paper) or "self" (Table V: one self-attention over [V_emb; E]).
        use_ci: False builds Table III's row (e), the UNet + PLAM baseline without text: no text Conv1d, no CI;
            the bottleneck goes straight to the decoder and the note is not read by the network.

    ``forward(x)`` is what nnU-Net calls: the conditioner (``set_conditioner``) supplies ``{"tokens", "mask"}``.
    """
    training_only_modules: tuple = ()  # nothing training-only inside the inference graph

    def __init__(self, in_channels: int, num_classes: int, text_dim: int,
                 features: Sequence[int] = (64, 128, 256, 512, 512),
                 strides: Sequence[int | Sequence[int]] = (1, 2, 2, 2, 2),
                 patch_size: Sequence[int] = (224, 224), num_heads: int = 4, dropout: float = 0.1,
                 image_reads: str = "text", use_ci: bool = True, ci_attention: str = "cross"):
        super().__init__()
        features = [int(f) for f in features]
        if len(features) < 2:
            raise ValueError(f"RecLMIS needs at least 2 stages (skips and a bottleneck), got features={features}")
        if len(strides) != len(features):
            raise ValueError(f"one stride per stage: {len(features)} features but {len(strides)} strides")
        strides = [_stride_pair(s, i) for i, s in enumerate(strides)]
        if strides[0] != (1, 1):
            raise ValueError(f"stage 0 is the full-resolution stem: its stride must be 1, got {strides[0]}")
        patch = tuple(int(p) for p in patch_size)
        total = tuple(math.prod(s[a] for s in strides) for a in range(2))
        if len(patch) != 2 or any(p % t for p, t in zip(patch, total)):
            raise ValueError(f"patch_size {patch_size} must be 2D and divisible by the total pooling {total}")
        self.in_channels, self.num_classes, self.text_dim = int(in_channels), int(num_classes), int(text_dim)
        self.features, self.strides, self.patch_size = features, strides, patch
        self.bottleneck_channels = features[-1]
        self.grid = tuple(p // t for p, t in zip(patch, total))

        self.encoder = LViTEncoder(in_channels, features, strides)
        self.use_ci = bool(use_ci)
        self.text_proj = nn.Conv1d(text_dim, features[-1], kernel_size=3, padding=1) if use_ci else None
        self.interaction = (ConditionedInteraction(features[-1], self.grid, num_heads, dropout, image_reads,
                                                   ci_attention) if use_ci else None)
        self.decoder = RecLMISDecoder(features, num_classes)

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """-> logits, or with ``with_features`` (the training step: its losses read the features) (logits,
        features) of ``forward_features``. One call for both, so the training step runs the network nnU-Net
        compiled (and wrapped in DDP) rather than the bare module."""
        x, cond = self.condition(x)
        out = self.forward_features(x, cond["tokens"], cond["mask"])
        return out if with_features else out[0]

    def segment(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W), tokens (B, L, D) frozen text states, mask (B, L) bool (True = real token)
        -> logits (B, num_classes, H, W)."""
        return self.forward_features(x, tokens, mask)[0]

    def forward_features(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
        """-> (logits, features) with features (what ``RecLMISAuxiliary`` needs):
        "text" E (B, L, d) after the Conv1d; "text_ci" E' (B, L, d), None when E' is training-only (the paper's
        CI); "image" V (B, N, d) the bottleneck tokens before CI; "image_emb" V_emb (B, N, d) CI's embedded
        tokens; "image_ci" V' (B, N, d); "tokens" (B, L, D) the frozen states as passed; "mask" (B, L) bool."""
        b = x.shape[0]
        if tokens.ndim != 3 or tokens.shape[0] != b or tokens.shape[-1] != self.text_dim:
            raise ValueError(f"tokens must be (B={b}, L, D={self.text_dim}), got {tuple(tokens.shape)}")
        mask = mask.to(device=tokens.device, dtype=torch.bool)
        if tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"mask must be (B, L) = {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
        skips = self.encoder(x)
        bottleneck = skips[-1]
        if tuple(bottleneck.shape[2:]) != self.grid:
            raise ValueError(f"RecLMIS was built for patches of {self.patch_size} (bottleneck {self.grid}, the "
                             f"grid of its position embedding); got input {tuple(x.shape[2:])} -> "
                             f"{tuple(bottleneck.shape[2:])}")
        if not self.use_ci:  # Table III (e): no text at all
            logits = self.decoder(bottleneck, skips[:-1])
            return logits, {"text": None, "text_ci": None, "image": bottleneck.flatten(2).transpose(1, 2),
                            "image_emb": None, "image_ci": None, "tokens": tokens, "mask": mask}
        # zero the padding first: the Conv1d's 3-tap window would carry it into the neighbouring real tokens
        states = tokens.to(self.text_proj.weight.dtype) * mask[..., None]
        text = self.text_proj(states.transpose(1, 2)).transpose(1, 2)
        image_emb, text_ci, image_ci = self.interaction(bottleneck, text, mask)
        fused = image_ci.transpose(1, 2).reshape(b, self.bottleneck_channels, *self.grid)
        logits = self.decoder(fused, skips[:-1])
        features = {"text": text, "text_ci": text_ci, "image": bottleneck.flatten(2).transpose(1, 2),
                    "image_emb": image_emb, "image_ci": image_ci, "tokens": tokens, "mask": mask}
        return logits, features

    def parameter_groups(self) -> dict[str, int]:
        """Parameters per part (the breakdown in the module docstring)."""
        parts = {"encoder": self.encoder, "text_proj": self.text_proj, "interaction": self.interaction,
                 "decoder": self.decoder}
        return {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items() if m is not None}


# ---------------------------------------------------------------------------------------------------- training-only

class ConditionedDecoderLayer(nn.Module):
    """The authors' ``TransformerDecoderLayer`` (post-LN): x (B, Lq, d) -> (B, Lq, d).

    x = LN(x + Drop(SelfAttn(x)))                        self-attention, optionally conditioned by W
    x = LN(x + Drop(CrossAttn(x, context)))              only with ``cross_attention`` (conditioned by W)
    x = LN(x + Drop(Linear(ReLU(Linear(x)))))            FFN d -> ffn_dim -> d
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, cross_attention: bool,
                 placement: str = "logits"):
        super().__init__()
        self.self_attn = ConditionedAttention(dim, num_heads, placement)
        self.self_norm = nn.LayerNorm(dim)
        self.cross_attn = ConditionedAttention(dim, num_heads, placement) if cross_attention else None
        self.cross_norm = nn.LayerNorm(dim) if cross_attention else None
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, valid=None, self_weights=None, context=None, context_valid=None, context_weights=None,
                causal: bool = False):
        x = self.self_norm(x + self.dropout(self.self_attn(x, x, self_weights, valid, causal)))
        if self.cross_attn is not None:
            x = self.cross_norm(x + self.dropout(self.cross_attn(x, context, context_weights, context_valid)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class ConditionedReconstructor(nn.Module):
    """Psi (eq. 7 / 9; the authors' ``DualTransformer`` with ``decoding=2``):
    queries X_m (B, Lq, d) masked, context C (B, Lk, d), condition W (B, Lk) -> reconstruction (B, Lq, out_dim).

    context encoder: ``layers`` layers of W-conditioned self-attention + FFN over C (their decoder1);
    reconstructor: ``layers`` layers of self-attention over X_m, W-conditioned cross-attention to the encoded C,
    FFN (their decoder2). ``out_dim`` != d adds a final Linear(d -> out_dim) (CLR with a text width D != d).
    ``placement``: W inside the softmax, on the logits (eq. 7 / 9) or on the probabilities (the authors' code).
    """

    def __init__(self, dim: int, num_heads: int = 4, layers: int = 3, ffn_dim: int = 1024, dropout: float = 0.1,
                 out_dim: int | None = None, causal: bool = True, placement: str = "logits"):
        super().__init__()
        if layers < 1:
            raise ValueError(f"a conditioned reconstructor needs at least 1 layer, got {layers}")
        self.causal = bool(causal)
        self.context_layers = nn.ModuleList(ConditionedDecoderLayer(dim, num_heads, ffn_dim, dropout, False, placement)
                                            for _ in range(layers))
        self.query_layers = nn.ModuleList(ConditionedDecoderLayer(dim, num_heads, ffn_dim, dropout, True, placement)
                                          for _ in range(layers))
        self.out_proj = nn.Linear(dim, out_dim) if out_dim is not None and out_dim != dim else None

    def forward(self, queries: torch.Tensor, context: torch.Tensor, weights: torch.Tensor,
                query_valid: torch.Tensor | None = None, context_valid: torch.Tensor | None = None) -> torch.Tensor:
        c = context
        for layer in self.context_layers:
            c = layer(c, context_valid, self_weights=weights, causal=self.causal)
        x = queries
        for layer in self.query_layers:
            x = layer(x, query_valid, context=c, context_valid=context_valid, context_weights=weights,
                      causal=self.causal)
        return x if self.out_proj is None else self.out_proj(x)


class InterestHead(nn.Module):
    """Interest scores (eq. 2 / 3 before the softmax): (B, n, d) -> (B, n) logits.

    [Conv1d(k3) + BN + ReLU over the item axis: the words' head, the authors' CTBN] -> Dropout ->
    Linear(d, d) -> ReLU -> Linear(d, 1).
    """

    def __init__(self, dim: int, sequence_conv: bool = False, dropout: float = 0.0):
        super().__init__()
        self.conv = (nn.Sequential(nn.Conv1d(dim, dim, 3, padding=1), nn.BatchNorm1d(dim), nn.ReLU(inplace=True))
                     if sequence_conv else None)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 1))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.conv is not None:
            if valid is not None:
                x = x * valid[..., None]  # padding must not leak into the neighbouring words
            x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.mlp(self.dropout(x)).squeeze(-1)


def sample_interest_mask(weights: torch.Tensor, rate: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Probability-weighted masking (Sec. III-C): weights W (B, n), valid (B, n) bool -> masked (B, n) bool.

    Per sample, k = max(floor(n_b * rate), 1) distinct items among its n_b valid ones, drawn without replacement
    with probability W (``torch.multinomial``, reproducible under ``torch.manual_seed``). W is floored at 1e-12
    on the valid items so that k draws exist when the softmax underflows; invalid items are never drawn.
    """
    w = weights.detach().float()
    valid = torch.ones_like(w, dtype=torch.bool) if valid is None else valid.to(device=w.device, dtype=torch.bool)
    p = torch.where(valid, w.clamp_min(1e-12), torch.zeros_like(w))
    masked = torch.zeros_like(valid)
    for b, n in enumerate(valid.sum(1).tolist()):
        if n == 0:
            continue
        k = min(max(math.floor(n * rate + 1e-9), 1), n)
        masked[b, torch.multinomial(p[b], k, replacement=False)] = True
    return masked


class RecLMISAuxiliary(nn.Module):
    """Training-only parts: interest MLPs (W_poi, W_woi), probability-weighted masking, CVR and CLR conditioned
    reconstructors, CCL. Never part of the inference graph.

    forward(features) with features = ``RecLMIS.forward_features(...)[1]`` -> {"cvr": L_T2V, "clr": L_V2T,
    "ccl": L_CCL}, unweighted scalars (the paper weights them 1, 1, 0.2 against 5 x segmentation):

    W_woi = softmax over real tokens of the word head(E');  W_poi = softmax over patches of the patch head(V')
    V_m = V with k_v patches zeroed (drawn by W_poi, rate image_mask_rate); E_m = E likewise (W_woi, text rate)
    CVR: V^ = Psi(V_m, E, W_woi), L_T2V = MSE(V^, target) weighted by W_poi     (target: V' or V, ``cvr_target``)
    CLR: E^ = Psi(E_m, V, W_poi) [-> Linear(d -> D)], L_V2T = MSE(E^, tokens) weighted by W_woi (real tokens)
    CCL: eq. 5-6 on (V, E) with W_poi, W_woi, temperature.

    Args:
        dim: d, the bottleneck width (RecLMIS.bottleneck_channels); text_dim: D of the frozen token states.
        layers: context-encoder and reconstructor layers of each Psi (paper text 3; the QaTa code config 4).
        cvr_target: "image_ci" (V', the authors' code) or "image" (V, eq. 8).
        causal: the authors' future mask in the reconstructors' self-attentions (see the module docstring).
        interest_dropout: dropout before the interest MLPs (their config.dropout: 0 QaTa, 0.5 MosMed).
        word_conv: the authors' Conv1d+BN+ReLU (CTBN) before the word MLP.
        conditions: the modules that use W (Table IV): "ccl" (eq. 5's weights), "clr" / "cvr" (the conditioned
            attention of eq. 9 / 7 and the weights of eq. 10 / 8); a module left out uses uniform weights.
        reconstruction_attention: "cross" (CVR and CLR, the paper) or "self" (Table V: one reconstructor whose
            queries are [V_m; E_m] and keys / values [V; E], condition [W_poi; W_woi] / 2).
        mask_strategy: "interest" (masked items drawn with probabilities W, Sec. III-C) or "random" (uniform,
            §IV-D3 / Fig. 7).
        condition_placement: "logits" (eq. 7 / 9: softmax((Q K^T / sqrt(d_h)) ⊙ W)) or "probabilities" (the
            authors' ``gauss_weight``: softmax(Q K^T / sqrt(d_h)) * W, renormalised).
        vision_to_text: hold CI's vision-to-text encoder E' = MHA(Q=E, K=V=V_emb) here (the paper's CI, where
            only W_woi reads E'); False when the network computes E' (``image_reads="text_ci"``).
    """

    def __init__(self, dim: int, text_dim: int, num_heads: int = 4, layers: int = 3, ffn_dim: int = 1024,
                 image_mask_rate: float = 0.5, text_mask_rate: float = 0.3, temperature: float = 0.01,
                 dropout: float = 0.1, *, cvr_target: str = "image_ci", causal: bool = True,
                 interest_dropout: float = 0.0, word_conv: bool = True, vision_to_text: bool = True,
                 condition_placement: str = "logits", conditions: Sequence[str] = ("ccl", "clr", "cvr"),
                 mask_strategy: str = "interest", reconstruction_attention: str = "cross"):
        super().__init__()
        if mask_strategy not in ("interest", "random"):
            raise ValueError(f"mask_strategy must be 'interest' (drawn by W, Sec. III-C) or 'random' (uniform), "
                             f"got {mask_strategy!r}")
        if reconstruction_attention not in ("cross", "self"):
            raise ValueError(f"reconstruction_attention must be 'cross' (the paper) or 'self' (Table V), got "
                             f"{reconstruction_attention!r}")
        if set(conditions) - {"ccl", "clr", "cvr"}:
            raise ValueError(f"conditions are among 'ccl', 'clr', 'cvr' (Table IV), got {list(conditions)}")
        self.conditions, self.mask_strategy = frozenset(conditions), mask_strategy
        if cvr_target not in ("image_ci", "image"):
            raise ValueError(f"cvr_target must be 'image_ci' (V', the authors' code) or 'image' (V, eq. 8), "
                             f"got {cvr_target!r}")
        for name, rate in (("image_mask_rate", image_mask_rate), ("text_mask_rate", text_mask_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        self.dim, self.text_dim = int(dim), int(text_dim)
        self.image_mask_rate, self.text_mask_rate = float(image_mask_rate), float(text_mask_rate)
        self.temperature, self.cvr_target = float(temperature), cvr_target
        # the paper's CI: E' = MHA(Q=E, K=V=V_emb) only feeds W_woi, so it trains here (the network's CI computes
        # it itself in the authors' variant, image_reads="text_ci": then vision_to_text=False)
        self.text_attention = (nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
                               if vision_to_text else None)
        self.word_interest = InterestHead(dim, sequence_conv=word_conv, dropout=interest_dropout)
        self.patch_interest = InterestHead(dim, dropout=interest_dropout)
        self.cvr = self.clr = self.joint = self.joint_text_out = None
        if reconstruction_attention == "cross":
            self.cvr = ConditionedReconstructor(dim, num_heads, layers, ffn_dim, dropout, causal=causal,
                                                placement=condition_placement)
            self.clr = ConditionedReconstructor(dim, num_heads, layers, ffn_dim, dropout, out_dim=text_dim,
                                                causal=causal, placement=condition_placement)
        else:  # Table V "Self-Attn" reconstruction: one Psi, queries [V_m; E_m], keys and values [V; E]
            self.joint = ConditionedReconstructor(dim, num_heads, layers, ffn_dim, dropout, causal=causal,
                                                  placement=condition_placement)
            self.joint_text_out = nn.Linear(dim, text_dim) if text_dim != dim else None

    def interest(self, features: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (W_poi (B, N), W_woi (B, L)): eq. 2 and 3; W_woi is 0 at padded tokens, each sums to 1."""
        mask = _nonempty(features["mask"].to(torch.bool))
        text_ci = features.get("text_ci")
        if (text_ci is None) != (self.text_attention is not None):
            raise ValueError("RecLMISAuxiliary: build it with vision_to_text=True exactly when the network's CI "
                             "leaves E' to the training-only modules (image_reads='text')")
        if text_ci is None:
            v = features["image_emb"]
            text_ci = self.text_attention(features["text"], v, v, need_weights=False)[0]
        w_poi = self.patch_interest(features["image_ci"]).float().softmax(-1)
        w_woi = self.word_interest(text_ci, mask).float().masked_fill(~mask, float("-inf")).softmax(-1)
        return w_poi, w_woi

    def forward(self, features: dict) -> dict[str, torch.Tensor]:
        text, image, tokens = features["text"], features["image"], features["tokens"]
        mask = features["mask"].to(torch.bool)
        if tokens.shape[-1] != self.text_dim or image.shape[-1] != self.dim:
            raise ValueError(f"RecLMISAuxiliary built for d={self.dim}, D={self.text_dim}; got image tokens "
                             f"{tuple(image.shape)} and token states {tuple(tokens.shape)}")
        w_poi, w_woi = self.interest(features)
        text_valid = _nonempty(mask)  # keys of every attention over text: real tokens only
        # a module without its condition (Table IV) sees uniform interest: every patch / real word alike
        flat_poi = torch.full_like(w_poi, 1.0 / w_poi.shape[1])
        flat_woi = text_valid.float() / text_valid.float().sum(1, keepdim=True)
        draw_poi, draw_woi = (w_poi, w_woi) if self.mask_strategy == "interest" else (flat_poi, flat_woi)
        image_masked = image.masked_fill(sample_interest_mask(draw_poi, self.image_mask_rate)[..., None], 0.0)
        text_masked = text.masked_fill(sample_interest_mask(draw_woi, self.text_mask_rate, mask)[..., None], 0.0)
        cvr, clr, ccl = (c in self.conditions for c in ("cvr", "clr", "ccl"))
        if self.joint is None:
            image_rec = self.cvr(image_masked, text, w_woi if cvr else None, context_valid=text_valid)
            text_rec = self.clr(text_masked, image, w_poi if clr else None, query_valid=text_valid)
        else:
            n = image.shape[1]
            # the keys' condition: W_poi on the image half (what CLR reads), W_woi on the text half (what CVR reads)
            keys_w = torch.cat([w_poi if clr else flat_poi, w_woi if cvr else flat_woi], 1) / 2
            valid = torch.cat([torch.ones_like(w_poi, dtype=torch.bool), text_valid], 1)
            out = self.joint(torch.cat([image_masked, text_masked], 1), torch.cat([image, text], 1), keys_w,
                             query_valid=valid, context_valid=valid)
            image_rec, text_rec = out[:, :n], out[:, n:]
            if self.joint_text_out is not None:
                text_rec = self.joint_text_out(text_rec)
        return {"cvr": weighted_reconstruction_loss(image_rec, features[self.cvr_target], w_poi if cvr else flat_poi),
                "clr": weighted_reconstruction_loss(text_rec, tokens, w_woi if clr else flat_woi, valid=mask),
                "ccl": conditioned_contrastive_loss(image, text, w_poi if ccl else flat_poi,
                                                    w_woi if ccl else flat_woi, mask, self.temperature)}

    def parameter_groups(self) -> dict[str, int]:
        parts = {"word_interest": self.word_interest, "patch_interest": self.patch_interest, "cvr": self.cvr,
                 "clr": self.clr, "joint": self.joint, "joint_text_out": self.joint_text_out}
        parts = {name: m for name, m in parts.items() if m is not None}
        if self.text_attention is not None:
            parts["vision_to_text"] = self.text_attention
        return {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
