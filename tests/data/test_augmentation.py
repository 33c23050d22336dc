"""RecLMIS's paper augmentation: saturation / hue distortions on colour images (greyscale untouched), and the
pipeline the trainer builds: nnU-Net's crop without rotation or scaling, the paper's four distortions instead of
nnU-Net's intensity transforms, nnU-Net's label handling kept."""
import math

import torch

from nnunet_textguided.data.augmentation import HueTransform, SaturationTransform


def test_saturation_scales_the_distance_from_grey_and_leaves_greyscale_alone():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 1.0]])[:, :, None]  # (3, 2, 1)
    t = SaturationTransform((0.0, 0.0))
    grey = img.mean(0, keepdim=True).expand_as(img)
    torch.testing.assert_close(t(image=img.clone())["image"], grey)
    out = SaturationTransform((2.0, 2.0))(image=img.clone())["image"]
    torch.testing.assert_close(out - grey, 2 * (img - grey))
    mono = torch.randn(1, 4, 4)
    assert torch.equal(t(image=mono.clone())["image"], mono)


def test_hue_turns_colour_about_the_grey_axis():
    img = torch.randn(3, 5, 5)
    t = HueTransform(0.0)
    t.get_parameters = lambda **_: {"angle": 2 * math.pi / 3}  # a third of a turn permutes R -> G -> B
    out = t(image=img.clone())["image"]
    torch.testing.assert_close(out, img[[2, 0, 1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mean(0), img.mean(0), atol=1e-5, rtol=1e-5)  # grey kept
    torch.testing.assert_close(out.norm(dim=0), img.norm(dim=0), atol=1e-5, rtol=1e-5)  # a rotation
    mono = torch.randn(1, 4, 4)
    assert torch.equal(HueTransform()(image=mono.clone())["image"], mono)


def test_reclmis_paper_pipeline_replaces_nnunet_intensity_transforms():
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_textguided.training.reclmis import paper_pipeline
    base = nnUNetTrainer.get_training_transforms((32, 32), (-0.26, 0.26), None, (), False)
    out = paper_pipeline(base).transforms
    inner = [type(t.transform).__name__ for t in out if isinstance(t, RandomTransform)]
    assert inner == ["GaussianBlurTransform", "ContrastTransform", "SaturationTransform", "HueTransform"]
    spatial = next(t for t in out if isinstance(t, SpatialTransform))
    assert spatial.p_rotation == spatial.p_scaling == spatial.p_elastic_deform == 0
    assert not any(isinstance(t, RandomTransform) and isinstance(t.transform, GammaTransform) for t in out)
    assert isinstance(out[-1], RemoveLabelTansform)
    batch = paper_pipeline(base)(image=torch.randn(3, 40, 40), segmentation=torch.zeros(1, 40, 40))
    assert batch["image"].shape == (3, 32, 32) and torch.isfinite(batch["image"]).all()
