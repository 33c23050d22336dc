"""Dense ViT features of the network's input, computed in forward: per-slice DINOv2 features of a 3D patch
(CDPDNet) and CLIP dense tokens of a 2D image beside its notes (TGC-Net).

CDPDNet: the patch (B, C, S, H, W) is cut into its S slices along the first spatial axis (channel 0), each slice is
rendered exactly like BiCLIP's slices (``slices.render_slices``: fixed window from the plans -> [0, 1] -> 3
identical channels), resized to ``image_size`` (CDPDNet: 98 = 7 x 14, i.e. a 7 x 7 token grid) and run through
the frozen ViT; the token grids of its last blocks come back as (B, D, S, h, w), shallowest first. As with
every online conditioner, stock ``nnUNetv2_predict`` computes exactly what training computed for the same
patch (the features are a function of the patch only).
"""
from __future__ import annotations

import torch

from .notes import NoteConditioner
from .slices import get_encoder, render_slices, unit_window


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


def render_image(x: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """(B, C, H, W) normalised 2D images -> (B, 3, H, W) in [0, 1] for a CLIP image tower: each of the first three
    channels through the fixed window (RGB data stays RGB); fewer than three channels: channel 0, replicated."""
    return unit_window(x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1), window)


class NoteImageConditioner(NoteConditioner):
    """Notes (``NoteConditioner``) plus the frozen CLIP image tower's dense tokens of the network's input, computed
    in forward: x -> (x, {notes..., "image_tokens": (B, E, g, g)}). The tokens are a function of the input patch
    only, so sliding-window prediction computes exactly what training computed for the same patch."""

    def __init__(self, spec: str, max_tokens: int, token_dim: int, image_spec: str, window: tuple[float, float],
                 grid: int, aux: bool = False, batch_size: int = 64):
        super().__init__(spec, max_tokens, token_dim, aux)
        self.image_spec, self.window, self.grid, self.batch_size = image_spec, tuple(window), int(grid), batch_size

    def apply_to_encoders(self, fn) -> None:
        get_encoder(self.image_spec)._apply(fn)

    def encoder_calls(self, x_shape) -> list:
        return [(self.image_spec, "dense_tokens", x_shape[0])]

    def placeholder(self, x: torch.Tensor, dims: dict[str, int]):
        x, cond = super().placeholder(x, dims)
        return x, {**cond, "image_tokens": x.new_zeros(x.shape[0], dims[self.image_spec], self.grid, self.grid)}

    def __call__(self, x: torch.Tensor):
        x, cond = super().__call__(x)
        tokens = get_encoder(self.image_spec, x.device).dense_tokens(render_image(x, self.window), self.batch_size)
        return x, {**cond, "image_tokens": tokens.to(x.dtype)}
