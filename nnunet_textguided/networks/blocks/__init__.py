"""Building blocks shared by the method networks (torch only)."""
from .adapters import SliceEmbeddingAdapter
from .attention import GlobalSelfAttentionBlock, RelativePositionBias3d

__all__ = ["SliceEmbeddingAdapter", "GlobalSelfAttentionBlock", "RelativePositionBias3d"]
