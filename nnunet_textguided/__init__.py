"""nnunet-textguided: text- and CLIP-guided segmentation trainers for nnU-Net v2."""
__version__ = "0.1.0"

import warnings

# timm (imported by open_clip, and by nnU-Net's trainer search through dynamic_network_architectures) decorates a
# model with torch.jit.interface, which torch 2.14 deprecates: a warning at every import that is neither ours nor
# the user's to act on, and would stand above every one-line error. Set here, before any of those imports.
warnings.filterwarnings("ignore", message="`torch.jit.interface` is deprecated", category=FutureWarning)
