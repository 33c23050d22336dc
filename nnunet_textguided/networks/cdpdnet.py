"""CDPDNet (Wu et al., "CDPDNet: Integrating Text Guidance with Hybrid Vision Encoders for Medical Image
Segmentation", seed 002) on an nnU-Net CNN encoder. Pure PyTorch + dynamic_network_architectures.

After the paper (Sec. III-B..III-E) and the authors' wujiong-hub/CDPDNet (model/CDPDNet/cdpdnet.py,
clipdino.py, model/AttenModule/basic_LWCA.py). Input (B, C_in, S, H, W), S = slices of the patch:

1. CNN encoder: nnU-Net's ``PlainConvEncoder`` (the backbone's ``.encoder``), its stages run one by one.
2. DINOv2 branch (``use_dino``), after each encoder stage in ``dino_stages``: the conditioner's frozen
   DINOv2 hidden states (B, dino_dim, S, h, w) -> 3D adaptor (Eq. 4: depthwise Conv3d k=s=(slice_pool,1,1)
   -> Conv3d k3 -> BatchNorm3d -> ReLU) -> trilinear upsampling (align_corners=True) to the stage size ->
   window cross-attention fusion (Eq. 5, ``DinoCnnFusion``): queries from DINO, keys/values from the CNN,
   residual on the CNN path. The fused features are the stage's skip and go on to the next stage.
3. Alignment (``use_alignment``, Eq. 6): FiLM of every skip and of the bottleneck with all organ texts
   (``TextFiLM``); the texts are buffers (K, E) -> Linear(E, text_dim) -> ReLU.
4. TTPG (``use_ttpg``, Sec. III-D): aligned bottleneck -> task prompt maps (B, T, ...); each sample's own
   task channel is concatenated to the bottleneck.
5. Decoder: nnU-Net's ``UNetDecoder`` (transposed conv, concat with the aligned skip, convs per stage,
   1x1 head), no deep supervision -> logits (B, num_labels, S, H, W); per-label sigmoid is the loss's /
   the predictor's business.

Deviations from the authors' code, by choice:
- Per-sample task prompts (their ``task_id[0]`` uses the first sample's task for the whole batch), and the
  task ids are the dataset's own (their train.py maps tasks 8-10 to the wrong prompts).
- Cross-attention projects q and k/v with separate Linear layers (theirs runs one qkv Linear over both
  inputs and keeps q from one, k/v from the other: the same parameter count, q and k/v tied).
- No unused modules: they build adaptors/fusions for 4 levels and use 3, and 4 output LayerNorms per fusion
  stage of which one is used; drop path in the fusion is 0 (theirs: 0 and 0.033 in the two blocks).
- The decoder's 1x1 heads have a bias (nnU-Net's decoder; theirs has none).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from .blocks.film import TextFiLM
from .blocks.windows import CrossWindowBlock, tokens_to_volume, volume_to_tokens
from .conditioned import ConditionedNetwork

__all__ = ["CDPDNet", "DinoAdaptor3d", "DinoCnnFusion", "TaskPromptGenerator"]


def _per_axis(value, name: str) -> tuple[int, ...]:
    t = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * 3
    if len(t) != 3:
        raise ValueError(f"{name}: expected one int or three, got {value!r}")
    return t


class DinoAdaptor3d(nn.Module):
    """3D adaptor (Eq. 4): (B, dino_dim, S, h, w) -> (B, C, S // slice_pool, h, w) -> upsampled (B, C, *size).

    Depthwise Conv3d(dino_dim, kernel = stride = (slice_pool, 1, 1)) pools groups of slices per channel;
    Conv3d(dino_dim -> C, k3, padding 1) -> BatchNorm3d -> ReLU; then trilinear (align_corners=True) to
    ``size``, the CNN stage's spatial size.
    """

    def __init__(self, dino_dim: int, out_channels: int, slice_pool: int):
        super().__init__()
        self.slice_pool = slice_pool
        self.depthwise = nn.Conv3d(dino_dim, dino_dim, kernel_size=(slice_pool, 1, 1), stride=(slice_pool, 1, 1),
                                   groups=dino_dim)
        self.conv = nn.Conv3d(dino_dim, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, features: torch.Tensor, size) -> torch.Tensor:
        x = self.act(self.norm(self.conv(self.depthwise(features))))
        return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=True)


class DinoCnnFusion(nn.Module):
    """Fusion of vision features (Eq. 5): one Swin stage of ``depth`` window cross-attention blocks.

    (cnn, dino) both (B, C, *grid) -> (B, C, *grid). Regular windows in even blocks, shifted (window // 2,
    masked) in odd ones; queries from LN(dino) projected, keys/values from LN(cnn); residual on the CNN
    tokens; MLP 4x GELU; no qkv bias; Swin relative-position bias; an output LayerNorm (the authors' norm0).
    """

    def __init__(self, channels: int, grid, num_heads: int, window, depth: int):
        super().__init__()
        self.grid = tuple(grid)
        self.blocks = nn.ModuleList(
            CrossWindowBlock(channels, self.grid, num_heads, window, shifted=i % 2 == 1, qkv_bias=False,
                             index="swin") for i in range(depth))
        self.norm = nn.LayerNorm(channels)

    def forward(self, cnn: torch.Tensor, dino: torch.Tensor) -> torch.Tensor:
        x, q = volume_to_tokens(cnn), volume_to_tokens(dino)
        for block in self.blocks:
            x = block(x, q)  # the queries stay the adapted DINO tokens in every block, as the authors do
        return tokens_to_volume(self.norm(x), self.grid)


class TaskPromptGenerator(nn.Module):
    """TTPG (Sec. III-D, Fig. 2): bottleneck (B, C, *) and projected task texts (T, D) -> prompt maps (B, T, *).

    task_conv: 2 conv blocks C -> T -> T; task_film: FiLM with all T task texts; fusion: concat with the
    bottleneck (C + T) -> 3 conv blocks -> (C+T)//4 -> (C+T)//4 -> T. Conv blocks are conv -> norm -> nonlin
    like the encoder's (the authors' StackedConvLayers / StackedFusionConvLayers).
    """

    def __init__(self, channels: int, num_tasks: int, text_dim: int, conv: dict, gamma_bias: float | None = None):
        super().__init__()
        hidden = (channels + num_tasks) // 4
        self.task_conv = StackedConvBlocks(2, input_channels=channels, output_channels=num_tasks, **conv)
        self.task_film = TextFiLM(num_tasks, num_tasks, text_dim, gamma_bias)
        self.fusion = StackedConvBlocks(3, input_channels=channels + num_tasks,
                                        output_channels=[hidden, hidden, num_tasks], **conv)

    def forward(self, bottleneck: torch.Tensor, task_texts: torch.Tensor) -> torch.Tensor:
        prompt = self.task_film(self.task_conv(bottleneck), task_texts)
        return self.fusion(torch.cat([bottleneck, prompt], 1))


class CDPDNet(ConditionedNetwork):
    """CDPDNet on an nnU-Net ``PlainConvEncoder``: x (B, C_in, *patch) -> logits (B, num_labels, *patch).

    Args:
        encoder: nnU-Net's CNN encoder (``PlainConvEncoder``, return_skips=True; a ``stem`` is run first
            if present). Its stages are run one by one so the fusion can sit between them.
        num_labels: K output channels, one binary (sigmoid) map per label; one organ text per label.
        organ_embeddings: (K, E) label-text embeddings (CLIP ViT-B/32: 32 x 512), a persistent buffer.
        task_embeddings: (T, E') task-prompt embeddings (11 x 512), a persistent buffer.
        use_alignment, use_dino, use_ttpg: the paper's CLIP-EVA, DINOv2-DFE and TTPG (Table V); a disabled
            part builds no parameters. Without DINO no conditioner is needed.
        text_dim: D, width of the projected texts (Linear(E, D) + ReLU).
        dino_dim: channels of the DINOv2 hidden states.
        dino_stages: encoder stage indices (strictly increasing) fused with DINO features. The conditioner's
            ``{"dino": [t_1 .. t_k]}`` (shallowest first, k >= len(dino_stages)) is matched from the deep
            end: the last len(dino_stages) hidden states, shallowest to the first fused stage (the authors
            extract 4 and use the last 3 at stages 2, 3, 4).
        slice_pool: slices pooled by the adaptor's depthwise conv (14 = DINOv2's patch size in the paper).
        fusion_window, fusion_heads, fusion_depth: Swin window (clamped to the grid), heads, blocks.
        n_conv_per_stage_decoder: conv blocks per decoder stage.
        patch_size: the input patch (S, H, W); needed with use_dino (the windowed blocks' grids are fixed
            at construction and computed from the encoder strides).
        share_bottleneck_film: the deepest skip and the bottleneck share one FiLM module when their channel
            counts match (the authors' ``deep_film_block[-1]``); False, or different counts, give the
            bottleneck its own.
        identity_init: new branches start neutral: every FiLM's gamma bias starts at 1 (gamma = 1 + W1 t
            instead of the authors' ~0, which scales skips and bottleneck by ~0.05 with random signs), and the
            output layers of each fusion block's attention and MLP start at zero (the fusion begins as the CNN
            path alone and learns how much DINOv2 to add). Measured on the phantom merge (3d_tiny, tiny DINOv2):
            with the authors' init spleen and kidneys start being segmented after ~14 (FiLM) / ~11 (fusion)
            epochs of 25 iterations, vs ~4 for the baseline CNN. False = the authors' initialisation.

    Task routing (TTPG only): ``set_batch_tasks(ids)`` (training: each sample's task) wins over
    ``set_label_tasks(assignment)`` (inference: for each output label, the task whose prompt is used — the
    encoder runs once, TTPG + decoder once per distinct task); with neither, task 0.
    ``decoder`` is nnU-Net's ``UNetDecoder`` (nnU-Net toggles ``decoder.deep_supervision``).
    """

    def __init__(self, encoder: nn.Module, num_labels: int, organ_embeddings: torch.Tensor,
                 task_embeddings: torch.Tensor, *, use_alignment: bool = True, use_dino: bool = True,
                 use_ttpg: bool = True, text_dim: int = 256, dino_dim: int = 768, dino_stages=(2, 3, 4),
                 slice_pool: int = 14, fusion_window=(3, 3, 3), fusion_heads: int = 4, fusion_depth: int = 2,
                 n_conv_per_stage_decoder=2, patch_size=None, share_bottleneck_film: bool = True,
                 identity_init: bool = True):
        super().__init__()
        channels = [int(c) for c in encoder.output_channels]
        n = len(channels)
        if n < 2:
            raise ValueError("CDPDNet needs an encoder with at least 2 stages (skips and a bottleneck)")
        self.encoder = encoder
        self.num_labels = int(num_labels)
        self.use_alignment, self.use_dino, self.use_ttpg = bool(use_alignment), bool(use_dino), bool(use_ttpg)
        self.channels = channels

        # texts: buffers on the construction device (the meta device for shape tests), in checkpoints
        device = torch.get_default_device()
        organ = torch.as_tensor(organ_embeddings).detach().to(device=device, dtype=torch.float32).clone()
        task = torch.as_tensor(task_embeddings).detach().to(device=device, dtype=torch.float32).clone()
        if organ.ndim != 2 or organ.shape[0] != self.num_labels:
            raise ValueError(f"organ_embeddings must be (num_labels={self.num_labels}, E), one text per output "
                             f"label; got {tuple(organ.shape)}")
        if task.ndim != 2 or task.shape[0] < 1:
            raise ValueError(f"task_embeddings must be (T, E) with T >= 1; got {tuple(task.shape)}")
        self.register_buffer("organ_embeddings", organ)
        self.register_buffer("task_embeddings", task)
        self.num_tasks = int(task.shape[0])
        self.organ_proj = nn.Linear(organ.shape[1], text_dim) if self.use_alignment else None
        self.task_proj = nn.Linear(task.shape[1], text_dim) if self.use_ttpg else None

        # alignment: one FiLM per skip, the bottleneck's shared with the deepest skip's when widths match
        self.share_bottleneck_film = bool(share_bottleneck_film) and channels[-1] == channels[-2]
        self.films = None
        if self.use_alignment:
            film_channels = channels[:-1] + ([] if self.share_bottleneck_film else [channels[-1]])
            self.films = nn.ModuleList(TextFiLM(c, self.num_labels, text_dim, 1.0 if identity_init else None)
                                       for c in film_channels)

        # DINOv2 branch
        self.dino_stages = tuple(int(s) for s in dino_stages) if self.use_dino else ()
        self.dino_dim, self.slice_pool = int(dino_dim), int(slice_pool)
        self.grids = None if patch_size is None else self.stage_grids(encoder, patch_size)
        self.dino_adaptors = self.fusions = None
        if self.use_dino:
            self._check_dino_config(n, channels, fusion_heads, patch_size)
            window = _per_axis(fusion_window, "fusion_window")
            self.dino_adaptors = nn.ModuleList(DinoAdaptor3d(self.dino_dim, channels[s], self.slice_pool)
                                               for s in self.dino_stages)
            self.fusions = nn.ModuleList(DinoCnnFusion(channels[s], self.grids[s], fusion_heads, window, fusion_depth)
                                         for s in self.dino_stages)
            if identity_init:
                for block in (b for f in self.fusions for b in f.blocks):
                    for layer in (block.attn.proj, block.mlp.fc2):
                        nn.init.zeros_(layer.weight)
                        nn.init.zeros_(layer.bias)

        conv = dict(conv_op=encoder.conv_op, kernel_size=encoder.kernel_sizes[-1], initial_stride=1,
                    conv_bias=encoder.conv_bias, norm_op=encoder.norm_op, norm_op_kwargs=encoder.norm_op_kwargs,
                    dropout_op=encoder.dropout_op, dropout_op_kwargs=encoder.dropout_op_kwargs,
                    nonlin=encoder.nonlin, nonlin_kwargs=encoder.nonlin_kwargs)
        self.ttpg = (TaskPromptGenerator(channels[-1], self.num_tasks, text_dim, conv, 1.0 if identity_init else None)
                     if self.use_ttpg else None)

        # the decoder sees an encoder whose bottleneck has one more channel: the task prompt
        below = channels[-1] + (1 if self.use_ttpg else 0)
        decoder_encoder = SimpleNamespace(
            output_channels=channels[:-1] + [below], strides=encoder.strides, kernel_sizes=encoder.kernel_sizes,
            **{k: getattr(encoder, k) for k in ("conv_op", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                                                "dropout_op_kwargs", "nonlin", "nonlin_kwargs")})
        self.decoder = UNetDecoder(decoder_encoder, self.num_labels, n_conv_per_stage_decoder, deep_supervision=False)

        self._batch_tasks: torch.Tensor | None = None
        self._label_tasks: list[int] | None = None

    # ------------------------------------------------------------------ construction helpers
    def _check_dino_config(self, n: int, channels: list[int], heads: int, patch_size) -> None:
        stages = self.dino_stages
        if not stages or any(b <= a for a, b in zip(stages, stages[1:])) or stages[0] < 0 or stages[-1] >= n:
            raise ValueError(f"dino_stages {stages}: strictly increasing encoder stage indices in [0, {n - 1}]")
        if patch_size is None:
            raise ValueError("CDPDNet with use_dino needs patch_size (the fusion windows are built for the grid of "
                             "each stage); pass the plans' patch_size")
        if self.slice_pool < 1 or self.slice_pool > int(patch_size[0]):
            raise ValueError(f"slice_pool {self.slice_pool} must be in [1, S] with S = patch_size[0] = "
                             f"{int(patch_size[0])} slices (the DINO features have one entry per slice)")
        for s in stages:
            if channels[s] % heads:
                raise ValueError(f"fusion at encoder stage {s}: {channels[s]} channels are not divisible by "
                                 f"fusion_heads {heads}")

    @staticmethod
    def stage_grids(encoder: nn.Module, patch_size) -> list[tuple[int, int, int]]:
        """Spatial size of each encoder stage's output for ``patch_size`` (cumulative strides; nnU-Net patches
        are divisible by them)."""
        grid = _per_axis(patch_size, "patch_size")
        grids = []
        for k, stride in enumerate(encoder.strides):
            stride = _per_axis(stride, "stride")
            if any(g % s for g, s in zip(grid, stride)):
                raise ValueError(f"patch_size {tuple(patch_size)} is not divisible by the encoder strides "
                                 f"(stage {k}: grid {grid} / stride {stride})")
            grid = tuple(g // s for g, s in zip(grid, stride))
            grids.append(grid)
        return grids

    # ------------------------------------------------------------------ task routing
    def set_batch_tasks(self, task_ids: torch.Tensor | None) -> None:
        """Training: ``task_ids`` (B,) long, the task (source dataset) of each sample; None clears."""
        if task_ids is None:
            self._batch_tasks = None
            return
        ids = torch.as_tensor(task_ids)
        if ids.ndim != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"task ids must be a 1-D integer tensor (one per sample), got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if ids.device.type != "meta" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_tasks):
            raise ValueError(f"task ids {ids.tolist()} out of range: the network has {self.num_tasks} tasks "
                             f"(0 .. {self.num_tasks - 1})")
        self._batch_tasks = ids.detach().long()

    def set_label_tasks(self, assignment: list[int] | None) -> None:
        """Inference: for each output label the task whose prompt predicts it; None clears."""
        if assignment is None:
            self._label_tasks = None
            return
        tasks = [int(a) for a in assignment]
        if len(tasks) != self.num_labels:
            raise ValueError(f"label task assignment needs one task per label ({self.num_labels}), got {len(tasks)}")
        bad = [a for a in tasks if not 0 <= a < self.num_tasks]
        if bad:
            raise ValueError(f"label task assignment: tasks {sorted(set(bad))} out of range 0 .. {self.num_tasks - 1}")
        self._label_tasks = tasks

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor):
        dino = None
        if self.conditioner is not None:
            x, conditioning = self.condition(x)
            if self.use_dino:
                dino = self._dino_features(conditioning, x)
        elif self.use_dino:
            self.condition(x)  # raises: DINO features come from the conditioner
        skips = self._encode(x, dino)
        bottleneck = skips.pop()
        if self.use_alignment:
            organ = F.relu(self.organ_proj(self.organ_embeddings))
            skips = [film(s, organ) for film, s in zip(self.films, skips)]
            bottleneck = self.films[-1](bottleneck, organ)  # the deepest skip's FiLM when shared
        if not self.use_ttpg:
            return self.decoder(skips + [bottleneck])
        prompts = self.ttpg(bottleneck, F.relu(self.task_proj(self.task_embeddings)))  # (B, T, *)
        return self._route(skips, bottleneck, prompts)

    def _dino_features(self, conditioning: dict, x: torch.Tensor) -> list[torch.Tensor]:
        feats = conditioning.get("dino") if isinstance(conditioning, dict) else None
        if feats is None:
            raise ValueError("CDPDNet's conditioner must return {'dino': [t_1, ..., t_k]} (DINOv2 hidden states, "
                             "each (B, dino_dim, S, h, w))")
        feats = list(feats.unbind(0)) if isinstance(feats, torch.Tensor) else list(feats)
        need = len(self.dino_stages)
        if len(feats) < need:
            raise ValueError(f"CDPDNet fuses DINO features at stages {self.dino_stages} and needs {need} hidden "
                             f"states, the conditioner gave {len(feats)}")
        feats = feats[-need:]
        for t in feats:
            if t.ndim != 5 or t.shape[0] != x.shape[0] or t.shape[1] != self.dino_dim:
                raise ValueError(f"DINO features must be (B={x.shape[0]}, dino_dim={self.dino_dim}, S, h, w), "
                                 f"got {tuple(t.shape)}")
            if t.shape[2] < self.slice_pool:
                raise ValueError(f"slice_pool {self.slice_pool} > S = {t.shape[2]} slices of the DINO features")
        return feats

    def _encode(self, x: torch.Tensor, dino: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Encoder stages with the DINO fusion after the ``dino_stages`` -> [skip_0, ..., bottleneck]."""
        stem = getattr(self.encoder, "stem", None)
        if stem is not None:
            x = stem(x)
        fused = {s: j for j, s in enumerate(self.dino_stages)}
        skips = []
        for k, stage in enumerate(self.encoder.stages):
            x = stage(x)
            if k in fused:
                j = fused[k]
                if tuple(x.shape[2:]) != self.grids[k]:
                    raise ValueError(f"CDPDNet's fusion at stage {k} is built for grid {self.grids[k]} (patch_size "
                                     f"given at construction); the input {tuple(x.shape)} gives {tuple(x.shape[2:])}")
                x = self.fusions[j](x, self.dino_adaptors[j](dino[j], x.shape[2:]))
            skips.append(x)
        return skips

    def _route(self, skips: list[torch.Tensor], bottleneck: torch.Tensor, prompts: torch.Tensor):
        b = bottleneck.shape[0]
        if self._batch_tasks is not None:
            tasks = self._batch_tasks.to(prompts.device)
            if tasks.shape[0] != b:
                raise ValueError(f"set_batch_tasks gave {tasks.shape[0]} task ids for a batch of {b}")
            index = tasks.view(b, *(1,) * (prompts.ndim - 1)).expand(b, 1, *prompts.shape[2:])
            return self._decode(skips, bottleneck, prompts.gather(1, index))
        assignment = self._label_tasks or [0] * self.num_labels
        outputs = {t: self._decode(skips, bottleneck, prompts[:, t:t + 1]) for t in sorted(set(assignment))}
        if len(outputs) == 1:
            return next(iter(outputs.values()))
        return self._gather_labels(outputs, assignment)

    def _decode(self, skips, bottleneck, prompt):
        return self.decoder(skips + [torch.cat([bottleneck, prompt], 1)])

    @classmethod
    def _gather_labels(cls, outputs: dict, assignment: list[int]):
        """Per label k, channel k of the pass of task assignment[k]; lists (deep supervision) element-wise."""
        first = next(iter(outputs.values()))
        if isinstance(first, (list, tuple)):
            return [cls._gather_labels({t: o[i] for t, o in outputs.items()}, assignment) for i in range(len(first))]
        return torch.cat([outputs[t][:, k:k + 1] for k, t in enumerate(assignment)], 1)

    # ------------------------------------------------------------------ reporting
    def parameter_groups(self, trainable_only: bool = True) -> dict[str, int]:
        """Parameter counts per module group (disabled parts count 0): encoder, text_projections,
        alignment, dino_adaptors, fusion, ttpg, decoder."""
        groups = {"encoder": [self.encoder], "text_projections": [self.organ_proj, self.task_proj],
                  "alignment": [self.films], "dino_adaptors": [self.dino_adaptors], "fusion": [self.fusions],
                  "ttpg": [self.ttpg], "decoder": [self.decoder]}
        return {name: sum(p.numel() for m in mods if m is not None for p in m.parameters()
                          if p.requires_grad or not trainable_only) for name, mods in groups.items()}
