"""`nnUNetv2_predict_textguided`: nnUNetv2_predict with whole-case conditioning.

Same flags as nnUNetv2_predict. For models whose conditioning needs the whole case (BiCLIP paper mode:
embeddings of every full slice), each case's conditioning is computed from its preprocessed data exactly as
the embedding store computed it for training, and positional channels are appended so nnU-Net's sliding
window and test-time mirroring hand every patch the embeddings of its source slices. For all other models
it predicts exactly like nnUNetv2_predict.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from ..conditioning.slices import TableSliceConditioner
from ..data.position_channels import append_position_channels


def _conditioner(network):
    net = getattr(network, "_orig_mod", network)
    return getattr(net, "conditioner", None)


class TextGuidedPredictor(nnUNetPredictor):
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        cond = _conditioner(self.network)
        if isinstance(cond, TableSliceConditioner):
            data = torch.as_tensor(np.asarray(data)) if not torch.is_tensor(data) else data
            cond.set_tables({0: cond.compute_tables(data, device=self.device)})
            data = append_position_channels(data, 0)
        return super().predict_logits_from_preprocessed_data(data)


def main() -> None:
    # nnU-Net's own entry point and argument parser, with this predictor class in place of nnUNetPredictor
    # (changed in this process only), so every flag behaves exactly as in nnUNetv2_predict.
    import nnunetv2.inference.predict_from_raw_data as stock
    stock.nnUNetPredictor = TextGuidedPredictor
    sys.argv[0] = "nnUNetv2_predict_textguided"
    stock.predict_entry_point()


if __name__ == "__main__":
    main()
