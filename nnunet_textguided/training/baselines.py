"""nnU-Net's own trainer on the package's short CPU schedule, as a vision-only reference in tests and demos.

Not a text-guided method (it is not listed by ``nnunet-textguided list``); exported through trainers/ so that
``nnUNetv2_train ... -tr nnUNetTrainer_2epochs`` finds it. nnU-Net ships ``nnUNetTrainer_1epoch`` / ``_5epochs``
with 250 iterations per epoch; this one runs the ``_2epochs`` schedule of the package's trainers (2 epochs of
4 iterations, 2 validation iterations).
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_2epochs(nnUNetTrainer):
    """nnU-Net's trainer, 2 epochs x 4 iterations (the package's _2epochs schedule)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 4, 2


__all__ = ["nnUNetTrainer_2epochs"]
