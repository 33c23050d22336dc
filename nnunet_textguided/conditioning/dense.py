"""Dense per-slice ViT features of the network's input patch (CDPDNet's DINOv2 branch), computed in forward.

The patch (B, C, S, H, W) is cut into its S slices along the first spatial axis (channel 0), each slice is
rendered exactly like BiCLIP's slices (``slices.render_slices``: fixed window from the plans -> [0, 1] -> 3
identical channels), resized to ``image_size`` (CDPDNet: 98 = 7 x 14, i.e. a 7 x 7 token grid) and run through
the frozen ViT; the token grids of its last blocks come back as (B, D, S, h, w), shallowest first. As with
every online conditioner, stock ``nnUNetv2_predict`` computes exactly what training computed for the same
patch (the features are a function of the patch only).
"""
from __future__ import annotations

import torch

from .slices import get_encoder, render_slices


class DenseSliceConditioner:
    """x -> (x, {"dino": [t_1, ..., t_k]}), t_i (B, D, S, h, w) from the last ``layers`` ViT blocks."""

    name = "dino"

    def __init__(self, spec: str, window: tuple[float, float], layers: int, image_size: int = 98,
                 normalize: bool = False, batch_size: int = 64):
        self.spec, self.window, self.layers = spec, tuple(window), int(layers)
        self.image_size, self.normalize, self.batch_size = int(image_size), bool(normalize), int(batch_size)

    def encoder(self, device="cpu"):
        return get_encoder(self.spec, device)

    def apply_to_encoders(self, fn) -> None:
        self.encoder()._apply(fn)

    def encoder_calls(self, x_shape) -> list[tuple[str, str, int, int]]:
        """(encoder spec, method, inputs, image side) of the frozen-encoder calls one forward on ``x_shape`` makes."""
        return [(self.spec, "hidden_grids", x_shape[0] * x_shape[2], self.image_size)]

    def grid(self, patch: int) -> int:
        return self.image_size // patch

    def placeholder(self, x: torch.Tensor, dims: dict[str, int], patch: int = 14):
        """What ``__call__`` returns, as zeros of the right shapes, without running the encoder (counting)."""
        g = self.grid(patch)
        b, s = x.shape[0], x.shape[2]
        return x, {self.name: [x.new_zeros(b, dims[self.spec], s, g, g) for _ in range(self.layers)]}

    def __call__(self, x: torch.Tensor):
        b, _, s = x.shape[:3]
        slices = render_slices(x[:, 0].reshape(b * s, *x.shape[3:]), self.window)
        grids = self.encoder(x.device).hidden_grids(slices, self.layers, self.image_size, self.normalize,
                                                    self.batch_size)
        out = [g.reshape(b, s, *g.shape[1:]).permute(0, 2, 1, 3, 4).contiguous() for g in grids]
        return x, {self.name: out}
