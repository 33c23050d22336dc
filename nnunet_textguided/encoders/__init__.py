"""Frozen pretrained encoders (open_clip CLIP/CoCa, PMC-CLIP, HF text/vision, MiniLM, tiny test models).

Everything is addressed by spec strings; see ``registry`` for the grammar.
"""
from .base import EncoderSpecError, FrozenEncoder
from .registry import list_encoder_kinds, load_encoder, parse_spec, save_tiny_encoder

__all__ = ["load_encoder", "list_encoder_kinds", "parse_spec", "save_tiny_encoder", "FrozenEncoder",
           "EncoderSpecError"]
