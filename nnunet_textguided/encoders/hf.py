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
            self.max_length = int(min(v for v in limits if v))
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

    def _encode_images(self, x):
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

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
