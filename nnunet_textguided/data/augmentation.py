"""Image augmentations a paper names that nnU-Net's pipeline lacks, as batchgeneratorsv2 transforms (one
(C, *spatial) sample at a time, like nnU-Net's own), and the RecLMIS paper's pipeline built from them.

RecLMIS (seed 004, §IV-B): "we applied Gaussian blur with random sigma, contrast distortion, saturation
distortion, and hue distortion to augment the datasets". The ranges are not in the paper; they are the authors'
(tools/transform.py, Load_Dataset.py of ShawnHuang497/RecLMIS): blur p 0.5 with sigma 0.5-1 per axis, each
channel with p 0.5; contrast, saturation and hue each with p 0.5: contrast and saturation factors 0.5-1.5, hue
shifts up to 18 of OpenCV's 180 hue steps (36 degrees). The authors' code also shifts brightness and turns /
flips the image; the paper lists neither, and notes name sides, so neither is done here.

Saturation and hue act on colour (3-channel) images and leave a single-channel image as it is (a greyscale
X-ray has no colour to distort). They work on nnU-Net's normalised intensities: the grey level of a pixel is
the mean of its channels, saturation scales the distance from it, hue turns the colour about it (a rotation
about the (1, 1, 1) axis of RGB space, which is what a hue shift is for unit-weighted grey).
"""
from __future__ import annotations

import math

import torch
from batchgeneratorsv2.helpers.scalar_type import RandomScalar, sample_scalar
from batchgeneratorsv2.transforms.base.basic_transform import ImageOnlyTransform

__all__ = ["SaturationTransform", "HueTransform", "reclmis_paper_intensity_transforms"]


class SaturationTransform(ImageOnlyTransform):
    """x -> g + s (x - g) per pixel, g = the channel mean (grey), s drawn from ``saturation_range``."""

    def __init__(self, saturation_range: RandomScalar = (0.5, 1.5)):
        super().__init__()
        self.saturation_range = saturation_range

    def get_parameters(self, **data_dict) -> dict:
        return {"factor": sample_scalar(self.saturation_range)}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        if img.shape[0] != 3:
            return img
        grey = img.mean(0, keepdim=True)
        return grey + params["factor"] * (img - grey)


class HueTransform(ImageOnlyTransform):
    """Turns each pixel's colour by an angle drawn from ``max_degrees`` (symmetric) about the grey axis."""

    def __init__(self, max_degrees: float = 36.0):
        super().__init__()
        self.max_degrees = float(max_degrees)

    def get_parameters(self, **data_dict) -> dict:
        return {"angle": math.radians(float(torch.empty(1).uniform_(-self.max_degrees, self.max_degrees)))}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        if img.shape[0] != 3:
            return img
        # Rodrigues' rotation about the unit vector (1, 1, 1) / sqrt(3)
        c, s = math.cos(params["angle"]), math.sin(params["angle"])
        a, b = c + (1 - c) / 3, (1 - c) / 3 - s / math.sqrt(3)
        d = (1 - c) / 3 + s / math.sqrt(3)
        rotation = torch.tensor([[a, b, d], [d, a, b], [b, d, a]], dtype=img.dtype, device=img.device)
        return torch.einsum("ij,j...->i...", rotation, img)


def reclmis_paper_intensity_transforms() -> list:
    """The paper's blur, contrast, saturation and hue distortions with the authors' ranges and probabilities."""
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    return [
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5), apply_probability=0.5),
        RandomTransform(ContrastTransform(contrast_range=(0.5, 1.5), preserve_range=False, synchronize_channels=True,
                                          p_per_channel=1), apply_probability=0.5),
        RandomTransform(SaturationTransform((0.5, 1.5)), apply_probability=0.5),
        RandomTransform(HueTransform(36.0), apply_probability=0.5),
    ]
