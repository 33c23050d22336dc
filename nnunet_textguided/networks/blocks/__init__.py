"""Building blocks shared by the method networks (torch only)."""
from .adapters import SliceEmbeddingAdapter
from .attention import DropPath, GlobalSelfAttentionBlock, RelativePositionBias3d

__all__ = ["SliceEmbeddingAdapter", "DropPath", "GlobalSelfAttentionBlock", "RelativePositionBias3d"]
