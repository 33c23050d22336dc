"""Common base of all frozen pretrained encoders (image towers, text towers, captioners).

Why one base class: every method of the text-guided trainers (BiCLIP, CDPDNet, TGC-Net, MPTPN, RecLMIS)
needs a *frozen* pretrained model whose outputs feed trainable layers. The guarantees live here once:

* frozen: all parameters ``requires_grad=False``; ``train()`` is overridden so the module stays in eval mode
  (no dropout, BatchNorm running statistics never updated) whatever a parent module does;
* every encode method runs under ``torch.no_grad()`` - deliberately *not* ``torch.inference_mode()``,
  because inference tensors cannot be saved for backward by the trainable layers that consume them;
* batched: big inputs are chunked with ``batch_size``; device/dtype aware: inputs are moved to the encoder's
  device and dtype, outputs are float32 on the encoder's device;
* ``weight_hash()`` identifies the exact weights (used to key cached embeddings).

Subclasses implement the private hooks ``_encode_images(x)`` (preprocessed (n,3,S,S) -> (n,E)),
``_encode_texts(texts)`` -> (n,E), ``_token_states(texts, max_length)`` -> ((n,L,D), (n,L) bool) and
``_generate(x)`` -> list[str]; whatever a kind does not implement raises ``NotImplementedError`` naming it.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderSpecError(ValueError):
    """A spec string that cannot be turned into an encoder (unknown kind/option, missing directory/file...)."""


class EncoderUnavailableError(EncoderSpecError):
    """A valid spec whose weights are not here: a missing file or folder, or a hub model that is neither in the
    local cache nor reachable. The message says what is missing, where to get it and where to put it."""


def spec_seed(*parts) -> int:
    """Deterministic 63-bit seed from strings (tiny random-init models are seeded from their spec)."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:15], 16)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run random init with a fixed seed without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def hub_offline() -> Iterator[None]:
    """Set HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE=1 for the duration of a local load, restoring them after."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pad_states(states: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop or zero-pad (n, l, D) states and (n, l) mask along l to exactly ``length``."""
    n, l, d = states.shape
    if l >= length:
        return states[:, :length], mask[:, :length]
    return (torch.cat((states, states.new_zeros(n, length - l, d)), 1),
            torch.cat((mask, mask.new_zeros(n, length - l)), 1))


class FrozenEncoder(nn.Module):
    """A frozen pretrained model addressed by a spec string (see ``registry`` for the grammar).

    Attributes: ``spec`` (exact spec string), ``kind`` (registry kind), ``embed_dim`` (size E of the vectors of
    embed_images / embed_texts / embed_captions), ``token_dim`` (size D of token_states, None if unsupported),
    ``image_size`` (square input side S, None for text-only kinds), ``untrained`` (random init: tiny-* kinds),
    ``normalize`` (outputs L2-normalised: CLIP family, MiniLM).
    """

    kind: str = "?"
    normalize: bool = False

    def __init__(self, spec: str, kind: str, embed_dim: int, *, image_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 token_dim: int | None = None, untrained: bool = False, normalize: bool | None = None):
        super().__init__()
        self.spec, self.kind, self.embed_dim = spec, kind, int(embed_dim)
        self.image_size = None if image_size is None else int(image_size)
        self.token_dim = token_dim
        self.untrained = bool(untrained)
        if normalize is not None:
            self.normalize = normalize
        if mean is not None:
            self.register_buffer("_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), False)
            self.register_buffer("_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), False)
        self._hash: str | None = None

    # -- frozen / device ------------------------------------------------------------------------------------
    def freeze(self) -> "FrozenEncoder":
        """Called by the registry after construction: no grads, eval mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        """Always stays in eval mode (the encoder is frozen), whatever ``mode`` says."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        t = next(self.parameters(), None)
        return t.device if t is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        t = next((p for p in self.parameters() if p.is_floating_point()), None)
        return t.dtype if t is not None else torch.float32

    def weight_hash(self) -> str:
        """sha256 hex over the state dict (names, dtypes, shapes, tensor bytes; sorted by name), cached."""
        if self._hash is None:
            h = hashlib.sha256()
            for name, t in sorted(self.state_dict().items()):
                t = t.detach().cpu().contiguous().reshape(-1)
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.view(torch.uint8).numpy().tobytes())
            self._hash = h.hexdigest()
        return self._hash

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, kind={self.kind!r}, embed_dim={self.embed_dim}, untrained={self.untrained}"

    #: ``dense_tokens`` works (CLIP ViT image towers)
    supports_dense_tokens = False

    def _unsupported(self, what: str):
        raise NotImplementedError(f"encoder kind '{self.kind}' (spec {self.spec!r}) does not support {what}")

    # -- public API -----------------------------------------------------------------------------------------
    def preprocess_images(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1] -> (N, 3, S, S): bilinear resize, antialiased when shrinking (a 512² CT
        slice read at 224² without it aliases fine structure into moiré), + mean/std.

        A single-channel (N, 1, H, W) input is replicated to 3 channels. Runs in float32 on the encoder's
        device; the result is cast to the encoder's dtype.
        """
        if self.image_size is None:
            self._unsupported("images")
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{self.kind}: expected images (N, 3, H, W), got shape {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        s = self.image_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                              antialias=max(x.shape[-2:]) > s)
        x = (x - self._mean.float()) / self._std.float()
        return x.to(self.dtype)

    def embed_images(self, x01: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, E) float32 (L2-normalised for the CLIP family)."""
        if self.image_size is None:
            self._unsupported("embed_images (it has no image tower)")
        return self._batched_images(x01, batch_size, lambda xb: self._encode_images(self.preprocess_images(xb)))

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """list of N strings -> (N, E) float32 (L2-normalised for the CLIP family and MiniLM)."""
        texts = self._as_texts(texts)
        with torch.no_grad():
            outs = [self._post(self._encode_texts(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        return torch.cat(outs) if outs else torch.zeros(0, self.embed_dim, device=self.device)

    def token_states(self, texts: Sequence[str], max_length: int = 77, batch_size: int = 64
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """list of N strings -> per-token states (N, max_length, D) float32 and a (N, max_length) bool mask.

        Positions past a text's tokens (and past the model's own context length) are zero with mask False.
        """
        texts = self._as_texts(texts)
        states, masks = [], []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                s, m = self._token_states(texts[i:i + batch_size], max_length)
                s, m = pad_states(s.float(), m.bool(), max_length)
                states.append(s * m[..., None])
                masks.append(m)
        if not states:
            return (torch.zeros(0, max_length, self.token_dim or 0, device=self.device),
                    torch.zeros(0, max_length, dtype=torch.bool, device=self.device))
        return torch.cat(states), torch.cat(masks)

    #: the most tokens the text tower reads (special tokens included); None for image towers
    context_length: int | None = None

    def token_count(self, text: str) -> int:
        """Tokens of ``text`` before any truncation, special tokens included (``token_states`` keeps the first
        ``min(max_length, context_length)`` of them, its end token in the last kept position)."""
        self._unsupported("token_count")

    def generate_captions(self, x01: torch.Tensor, batch_size: int = 16) -> list[str]:
        """(N, 3, H, W) in [0, 1] -> N captions (captioning kinds only: coca, tiny-coca)."""
        self._unsupported("generate_captions (only coca / tiny-coca caption images)")

    def embed_captions(self, x01: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, E): text embedding of each image's generated caption."""
        self._unsupported("embed_captions (only coca / tiny-coca caption images)")

    def save(self, directory) -> str:
        """Save in the real on-disk format of this kind's loader; returns the spec that loads it."""
        self._unsupported("save")

    # -- hooks & helpers ------------------------------------------------------------------------------------
    def _encode_images(self, x: torch.Tensor) -> torch.Tensor:
        self._unsupported("images")

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        self._unsupported("embed_texts (it has no text tower)")

    def _token_states(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._unsupported("token_states")

    def _post(self, y: torch.Tensor) -> torch.Tensor:
        y = y.float()
        return F.normalize(y, dim=-1) if self.normalize else y

    def _as_texts(self, texts) -> list[str]:
        if isinstance(texts, str):
            raise TypeError(f"{self.kind}: pass a list of strings, not a single string")
        return [str(t) for t in texts]

    def _batched_images(self, x01: torch.Tensor, batch_size: int, fn: Callable) -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for i in range(0, x01.shape[0], batch_size):
                outs.append(self._post(fn(x01[i:i + batch_size])))
        return torch.cat(outs) if outs else torch.zeros(0, self.embed_dim, device=self.device)
