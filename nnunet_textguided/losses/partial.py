"""Partial-label loss of universal (multi-dataset) segmentation: CDPDNet (seed 002, Sec. III-F, Eq. 7).

Every output channel is one binary label (sigmoid); a training case comes from a source dataset that
annotates only some labels, so the loss of a (sample, label) pair is counted only when that sample's dataset
annotates the label ("masked backpropagation"). As in the authors' utils/loss.py, per sample and label:
BCE-with-logits averaged over the voxels, soft Dice loss 1 - 2 sum(p t) / (sum(p) + sum(t) + smooth) with
p = sigmoid(logits); each averaged over the annotated pairs of the batch; weighted 1 : 1.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import batch_mean, global_sum

__all__ = ["PartialLabelLoss", "labels_to_channels"]


class PartialLabelLoss(nn.Module):
    """loss(logits (B, K, *), target (B, K, *) in {0, 1}, annotated (B, K) bool) -> scalar.

    = bce_weight * BCE-with-logits averaged over the voxels of the annotated pairs
      + dice_weight * mean over annotated pairs of the soft Dice loss.
    Unannotated pairs never enter the computation, so their logits get exactly zero gradient (never NaN);
    a batch with no annotated pair gives a zero that still depends on the logits (backward works).
    Computed in float32 (safe under autocast). Under DDP the means run over the annotated pairs of the whole
    batch (all ranks', ``losses.distributed``), so the ranks' averaged gradient is the single-process one.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.bce_weight, self.dice_weight, self.smooth = float(bce_weight), float(dice_weight), float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        if logits.ndim < 3 or target.shape != logits.shape:
            raise ValueError(f"logits and target must both be (B, K, *spatial); got {tuple(logits.shape)} and "
                             f"{tuple(target.shape)}")
        if tuple(annotated.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"annotated must be (B, K) = {tuple(logits.shape[:2])}, got {tuple(annotated.shape)}")
        mask = annotated.to(device=logits.device, dtype=torch.bool)
        # boolean selection keeps unannotated pairs out of the graph: their gradient is exactly 0
        x = logits.flatten(2)[mask].float()  # (P, V)
        # the number of annotated pairs of the whole batch (all DDP ranks'): every rank asks, even with none
        pairs = float(x.shape[0])
        if float(global_sum(torch.tensor(pairs, device=logits.device))) == 0:
            return logits.flatten()[:0].float().sum()
        t = target.flatten(2)[mask].to(x.dtype)
        bce = F.binary_cross_entropy_with_logits(x, t, reduction="sum")
        p = torch.sigmoid(x)
        dice = 1 - 2 * (p * t).sum(-1) / (p.sum(-1) + t.sum(-1) + self.smooth)
        voxels = float(x.shape[1]) if x.ndim == 2 else float(logits.flatten(2).shape[-1])
        return (self.bce_weight * batch_mean(bce, pairs * voxels)
                + self.dice_weight * batch_mean(dice.sum(), pairs))


def labels_to_channels(seg: torch.Tensor, regions: Sequence[int | Sequence[int]]) -> torch.Tensor:
    """(B, 1, *spatial) integer label map -> (B, K, *spatial) float: channel k is 1 where seg is in regions[k]
    (a label value or a tuple of values, e.g. kidney = (left, right), liver incl. tumour = (liver, tumour))."""
    if seg.ndim < 3 or seg.shape[1] != 1:
        raise ValueError(f"seg must be (B, 1, *spatial), got {tuple(seg.shape)}")
    seg = seg[:, 0].long()
    channels = []
    for region in regions:
        values = torch.as_tensor(region, dtype=torch.long, device=seg.device).reshape(-1)
        channels.append(torch.isin(seg, values))
    if not channels:
        return seg.new_zeros((seg.shape[0], 0, *seg.shape[1:]), dtype=torch.float32)
    return torch.stack(channels, 1).float()
