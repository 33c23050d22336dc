"""Text-conditioned FiLM: CDPDNet's alignment function f (seed 002, Sec. III-C4, Eq. 6).

All K projected text embeddings are flattened into one vector t (K*D); gamma = W1 t + b1 and
beta = W2 t + b2 give one scale and one shift per feature channel; out = gamma * F + beta. The weights are
Xavier-uniform initialised (the authors' ``Alignment``), the biases keep PyTorch's default unless
``gamma_bias`` is given: with ``gamma_bias=1`` the modulation starts near the identity (gamma = 1 + W1 t)
instead of near zero — the formula is unchanged, only b1's starting value.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["TextFiLM"]


class TextFiLM(nn.Module):
    """f(F, texts): (B, C, *spatial) features, (K, D) texts shared by the batch or (B, K, D) per sample
    -> (B, C, *spatial).

    Args:
        channels: C, feature channels modulated.
        num_texts: K, texts flattened together (32 organ names, 11 task prompts in the paper).
        text_dim: D, width of one projected text embedding (256 in the paper).

    Parameters: 2 * (K*D*C + C).
    """

    def __init__(self, channels: int, num_texts: int, text_dim: int, gamma_bias: float | None = None):
        super().__init__()
        self.channels, self.num_texts, self.text_dim = channels, num_texts, text_dim
        self.gamma = nn.Linear(num_texts * text_dim, channels)
        self.beta = nn.Linear(num_texts * text_dim, channels)
        nn.init.xavier_uniform_(self.gamma.weight)
        nn.init.xavier_uniform_(self.beta.weight)
        if gamma_bias is not None:
            nn.init.constant_(self.gamma.bias, gamma_bias)

    def forward(self, features: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.channels:
            raise ValueError(f"TextFiLM built for {self.channels} channels, got features {tuple(features.shape)}")
        if tuple(texts.shape[-2:]) != (self.num_texts, self.text_dim) or texts.ndim not in (2, 3):
            raise ValueError(f"TextFiLM expects texts ({self.num_texts}, {self.text_dim}) or "
                             f"(B, {self.num_texts}, {self.text_dim}), got {tuple(texts.shape)}")
        t = texts.reshape(-1 if texts.ndim == 3 else 1, self.num_texts * self.text_dim)
        view = (t.shape[0], self.channels) + (1,) * (features.ndim - 2)
        return self.gamma(t).reshape(view) * features + self.beta(t).reshape(view)
