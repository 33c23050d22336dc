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

__all__ = ["world_size", "global_sum", "batch_mean", "gather_batch", "average_gradients", "broadcast_module"]


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


class _GatherWithGradient(torch.autograd.Function):
    """All ranks' (B_r, ...) tensors -> their concatenation on every rank; the backward sums each rank's
    gradient of the concatenation and hands every rank its own rows (all-reduce: every backend has it)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def gather_batch(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The whole batch of every tensor (B_r, ...) of this rank's share, concatenated in rank order (ranks may
    hold different shares), differentiable: a loss that compares samples with each other (in-batch contrastive
    losses) sees the batch one process would see. Every rank computes that whole-batch loss; the gathered
    gradients reach each rank's own samples summed over the ranks, which DDP's average divides out again. The
    tensors themselves outside DDP. Boolean tensors are gathered without gradient."""
    if world_size() == 1:
        return tensors
    sizes = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    sizes = tuple(int(s) for s in all_sizes)
    out = []
    for t in tensors:
        if t.dtype == torch.bool:
            out.append(_GatherWithGradient.apply(t.to(torch.uint8), sizes).to(torch.bool))
        else:
            out.append(_GatherWithGradient.apply(t, sizes))
    return tuple(out)


def average_gradients(parameters) -> None:
    """DDP's gradient average for parameters outside a DistributedDataParallel module (RecLMIS's training-only
    modules): one all-reduce of all present gradients, divided by the number of ranks. Parameters without a
    gradient are left without one (the same ones on every rank: the modules run the same code). No-op outside
    DDP."""
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a module): modules trained
    beside a DDP network start from the same weights everywhere. No-op outside DDP."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
