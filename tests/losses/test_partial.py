"""PartialLabelLoss: masked BCE + soft Dice over annotated (sample, label) pairs; labels_to_channels."""
import math

import pytest
import torch

from nnunet_textguided.losses.partial import PartialLabelLoss, labels_to_channels


def test_unannotated_labels_get_exactly_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    target = (torch.rand(2, 3, 4, 5, 6) > 0.5).float()
    annotated = torch.tensor([[True, False, True], [False, True, False]])
    PartialLabelLoss()(logits, target, annotated).backward()
    for b in range(2):
        for k in range(3):
            g = logits.grad[b, k]
            if annotated[b, k]:
                assert g.abs().sum() > 0
            else:
                assert torch.equal(g, torch.zeros_like(g))


def test_unannotated_garbage_cannot_poison_the_loss():
    """inf logits / out-of-range targets in unannotated pairs: finite loss, zero (not NaN) gradient there."""
    logits = torch.zeros(1, 2, 8)
    logits[0, 1] = float("-inf")
    logits.requires_grad_(True)
    target = torch.zeros(1, 2, 8)
    target[0, 1] = -1  # the CLIP-driven Universal Model's "unannotated" marker
    loss = PartialLabelLoss(smooth=0.0)(logits, target, torch.tensor([[True, False]]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(logits.grad[0, 1], torch.zeros(8))


def test_matches_a_hand_computation():
    # 1 sample annotated for label 0 only, sample 2 for both labels; 3 voxels each
    logits = torch.tensor([[[0.0, 2.0, -1.0], [5.0, 5.0, 5.0]],
                           [[1.0, -2.0, 0.5], [-3.0, 0.0, 3.0]]])
    target = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
                           [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])
    annotated = torch.tensor([[True, False], [True, True]])
    pairs = [(0, 0), (1, 0), (1, 1)]

    def sig(z):
        return 1 / (1 + math.exp(-z))

    bce_terms, dice_terms = [], []
    for b, k in pairs:
        xs, ts = logits[b, k].tolist(), target[b, k].tolist()
        bce_terms += [-(t * math.log(sig(z)) + (1 - t) * math.log(1 - sig(z))) for z, t in zip(xs, ts)]
        ps = [sig(z) for z in xs]
        dice_terms.append(1 - 2 * sum(p * t for p, t in zip(ps, ts)) / (sum(ps) + sum(ts) + 1.0))
    bce, dice = sum(bce_terms) / len(bce_terms), sum(dice_terms) / len(dice_terms)
    got = PartialLabelLoss(bce_weight=0.3, dice_weight=2.0)(logits, target, annotated)
    assert got.item() == pytest.approx(0.3 * bce + 2.0 * dice, rel=1e-6)


def test_batch_without_annotations_gives_a_differentiable_zero():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = PartialLabelLoss()(logits, torch.ones(2, 3, 4, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_shape_errors():
    loss = PartialLabelLoss()
    with pytest.raises(ValueError, match="annotated"):
        loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="target"):
        loss(torch.zeros(2, 3, 4), torch.zeros(2, 2, 4), torch.ones(2, 3, dtype=torch.bool))


def test_labels_to_channels():
    seg = torch.tensor([0, 1, 2, 3, 4, 2]).view(1, 1, 6, 1, 1).repeat(2, 1, 1, 1, 1)
    out = labels_to_channels(seg, [(1,), (2, 3), 4, (7,)])
    assert out.shape == (2, 4, 6, 1, 1) and out.dtype == torch.float32
    assert out[0, :, :, 0, 0].tolist() == [[0, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 1], [0, 0, 0, 0, 1, 0], [0] * 6]
    with pytest.raises(ValueError):
        labels_to_channels(seg[:, 0], [(1,)])
