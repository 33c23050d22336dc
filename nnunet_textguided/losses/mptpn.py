"""MPTPN's segmentation loss (seed 003, Sec. 4.2, eq. 8-11): L = 0.5 * WBCE + 0.5 * WDice, as the authors' code
(LViT's ``utils.py``: ``WeightedBCE`` and ``WeightedDiceLoss``, both with weights [0.5, 0.5]) computes it.

Input convention (nnU-Net compatible, background fixed): ``logits`` (B, 1+K, *spatial) with spatial 2D or 3D;
channel 0 is identically 0 and channel c >= 1 holds the sigmoid logit s_c of foreground class c, so that
softmax([0, s]) = [1 - sigmoid(s), sigmoid(s)] for K = 1 and nnU-Net's softmax/argmax inference sees a proper
background. Channel 0 is checked to be all zeros (skipped under ``torch.compile``) and never enters the loss; its
gradient is 0. ``target`` (B, 1, *spatial) holds integer labels 0..K (float or long), optionally ``ignore_label``.

Per foreground class c, with y = (target == c) and p = sigmoid(s_c):

- WBCE_c (eq. 8-9, code ``WeightedBCE``): the pixelwise BCE over the WHOLE batch (flattened, as the code does),
  averaged separately over the positive and over the negative pixels and mixed as
  w_pos * mean_pos(bce) + w_neg * mean_neg(bce). A class with no positive (negative) pixel in the batch
  contributes 0 for that half, which is what the code's ``/ (n + 1e-12)`` gives; here the count is clamped to 1
  instead (identical whenever the count is >= 1).
- WDice_c (eq. 10, code ``WeightedDiceLoss``): per sample b, with the weight map w = y * (w1 - w0) + w0,
  p' = w * p, t' = w * y: 1 - (2 sum p't' + smooth) / (sum p'^2 + sum t'^2 + smooth) (squared denominator, as in
  the code), then the mean over the batch (the paper's 1/N sum_i runs over the N samples of a batch).
- L = mean over the K classes of (bce_weight * WBCE_c + dice_weight * WDice_c) (eq. 11; K = 1 is the paper's case,
  more classes are the one-vs-rest extension).

Choices:

- ``class_weights`` = (w0, w1) is the code's ``weights`` list, used exactly as the code uses it. Note that the
  code is inconsistent between its two parts: WBCE gives weights[0] to the positives and weights[1] to the
  negatives, whereas WDice gives weights[1] to the target pixels and weights[0] to the background. With the
  published (0.5, 0.5) both maps are 0.5 everywhere and the question is moot; other values reproduce the code.
- Smooth: eq. 10 prints 1e-12, the code uses 1e-5 -> the code's value is the default. (Eq. 10 also prints the
  unsquared, unsummed form; the code's per-sample sums with squared denominator are used.)
- BCE from the logits (``F.binary_cross_entropy_with_logits``) instead of the code's sigmoid + ``F.binary_cross_
  entropy``: identical where the latter is finite, but numerically stable for saturated logits (the sigmoid rounds
  to 0 / 1 and torch clamps log to -100, which silences the gradient) and allowed under autocast.
- Ignore label: ignored pixels take part in neither part: they are excluded from the positive / negative counts
  and means of WBCE and from the Dice sums (their logits are replaced by 0 before anything is computed, so even
  non-finite values there cannot leak in, nor get a gradient). A sample whose pixels are all ignored gives
  dice = 1 - smooth / smooth = 0 and still counts in the batch mean.
- Computed in float32 with autocast disabled (safe under bf16 / fp16 mixed precision).
- Under DDP (``-num_gpus N``) the counts (positive / negative pixels, samples) are the whole batch's
  (``losses.distributed``), so the ranks' averaged gradient is the single-process one.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import batch_mean

__all__ = ["WeightedBCEDiceLoss"]


class WeightedBCEDiceLoss(nn.Module):
    """MPTPN's bce_weight * WBCE + dice_weight * WDice (eq. 11), averaged over the foreground classes.

    forward(logits (B, 1+K, *spatial) with channel 0 == 0, target (B, 1, *spatial) labels 0..K) -> scalar float32.
    See the module docstring for the formulas and the conventions.
    """

    def __init__(self, bce_weight: float = 0.5, dice_weight: float = 0.5,
                 class_weights: Sequence[float] = (0.5, 0.5), smooth: float = 1e-5,
                 ignore_label: int | None = None):
        super().__init__()
        class_weights = tuple(float(w) for w in class_weights)
        if len(class_weights) != 2:
            raise ValueError(f"class_weights must be two numbers (the code's weights[0], weights[1]), got "
                             f"{class_weights}")
        if not smooth > 0:  # > 0 keeps a sample without valid pixels at 0 / 0 -> here smooth / smooth
            raise ValueError(f"smooth must be > 0, got {smooth}")
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.class_weights = class_weights
        self.smooth = float(smooth)
        self.ignore_label = ignore_label

    def extra_repr(self) -> str:
        return (f"bce_weight={self.bce_weight}, dice_weight={self.dice_weight}, "
                f"class_weights={self.class_weights}, smooth={self.smooth}, ignore_label={self.ignore_label}")

    def _check(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.ndim not in (4, 5):
            raise ValueError(f"logits must be (B, 1+K, H, W) or (B, 1+K, D, H, W), got {tuple(logits.shape)}")
        if logits.shape[1] < 2:
            raise ValueError(f"logits need the fixed background channel 0 plus >= 1 foreground channel, got "
                             f"{logits.shape[1]} channel(s)")
        if (target.ndim != logits.ndim or target.shape[0] != logits.shape[0] or target.shape[1] != 1
                or target.shape[2:] != logits.shape[2:]):
            raise ValueError(f"target must be (B, 1, *spatial) = {(logits.shape[0], 1, *logits.shape[2:])} to "
                             f"match logits {tuple(logits.shape)}, got {tuple(target.shape)}")
        if target.dtype == torch.bool or target.is_complex():
            raise ValueError(f"target must hold integer labels (float or integer dtype), got {target.dtype}")
        if not torch.compiler.is_compiling() and bool(torch.count_nonzero(logits[:, 0].detach()) > 0):
            raise ValueError("logits channel 0 must be the fixed background (all zeros); channels 1..K hold the "
                             "sigmoid logits of the foreground classes")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check(logits, target)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._loss(logits, target)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1] - 1
        s = logits[:, 1:].float()  # (B, K, *spatial)
        labels = target.to(device=s.device)
        classes = torch.arange(1, k + 1, device=s.device, dtype=labels.dtype).view(1, k, *([1] * (s.ndim - 2)))
        y = labels == classes  # (B, K, *spatial), broadcast over the target's single channel
        if self.ignore_label is not None:
            valid = (labels != self.ignore_label).expand_as(s)
            y = y & valid
            s = torch.where(valid, s, torch.zeros((), dtype=s.dtype, device=s.device))
            pos, neg = y, valid & ~y
        else:
            valid = None
            pos, neg = y, ~y
        yf = y.float()
        w0, w1 = self.class_weights

        # WBCE: positive / negative means over the whole batch, per class
        bce = F.binary_cross_entropy_with_logits(s, yf, reduction="none")
        batch_dims = [0] + list(range(2, s.ndim))
        pos_f, neg_f = pos.float(), neg.float()
        # counted over the whole batch, also when DDP splits it over ranks (losses.distributed)
        wbce = (w0 * batch_mean((bce * pos_f).sum(batch_dims), pos_f.sum(batch_dims), 1.0)
                + w1 * batch_mean((bce * neg_f).sum(batch_dims), neg_f.sum(batch_dims), 1.0))  # (K,)

        # WDice: per sample and class, squared denominator, mean over the batch
        p = torch.sigmoid(s)
        if valid is not None:
            p = p * valid
        w = yf * (w1 - w0) + w0
        pw, tw = w * p, w * yf
        spatial = list(range(2, s.ndim))
        intersection = (pw * tw).sum(spatial)
        union = (pw * pw).sum(spatial) + (tw * tw).sum(spatial)
        wdice = batch_mean((1.0 - (2.0 * intersection + self.smooth) / (union + self.smooth)).sum(0),
                           float(s.shape[0]))  # (K,)

        return (self.bce_weight * wbce + self.dice_weight * wdice).mean()
