"""nnunet-textguided: text- and CLIP-guided segmentation trainers for nnU-Net v2."""
__version__ = "0.1.0"
