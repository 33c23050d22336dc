"""Building blocks shared by the method networks (torch only)."""
from .adapters import SliceEmbeddingAdapter
from .attention import (ConditionedAttention, DropPath, GlobalSelfAttentionBlock, RelativePositionBias3d,
                        conditioned_attention, masked_mean)
from .cost_aggregation import CostAggregationDecoder
from .deformable import DeformableEncoder, MSDeformAttn, ms_deform_attn_core
from .film import TextFiLM
from .lvit import ConvBNReLU, LViTEncoder, UpBlockPLAM
from .plam import PLAM
from .windows import CrossWindowBlock, GuidedWindowBlock, Mlp, WindowAttention, WindowedBlock

__all__ = ["SliceEmbeddingAdapter", "ConditionedAttention", "DropPath", "GlobalSelfAttentionBlock",
           "RelativePositionBias3d", "conditioned_attention", "masked_mean", "CostAggregationDecoder",
           "DeformableEncoder", "MSDeformAttn", "ms_deform_attn_core", "TextFiLM", "ConvBNReLU", "LViTEncoder", "UpBlockPLAM", "PLAM", "CrossWindowBlock",
           "GuidedWindowBlock", "Mlp", "WindowAttention", "WindowedBlock"]
