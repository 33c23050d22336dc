"""Paper mode: the embeddings handed to the network for a patch are those of its source slices, through
nnU-Net's own crop/pad and training transforms (z-flips, in-plane rotation and scaling, intensity transforms).

The segmentation carries the truth: label z + 1 on slice z, moved by nnU-Net's segmentation path; the
positional channels travel by the regression-target path; both must agree slice by slice.
"""
import math
import random

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_textguided.conditioning.slices import SliceStream, TableSliceConditioner
from nnunet_textguided.data.position_channels import PositionAwareTransforms, PositionedArray, append_position_channels

D, H, W = 20, 40, 40
PATCH = (8, 32, 32)  # anisotropic -> nnU-Net's dummy-2D augmentation: in-plane rotation/scaling, any flips


def make_transforms():
    tr = nnUNetTrainer.get_training_transforms(
        PATCH, (-math.pi, math.pi), None, (0, 1, 2), True, use_mask_for_norm=[False],
        foreground_labels=list(range(1, D + 1)))
    return PositionAwareTransforms(tr)


def table_conditioner():
    cond = TableSliceConditioner([SliceStream("image", "unused", "embed_images")], (0, 1), num_image_channels=1)
    # row r of case c holds [c, r - 1]: the case index and the source slice (row 0 = outside -> -1)
    cond.set_tables({c: {"image": torch.stack([torch.full((D + 1,), float(c)), torch.arange(-1, D).float()], 1)}
                     for c in range(3)})
    return cond


def test_patches_get_their_source_slices():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    transforms, cond = make_transforms(), table_conditioner()
    flipped = unflipped = 0
    for i in range(40):
        case = i % 3
        image = rng.normal(size=(1, D, H, W)).astype(np.float32)
        seg = np.broadcast_to(np.arange(1, D + 1, dtype=np.int16)[:, None, None], (1, D, H, W))
        # initial (larger) patch as nnU-Net's loader draws it, sometimes reaching outside the volume
        initial = (PATCH[0], 56, 56)
        lbs = [int(rng.integers(-4, D - PATCH[0] + 5)), int(rng.integers(-16, H - 40)), int(rng.integers(-16, W - 40))]
        bbox = [[lo, lo + s] for lo, s in zip(lbs, initial)]
        data = torch.from_numpy(crop_and_pad_nd(PositionedArray(image, case), bbox, 0)).float()
        target = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
        out = transforms(image=data, segmentation=target)
        x = out["image"][None]
        assert x.shape == (1, 3, *PATCH)
        _, emb = cond(x)
        got_case, got_slice = emb["image"][0, :, 0], emb["image"][0, :, 1]
        truth = out["segmentation"][0]
        for z in range(PATCH[0]):
            labels = truth[z][truth[z] > 0]
            if labels.numel() < 0.05 * truth[z].numel():
                continue  # (nearly) all outside: no source slice to compare with
            expected = int(labels.mode().values) - 1
            assert int(got_slice[z]) == expected, (i, z)
            assert int(got_case[z]) == case
        s = [int(v) for v in got_slice if v >= 0]
        flipped += len(s) > 1 and s[0] > s[-1]
        unflipped += len(s) > 1 and s[0] < s[-1]
    assert flipped and unflipped  # both z orientations were exercised


def test_whole_case_positions_match_slices():
    vol = torch.randn(1, D, H, W)
    x = append_position_channels(vol, 2)
    cond = table_conditioner()
    _, emb = cond(x[None])
    assert torch.equal(emb["image"][0, :, 1], torch.arange(D).float())
    flipped = torch.flip(x, (1,))[None]
    _, emb = cond(flipped)
    assert torch.equal(emb["image"][0, :, 1], torch.arange(D - 1, -1, -1).float())


def test_missing_position_channels_name_the_command():
    import pytest

    from nnunet_textguided.conditioning.slices import MissingCaseConditioningError
    cond = table_conditioner()
    # not a RuntimeError: nnU-Net's sliding window would take it for out-of-memory and retry on the CPU
    with pytest.raises(MissingCaseConditioningError, match="nnUNetv2_predict_textguided") as e:
        cond(torch.zeros(1, 1, *PATCH))
    assert not isinstance(e.value, RuntimeError)


def test_border_slices_of_scaled_and_rotated_3d_patches_are_not_biased():
    """3D augmentation (rotation, scaling along z) of patches reaching beyond the volume: each patch slice's row
    must be what the same transform gives when the volume continues (the volume embedded in a taller one), i.e.
    interpolation with the loader's zero padding must not pull a border slice's coordinate towards 0."""
    patch, initial, offset = (12, 24, 24), (20, 40, 40), 15
    transforms = PositionAwareTransforms(nnUNetTrainer.get_training_transforms(
        patch, (-math.pi / 6, math.pi / 6), None, (0, 1, 2), False, use_mask_for_norm=[False],
        foreground_labels=[1]))
    small, tall = 10, 10 + 2 * offset
    rng = np.random.default_rng(1)
    compared = border = 0
    for i in range(60):
        z0, y0, x0 = int(rng.integers(-12, small - 6)), int(rng.integers(0, 8)), int(rng.integers(0, 8))
        rows = {}
        for depth, shift in ((small, 0), (tall, offset)):
            image = np.zeros((1, depth, 48, 48), np.float32)
            bbox = [[z0 + shift, z0 + shift + initial[0]], [y0, y0 + initial[1]], [x0, x0 + initial[2]]]
            data = torch.from_numpy(crop_and_pad_nd(PositionedArray(image, 0), bbox, 0)).float()
            seg = torch.zeros((1, *initial), dtype=torch.int16)
            torch.manual_seed(i), np.random.seed(i), random.seed(i)  # same augmentation for both
            x = transforms(image=data, segmentation=seg)["image"][None]
            _, r = TableSliceConditioner.source_indices(x[:, 1:])
            rows[depth] = TableSliceConditioner.table_rows(r[0], depth + 1)
        expected = rows[tall] - offset
        expected = torch.where((expected >= 1) & (expected <= small), expected, torch.zeros_like(expected))
        assert torch.equal(rows[small], expected), (i, rows[small].tolist(), expected.tolist())
        compared += 1
        border += bool(((expected == 0) | (expected == 1) | (expected == small)).any())
    assert compared == 60 and border > 10


def test_predictor_appends_positions_tile_by_tile_exactly_like_whole_case_channels():
    """nnUNetv2_predict_textguided appends the positional channels to each tile in the main thread (not to the
    case): the logits equal those of the whole-case channels through nnU-Net's own sliding window, with padding
    (a case smaller than the patch) and mirroring along every axis."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_textguided.evaluation.benchmark import Setup, build
    from nnunet_textguided.evaluation.params import trainer_class
    from nnunet_textguided.inference.predict import TextGuidedPredictor
    setup = Setup("3d_tiny", torch.device("cpu"))
    torch.manual_seed(0)
    net, pm, cm, lm = build(trainer_class("BiCLIPTrainer"), setup)
    net.decoder.deep_supervision = False
    pred = TextGuidedPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=torch.device("cpu"),
                               perform_everything_on_device=False, verbose=False, allow_tqdm=False)
    pred.manual_initialization(net, pm, cm, [net.state_dict()], setup.dataset_json, "BiCLIPTrainer", (0, 1, 2))
    for shape in ((10, 20, 50), (24, 48, 40)):
        data = torch.randn(1, *shape)
        tile_by_tile = pred.predict_logits_from_preprocessed_data(data)
        whole_case = nnUNetPredictor.predict_logits_from_preprocessed_data(pred, append_position_channels(data, 0))
        assert tile_by_tile.shape == (lm.num_segmentation_heads, *shape)
        assert torch.equal(tile_by_tile, whole_case)
