"""Means over the whole batch when the batch is split over DDP ranks (``nnUNetv2_train -num_gpus N``).

Each rank holds its share of the batch and DDP averages the ranks' gradients. A loss that divides by a count
taken over the batch (the pixels of a class, the annotated (sample, label) pairs, the samples) is exactly the
single-process loss only if the count is the whole batch's: each rank divides its own sum by the global count
and multiplies by the number of ranks, which DDP's average divides out again (nnU-Net's batch Dice gathers its
statistics for the same reason). Outside DDP this is the plain mean.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["world_size", "global_sum", "batch_mean"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sum(count: torch.Tensor) -> torch.Tensor:
    """``count`` summed over the ranks (detached: counts carry no gradient); ``count`` itself outside DDP. Every
    rank must call it the same number of times."""
    if world_size() == 1:
        return count
    total = count.detach().clone()
    dist.all_reduce(total)
    return total


def batch_mean(local_sum: torch.Tensor, local_count: torch.Tensor, min_count: float = 0.0) -> torch.Tensor:
    """The mean over the whole (all ranks') batch of the quantity whose sum over this rank's share is
    ``local_sum`` and whose number of terms there is ``local_count``; the global count is clamped to
    ``min_count``."""
    count = global_sum(torch.as_tensor(local_count, dtype=torch.float32, device=local_sum.device))
    return local_sum / count.clamp_min(min_count) * world_size()
