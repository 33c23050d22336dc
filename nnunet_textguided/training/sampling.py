"""Weighted case sampling for nnU-Net's training data loader.

nnU-Net's ``nnUNetDataLoader`` draws each sample's case with ``np.random.choice(identifiers, p=sampling_probabilities)``
(batchgenerators' ``DataLoader.get_indices``), but ``nnUNetTrainer.get_dataloaders`` (2.8.1) always passes
``None`` (uniform over cases) and starts the augmentation workers before it returns, so the probabilities cannot
be set afterwards. ``dataloaders_with_sampling`` runs nnU-Net's own ``get_dataloaders`` with the training loader
built with the given probabilities; everything else (patch sampling, foreground oversampling within the drawn
case, augmentation, the validation loader) stays nnU-Net's.
"""
from __future__ import annotations

import sys
from collections import Counter
from typing import Callable

import numpy as np
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def group_balanced_probabilities(identifiers: list[str], group_of: Callable[[str], str]) -> np.ndarray:
    """Each group (e.g. source dataset) drawn with equal probability, then a case of it uniformly: case c of group
    g gets 1 / (number of groups x size of g)."""
    groups = [group_of(c) for c in identifiers]
    sizes = Counter(groups)
    p = np.array([1.0 / (len(sizes) * sizes[g]) for g in groups])
    return p / p.sum()


def describe_probabilities(identifiers: list[str], group_of: Callable[[str], str], p: np.ndarray) -> list[str]:
    """One line per group: its cases, its share of the draws and each case's probability against uniform."""
    share, count = Counter(), Counter()
    for c, q in zip(identifiers, p):
        share[group_of(c)] += float(q)
        count[group_of(c)] += 1
    n = len(identifiers)
    return [f"{g}: {count[g]} cases, {100 * share[g]:.1f}% of the draws (uniform over cases: {100 * count[g] / n:.1f}%)"
            for g in sorted(share)]


def dataloaders_with_sampling(get_dataloaders: Callable[[], tuple], probabilities: Callable[[list[str]], np.ndarray]):
    """``get_dataloaders()`` (nnU-Net's, bound to the trainer) with the training loader drawing cases with
    ``probabilities(identifiers)``. nnU-Net builds the training loader first, then the validation loader (kept
    uniform); the loader class is swapped in nnU-Net's trainer module for the duration of the call only."""
    module = sys.modules[nnUNetTrainer.__module__]
    loader_class = module.nnUNetDataLoader
    built = []

    def training_loader_with_probabilities(data, *args, **kwargs):
        if not built:
            kwargs["sampling_probabilities"] = probabilities(list(data.identifiers))
        loader = loader_class(data, *args, **kwargs)
        built.append(loader)
        return loader

    module.nnUNetDataLoader = training_loader_with_probabilities
    try:
        return get_dataloaders()
    finally:
        module.nnUNetDataLoader = loader_class
