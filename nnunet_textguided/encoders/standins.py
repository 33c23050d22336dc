"""Real-size random-init stand-ins for encoder specs whose weights are not on this machine (``scripts/gpu_check``).

Why: a GPU check of speed and memory at the paper configurations needs the paper's encoders at their real sizes
(CoCa ViT-L/14, PMC-CLIP's ResNet-50, CLIP ViT-B/32 and ViT-L/14-336, DINOv2-base, BERT-base), but no weights
can be downloaded there. ``save_real_size_standin(spec, folder)`` builds the architecture ``spec`` names from its
config (the same configs ``structure.encoder_structure`` counts on the meta device), with random weights seeded
from the spec, saves it in the real on-disk format with the untrained marker, and returns the spec that loads it
(flagged untrained, so every model trained with it warns). Tokenizers: open_clip's bundled BPE for open_clip
models; for BERT-base (uncased) the WordPiece vocabulary bundled with MiniLM, which is bert-base-uncased's.

Timings and memory measured with stand-ins are those of the real encoders; captions of an untrained CoCa run to
the full ``seq_len`` (no end token is predicted), the upper bound of caption generation.
"""
from __future__ import annotations

import torch

from .base import EncoderSpecError, IMAGENET_MEAN, IMAGENET_STD, seeded, spec_seed
from .registry import mark_untrained, resolved_parts

__all__ = ["save_real_size_standin"]


def _open_clip(spec: str, kind: str, arg: str, opts: dict, device: str):
    import open_clip

    from .openclip import CocaEncoder, OpenClipEncoder, build_model
    if ":" in arg:
        raise EncoderSpecError(f"{spec!r}: a real-size stand-in needs an open_clip model name (e.g. "
                               f"'{kind}:ViT-B-32@openai'), not a folder or hub repository")
    name = arg.partition("@")[0].replace("/", "-")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise EncoderSpecError(f"{spec!r}: unknown open_clip model {name!r} (see open_clip.list_models())")
    with seeded(spec_seed(spec)), torch.device(device):
        model = build_model(cfg)
        if kind == "coca":  # open_clip leaves this torch.empty (tiny.py: init_parameters never runs)
            torch.nn.init.normal_(model.text_decoder.text_projection, std=cfg["embed_dim"] ** -0.5)
    tokenizer = open_clip.get_tokenizer(name)
    if kind == "coca":
        return CocaEncoder(spec, kind, model, tokenizer, cfg, untrained=True, generation=opts)
    return OpenClipEncoder(spec, kind, model, tokenizer, cfg, untrained=True)


def _pmcclip(spec: str, kind: str, device: str):
    from .pmcclip import PmcClipEncoder, build_visual, default_config
    cfg = default_config()
    with seeded(spec_seed(spec)), torch.device(device):
        visual = build_visual(cfg["model_cfg"])
    return PmcClipEncoder(spec, kind, cfg, untrained=True, visual=visual)


def _hf(spec: str, kind: str, arg: str, device: str):
    from transformers import AutoModel, BertTokenizerFast, BitImageProcessor

    from .hf import HFEncoder
    from .minilm import model_dir
    from .structure import DINOV2_CROP, known_hf_config
    cfg = known_hf_config(spec, arg)
    with seeded(spec_seed(spec)), torch.device(device):
        model = AutoModel.from_config(cfg)
    if not hasattr(cfg, "vocab_size"):  # DINOv2: the hub's processor (resize 256, centre crop 224, ImageNet stats)
        processor = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": DINOV2_CROP,
                                      "width": DINOV2_CROP}, do_center_crop=True, image_mean=list(IMAGENET_MEAN),
                                      image_std=list(IMAGENET_STD))
        return HFEncoder(spec, kind, model, processor=processor, untrained=True)
    tokenizer = BertTokenizerFast.from_pretrained(str(model_dir()), local_files_only=True,
                                                  model_max_length=cfg.max_position_embeddings)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise EncoderSpecError(f"{spec!r}: no offline tokenizer with its vocabulary ({cfg.vocab_size} entries); the "
                               "bundled one is bert-base-uncased's")
    return HFEncoder(spec, kind, model, tokenizer=tokenizer, untrained=True)


def save_real_size_standin(spec: str, directory, device: str = "cpu") -> str:
    """Build the encoder ``spec`` names at its real size with random weights (on ``device``: a GPU initialises a
    ViT-L in seconds), save it under ``directory`` with the untrained marker and return the spec that loads it
    (with ``spec``'s options, e.g. CoCa's generation settings)."""
    kind, arg, opts = resolved_parts(spec, strict=False)
    opts = {k: v for k, v in opts.items() if k != "random"}
    if kind in ("openclip", "coca"):
        encoder = _open_clip(spec, kind, arg, opts, device)
    elif kind == "pmcclip":
        encoder = _pmcclip(spec, kind, device)
    elif kind == "hf":
        encoder = _hf(spec, kind, arg, device)
    else:
        raise EncoderSpecError(f"{spec!r}: no real-size stand-in for kind {kind!r} (its weights are always here)")
    saved = mark_untrained(encoder.save(directory), spec, "real-size random-init stand-in (scripts/gpu_check)")
    query = spec.partition("?")[2]
    return saved + (f"?{query}" if query else "")
