"""Building blocks shared by the method networks (torch only)."""
from .adapters import SliceEmbeddingAdapter
from .attention import DropPath, GlobalSelfAttentionBlock, RelativePositionBias3d
from .film import TextFiLM
from .plam import PLAM
from .windows import CrossWindowBlock, Mlp, WindowAttention, WindowedBlock

__all__ = ["SliceEmbeddingAdapter", "DropPath", "GlobalSelfAttentionBlock", "RelativePositionBias3d", "TextFiLM",
           "PLAM", "CrossWindowBlock", "Mlp", "WindowAttention", "WindowedBlock"]
