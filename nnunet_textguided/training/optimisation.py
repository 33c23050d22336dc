"""Optimiser and learning-rate schedule from a method's settings (``optimizer``, ``lr``, ``momentum``,
``weight_decay``, ``lr_schedule``, ``warmup_epochs``).

``sgd`` + ``poly`` without warm-up is exactly nnU-Net's ``configure_optimizers`` (SGD, Nesterov, PolyLRScheduler);
the schedule is stepped like nnU-Net's (``step(current_epoch)`` at the start of each epoch).
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import _LRScheduler


def build_optimizer(params, settings) -> torch.optim.Optimizer:
    s = settings
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, s.lr, weight_decay=s.weight_decay, momentum=s.momentum, nesterov=True)
    cls = torch.optim.Adam if s.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=s.lr, betas=(s.momentum, 0.999), weight_decay=s.weight_decay)


class EpochLRScheduler(_LRScheduler):
    """Linear warm-up over ``warmup`` epochs (epoch e: lr (e + 1) / warmup), then ``poly`` (nnU-Net's
    lr (1 - t)^0.9) or ``cosine`` (0.5 lr (1 + cos(pi t))) over the remaining epochs, t in [0, 1]."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, kind: str = "poly", warmup: int = 0,
                 exponent: float = 0.9):
        self.initial_lr, self.max_steps, self.kind = initial_lr, max(int(max_steps), 1), kind
        self.warmup, self.exponent, self.ctr = min(int(warmup), max(int(max_steps) - 1, 0)), exponent, 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.initial_lr * (step + 1) / self.warmup
        span = self.max_steps - self.warmup
        t = min(max(step - self.warmup, 0), span) / span
        if self.kind == "cosine":
            return 0.5 * self.initial_lr * (1 + math.cos(math.pi * t))
        return self.initial_lr * (1 - t) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step, self.ctr = self.ctr, self.ctr + 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)

    def get_last_lr(self):
        return self._last_lr


def build_optimizer_and_schedule(params, settings, num_epochs: int):
    optimizer = build_optimizer(params, settings)
    return optimizer, EpochLRScheduler(optimizer, settings.lr, num_epochs, settings.lr_schedule,
                                       settings.warmup_epochs)
