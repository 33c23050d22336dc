"""Hugging Face transformers encoders (kind ``hf``): one text *or* vision tower via ``AutoModel``.

Why: several methods condition on plain language models (BERT-family, mean-pooled) or self-supervised
vision backbones (DINOv2, pooled CLS output) rather than CLIP. The spec is ``hf:<hub-name-or-dir>``; a
directory must come from ``save_pretrained`` (model + tokenizer or image processor) and is loaded with
``local_files_only=True``, so it never touches the hub. Text vs vision is decided from the config: a
``vocab_size`` means text (AutoTokenizer), ``num_channels`` without it means vision (AutoImageProcessor for
mean/std/input size). Composite configs (CLIP, SigLIP... with text_config/vision_config) are refused: load
those through ``openclip:``.

Outputs: text -> mean of the last hidden state over the attention mask (E = hidden_size, not normalised;
MiniLM subclasses this with L2 normalisation); vision -> ``pooler_output`` (DINOv2: layer-normed CLS) or the
first token of the last hidden state. Images are squashed to the processor's crop size (or size), not
resized-then-cropped, so the whole slice is seen.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .base import IMAGENET_MEAN, IMAGENET_STD, EncoderSpecError, FrozenEncoder

EXAMPLE = "hf:/path/to/save_pretrained_dir"


def _processor_geometry(proc, config) -> tuple[int, list, list]:
    mean = list(getattr(proc, "image_mean", None) or IMAGENET_MEAN)
    std = list(getattr(proc, "image_std", None) or IMAGENET_STD)
    crop, size = getattr(proc, "crop_size", None) or {}, getattr(proc, "size", None) or {}
    if getattr(proc, "do_center_crop", False) and crop.get("height"):
        side = crop["height"]
    else:
        side = size.get("height") or size.get("shortest_edge") or getattr(config, "image_size", 224)
    return int(side), mean, std


class HFEncoder(FrozenEncoder):
    """transformers text model (embed_texts, token_states) or vision model (embed_images)."""

    def __init__(self, spec: str, kind: str, model, *, tokenizer=None, processor=None, max_length: int | None = None,
                 normalize: bool = False, untrained: bool = False):
        cfg, hidden = model.config, model.config.hidden_size
        if tokenizer is not None:
            super().__init__(spec, kind, hidden, token_dim=hidden, untrained=untrained, normalize=normalize)
            limits = [tokenizer.model_max_length, getattr(cfg, "max_position_embeddings", None), max_length]
            self.max_length = self.context_length = int(min(v for v in limits if v))
        else:
            side, mean, std = _processor_geometry(processor, cfg)
            super().__init__(spec, kind, hidden, image_size=side, mean=mean, std=std, untrained=untrained,
                             normalize=normalize)
        self.model, self.tokenizer, self.processor = model, tokenizer, processor

    def _run_text(self, texts, **kw):
        enc = self.tokenizer(texts, truncation=True, return_tensors="pt", **kw).to(self.device)
        return self.model(**enc).last_hidden_state, enc["attention_mask"]

    def _encode_texts(self, texts):
        if self.tokenizer is None:
            self._unsupported("embed_texts (it is a vision model)")
        h, m = self._run_text(texts, padding=True, max_length=self.max_length)
        m = m[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)

    def _token_states(self, texts, max_length):
        if self.tokenizer is None:
            self._unsupported("token_states (it is a vision model)")
        return self._run_text(texts, padding="max_length", max_length=min(max_length, self.max_length))

    def token_count(self, text: str) -> int:
        if self.tokenizer is None:
            self._unsupported("token_count (it is a vision model)")
        return len(self.tokenizer(text, truncation=False, verbose=False)["input_ids"])

    def _encode_images(self, x):
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def hidden_grids(self, x01: torch.Tensor, layers: int, image_size: int | None = None, normalize: bool = True,
                     batch_size: int = 64) -> list[torch.Tensor]:
        """Dense features of a ViT (DINOv2): (N, 3, H, W) in [0, 1] -> ``layers`` tensors (N, D, h, w).

        The token grids of the hidden states of the last ``layers`` blocks (before the final LayerNorm),
        shallowest first, with the CLS (and register) tokens dropped. Images are resized (bilinear) to
        ``image_size`` (default: the model's input side; DINOv2 interpolates its position embeddings), and
        mean/std-normalised only if ``normalize`` (CDPDNet feeds [0, 1] slices without normalisation).
        """
        if self.image_size is None or not hasattr(self.model.config, "patch_size"):
            self._unsupported("hidden_grids (it is not a vision transformer)")
        if x01.ndim != 4 or x01.shape[1] != 3:
            raise ValueError(f"{self.kind}: expected images (N, 3, H, W), got shape {tuple(x01.shape)}")
        cfg = self.model.config
        total = cfg.num_hidden_layers
        if not 1 <= layers <= total:
            raise ValueError(f"encoder {self.spec!r} has {total} blocks; cannot take the last {layers}")
        side = int(image_size or self.image_size)
        patch = int(cfg.patch_size)
        if side % patch:
            raise ValueError(f"image_size {side} is not a multiple of the patch size {patch} of {self.spec!r}")
        g = side // patch
        special = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        outs: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        with torch.no_grad():
            for i in range(0, x01.shape[0], batch_size):
                x = x01[i:i + batch_size].to(self.device, torch.float32)
                x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False,
                                  antialias=max(x.shape[-2:]) > side)  # antialiased when shrinking
                if normalize:
                    x = (x - self._mean.float()) / self._std.float()
                hs = self.model(pixel_values=x.to(self.dtype), output_hidden_states=True).hidden_states
                for j, h in enumerate(hs[-layers:]):
                    t = h[:, special:].float()
                    outs[j].append(t.reshape(t.shape[0], g, g, -1).permute(0, 3, 1, 2))
        return [torch.cat(o) for o in outs]

    def save(self, directory) -> str:
        """``save_pretrained`` model + tokenizer/image processor; returns ``hf:<dir>``."""
        d = Path(directory).expanduser().resolve()
        self.model.save_pretrained(d)
        (self.tokenizer or self.processor).save_pretrained(d)
        return f"hf:{d}"


def load(spec: str, kind: str, arg: str, opts: dict) -> HFEncoder:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer
    p = Path(arg).expanduser()
    if p.exists() or arg.startswith(("/", ".", "~")):
        if not p.is_dir():
            raise EncoderSpecError(f"encoder spec {spec!r}: directory {str(p)!r} not found (an hf: path must be a "
                                   f"save_pretrained directory); e.g. {EXAMPLE!r} or 'hf:facebook/dinov2-base'")
        if not (p / "config.json").is_file():
            raise EncoderSpecError(f"encoder spec {spec!r}: no config.json in {str(p)!r} (not a save_pretrained dir)")
        src, local = str(p), True
    else:
        src, local = arg, False
    cfg = AutoConfig.from_pretrained(src, local_files_only=local)
    if getattr(cfg, "text_config", None) is not None or getattr(cfg, "vision_config", None) is not None:
        raise EncoderSpecError(f"encoder spec {spec!r}: {cfg.model_type} is a composite text+vision model; "
                               "load CLIP-style models with 'openclip:' (e.g. openclip:hf-hub:org/repo)")
    model = AutoModel.from_pretrained(src, local_files_only=local)
    if hasattr(cfg, "vocab_size"):
        return HFEncoder(spec, kind, model, tokenizer=AutoTokenizer.from_pretrained(src, local_files_only=local))
    if hasattr(cfg, "num_channels"):
        try:
            proc = AutoImageProcessor.from_pretrained(src, local_files_only=local, use_fast=False)
        except (OSError, ValueError):
            proc = None  # no preprocessor_config.json: config.image_size + ImageNet mean/std
        return HFEncoder(spec, kind, model, processor=proc)
    raise EncoderSpecError(f"encoder spec {spec!r}: cannot tell whether {cfg.model_type!r} is a text or vision model")
