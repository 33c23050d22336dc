"""Networks whose forward needs conditioning computed outside the network (frozen encoders, tables).

A *conditioner* is any callable ``x -> (x_image, {name: tensor})``: it takes the tensor the network is
called with (what nnU-Net's trainer and sliding-window predictor hand over) and returns the image part plus
the conditioning tensors. It is deliberately **not** a registered submodule: frozen encoders must not appear
in ``state_dict()`` (checkpoints), ``parameters()`` (optimizer, grad clipping) or be moved by ``train()``.
``_apply`` forwards device/dtype moves to it so ``network.to(device)`` still moves the encoders.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn


class Conditioner(Protocol):
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class ConditionedNetwork(nn.Module):
    """Base class holding an unregistered conditioner."""

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "_conditioner", None)

    @property
    def conditioner(self):
        return self._conditioner

    def set_conditioner(self, conditioner: Conditioner | None) -> None:
        object.__setattr__(self, "_conditioner", conditioner)

    def _apply(self, fn: Callable, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        to = getattr(self._conditioner, "apply_to_encoders", None)
        if to is not None:
            to(fn)
        return self

    @torch.compiler.disable
    def condition(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The conditioner runs outside torch.compile (nnU-Net compiles the network on GPUs): frozen encoders and
        caption generation are never traced, and table lookups (data-dependent indexing) do not break the graph
        of the trainable part; the trainable part after it compiles as one graph.

        It also runs outside autocast: frozen encoders compute in their weights' dtype (float32 as loaded), so
        online conditioning under mixed precision equals the embeddings the store computed without it; the
        trainable network then runs under the caller's autocast as usual."""
        if self._conditioner is None:
            raise RuntimeError(f"{type(self).__name__} needs a conditioner (set_conditioner) before forward; "
                               "build it through its trainer's build_network_architecture")
        device = x.device.type
        if device != "meta" and torch.is_autocast_enabled(device):  # (meta: counting; autocast has no meta)
            with torch.autocast(device, enabled=False):
                return self._conditioner(x)
        return self._conditioner(x)
