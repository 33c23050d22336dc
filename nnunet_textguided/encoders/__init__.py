"""Frozen pretrained encoders (open_clip CLIP/CoCa, PMC-CLIP, HF text/vision, MiniLM, tiny test models).

Everything is addressed by spec strings; see ``registry`` for the grammar.
"""
import warnings

# timm (imported by open_clip) decorates a model with torch.jit.interface, which torch 2.14 deprecates: a warning
# at every import that is neither ours nor the user's to act on, and would stand above every one-line error
warnings.filterwarnings("ignore", message="`torch.jit.interface` is deprecated", category=FutureWarning)
from .base import EncoderSpecError, FrozenEncoder
from .registry import list_encoder_kinds, load_encoder, parse_spec, save_tiny_encoder

__all__ = ["load_encoder", "list_encoder_kinds", "parse_spec", "save_tiny_encoder", "FrozenEncoder",
           "EncoderSpecError"]
