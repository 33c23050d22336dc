"""Segmentation metrics reported by the five papers, on top of nnU-Net's Dice / IoU.

Per label (or region) :func:`binary_metrics` gives nnU-Net's ``Dice``, ``IoU``, ``TP``, ``FP``, ``FN``, ``TN``,
``n_pred``, ``n_ref`` (counted by nnU-Net's own ``compute_tp_fp_fn_tn``, so the values are nnU-Net's) plus
``HD95``, ``Precision``, ``Recall``, ``Accuracy`` (binary pixel accuracy) and ``IoU_fgbg`` (MPTPN's mIoU: the
mean of the foreground IoU and the background IoU). Voxels under the ignore mask count nowhere.

HD95 is MONAI's ``compute_hausdorff_distance(percentile=95)`` in the units of the spacing (mm): the *larger of
the two directed* 95th-percentile surface distances (pred->ref and ref->pred). MedPy's ``hd95`` instead takes
the 95th percentile of the pooled distances of both directions, so the two can differ on the same masks.
Axes with a single voxel are dropped first: a 2D image read by nnU-Net has a dummy first axis with a
placeholder spacing (999 x the largest in-plane spacing) that must not enter distances nor the penalty below.

Empty masks ("empty" = no voxel outside the ignore mask):

=====================  ==========  =========  ======  ==============  ========  =========================
case                   Dice, IoU   Precision  Recall  HD95            Accuracy  IoU_fgbg
=====================  ==========  =========  ======  ==============  ========  =========================
ref and pred empty     NaN         NaN        NaN     NaN             defined   IoU_bg (= 1)
ref empty, pred not    0           0          NaN     image diagonal  defined   (0 + IoU_bg) / 2
ref not, pred empty    0           NaN        0       image diagonal  defined   (0 + IoU_bg) / 2
=====================  ==========  =========  ======  ==============  ========  =========================

NaN means "nothing to measure": like nnU-Net's Dice it is left out of the (nan)means over cases. Each failure
mode is penalised by exactly one of precision / recall (a hallucinated structure by precision, a missed one by
recall) instead of both. A missed or hallucinated structure gets the worst finite HD95, the image diagonal in
physical units ``sqrt(sum((shape_i * spacing_i) ** 2))``, so it can never improve an average distance.
``IoU_fgbg`` is the nan-safe mean of IoU_fg and IoU_bg: whichever of the two is undefined is left out
(IoU_bg is undefined only when foreground fills every non-ignored voxel in both masks).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask

__all__ = ["binary_metrics", "case_metrics", "hd95", "nanmean"]


def nanmean(values) -> float:
    """``np.nanmean`` (the exact value nnU-Net computes) without the all-NaN RuntimeWarning; all NaN -> NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(np.asarray(values, dtype=float)))


def _ratio(num, den) -> float:
    return float(num / den) if den > 0 else float("nan")


def hd95(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> float:
    """MONAI's symmetric HD95 of two boolean masks, with the empty-mask conventions of the module docstring."""
    keep = [i for i, n in enumerate(ref.shape) if n > 1] or [0]
    shape = [ref.shape[i] for i in keep]
    spacing = [float(spacing[i]) for i in keep]
    if not ref.any() and not pred.any():
        return float("nan")
    if not ref.any() or not pred.any():
        return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))
    # imported here: importing monai takes seconds, and only HD95 needs it
    import torch
    from monai.metrics import compute_hausdorff_distance

    def as_batch(mask):  # (batch, channel, *spatial), one channel = the foreground
        return torch.from_numpy(np.ascontiguousarray(mask.reshape(shape)))[None, None]

    with warnings.catch_warnings():  # raised by MONAI's own internal call, nothing the caller can change
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        distance = compute_hausdorff_distance(as_batch(pred), as_batch(ref), include_background=True,
                                              percentile=95, spacing=spacing)
    return float(distance[0, 0])


def binary_metrics(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                   ignore: np.ndarray | None = None) -> dict:
    """Metrics of one boolean mask pair; ``spacing`` in array axis order. Conventions: module docstring."""
    if len(spacing) != ref.ndim or ref.shape != pred.shape:
        raise ValueError(f"masks of shapes {ref.shape} and {pred.shape} with spacing {tuple(spacing)}: "
                         "need equal shapes and one spacing value per axis")
    tp, fp, fn, tn = (int(v) for v in compute_tp_fp_fn_tn(ref, pred, ignore))
    iou = _ratio(tp, tp + fp + fn)
    iou_bg = _ratio(tn, tn + fp + fn)
    if ignore is not None:
        ref, pred = ref & ~ignore, pred & ~ignore
    return {
        "Dice": _ratio(2 * tp, 2 * tp + fp + fn), "IoU": iou,
        "FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": fp + tp, "n_ref": fn + tp,
        "HD95": hd95(ref, pred, spacing),
        "Precision": _ratio(tp, tp + fp), "Recall": _ratio(tp, tp + fn),
        "Accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "IoU_fgbg": nanmean([iou, iou_bg]),
    }


def case_metrics(seg_ref: np.ndarray, seg_pred: np.ndarray, labels_or_regions, spacing: Sequence[float],
                 ignore_label: int | None = None) -> tuple[dict, dict]:
    """Per label/region metrics and case-level metrics of one label map pair (spatial arrays, no channel axis).

    Returns ``(metrics, case_level)``: ``metrics`` is shaped like nnU-Net's ``compute_metrics(...)['metrics']``
    (``{label_or_region: {metric: value}}``); ``case_level`` has

    * ``Accuracy``: multi-class pixel accuracy, the fraction of non-ignored voxels whose predicted label equals
      the reference label. Overlapping regions (any region of more than one label) give a voxel no single
      label, so for region-based label sets it is the mean of the per-region binary accuracies instead;
    * ``mIoU``: nanmean over the foreground labels/regions (all but 0) of IoU (per-class mean IoU);
    * ``mIoU_fgbg``: nanmean over the same of ``IoU_fgbg`` (MPTPN's foreground/background mean IoU).
    """
    ignore = seg_ref == ignore_label if ignore_label is not None else None
    metrics = {r: binary_metrics(region_or_label_to_mask(seg_ref, r), region_or_label_to_mask(seg_pred, r),
                                 spacing, ignore) for r in labels_or_regions}
    if any(not np.isscalar(r) and len(r) > 1 for r in labels_or_regions):
        accuracy = nanmean([m["Accuracy"] for m in metrics.values()])
    else:
        valid = np.ones(seg_ref.shape, dtype=bool) if ignore is None else ~ignore
        accuracy = _ratio(np.sum((seg_ref == seg_pred) & valid), np.sum(valid))
    foreground = [m for r, m in metrics.items() if r != 0]
    return metrics, {"Accuracy": accuracy, "mIoU": nanmean([m["IoU"] for m in foreground]),
                     "mIoU_fgbg": nanmean([m["IoU_fgbg"] for m in foreground])}
