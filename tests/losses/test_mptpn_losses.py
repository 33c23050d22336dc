"""MPTPN's 0.5 * WBCE + 0.5 * WDice (eq. 8-11): the binary case against a literal copy of the authors' code (LViT's
WeightedBCE / WeightedDiceLoss on sigmoid probabilities), the multi-class mean, the ignore label, gradients for
saturated logits, the extremes, a sample without foreground, bf16 autocast and the input checks."""
import pytest
import torch
import torch.nn.functional as F

from nnunet_textguided.losses.mptpn import WeightedBCEDiceLoss


def authors_wbce(p, t, weights=(0.5, 0.5)):
    """LViT utils.WeightedBCE.forward, verbatim up to names."""
    logit = p.reshape(-1)
    truth = t.reshape(-1)
    loss = F.binary_cross_entropy(logit, truth, reduction="none")
    pos = (truth > 0.5).float()
    neg = (truth < 0.5).float()
    pos_weight = pos.sum().item() + 1e-12
    neg_weight = neg.sum().item() + 1e-12
    return (weights[0] * pos * loss / pos_weight + weights[1] * neg * loss / neg_weight).sum()


def authors_wdice(p, t, weights=(0.5, 0.5), smooth=1e-5):
    """LViT utils.WeightedDiceLoss.forward, verbatim up to names."""
    b = len(p)
    p = p.reshape(b, -1)
    t = t.reshape(b, -1)
    w = t.detach() * (weights[1] - weights[0]) + weights[0]
    p = w * p
    t = w * t
    intersection = (p * t).sum(-1)
    union = (p * p).sum(-1) + (t * t).sum(-1)
    return (1 - (2 * intersection + smooth) / (union + smooth)).mean()


def authors_total(p, t, weights=(0.5, 0.5)):
    return 0.5 * authors_wdice(p, t, weights) + 0.5 * authors_wbce(p, t, weights)


def sig(s):
    """sigmoid in float64: in float32, 1 - sigmoid(s) loses its digits for s >~ 10, which is the reference's
    imprecision (the reason the loss uses BCE with logits), not the loss's; the result is cast back to float32."""
    return torch.sigmoid(s.double())


def f32(x):
    return x.float()


def with_background(s):
    """(B, K, ...) foreground logits -> (B, 1+K, ...) nnU-Net logits with the fixed zero background."""
    return torch.cat([torch.zeros_like(s[:, :1]), s], 1)


def random_case(seed, b=3, k=1, shape=(16, 12), scale=4.0, p_fg=0.3):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, *shape, generator=g) * scale
    target = torch.randint(1, k + 1, (b, 1, *shape), generator=g)
    target = torch.where(torch.rand(b, 1, *shape, generator=g) < p_fg, target, torch.zeros_like(target))
    return s, target


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.3, 0.7)])
def test_binary_matches_authors_code(seed, weights):
    s, target = random_case(seed)
    loss = WeightedBCEDiceLoss(class_weights=weights)(with_background(s), target.float())
    expected = f32(authors_total(sig(s), target.double(), weights))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_binary_3d_and_long_target():
    s, target = random_case(5, b=2, shape=(4, 6, 5))
    loss = WeightedBCEDiceLoss()(with_background(s), target.long())
    torch.testing.assert_close(loss, f32(authors_total(sig(s), target.double())), rtol=1e-5, atol=1e-6)


def test_weights_of_the_two_parts():
    s, target = random_case(7)
    t = target.float()
    logits = with_background(s)
    bce_only = WeightedBCEDiceLoss(bce_weight=1.0, dice_weight=0.0, class_weights=(0.2, 0.8))(logits, t)
    dice_only = WeightedBCEDiceLoss(bce_weight=0.0, dice_weight=1.0, class_weights=(0.2, 0.8))(logits, t)
    torch.testing.assert_close(bce_only, f32(authors_wbce(sig(s), t.double(), (0.2, 0.8))))
    torch.testing.assert_close(dice_only, f32(authors_wdice(sig(s), t.double(), (0.2, 0.8))))


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_is_mean_of_binary_losses(seed):
    k = 3
    s, target = random_case(seed, b=2, k=k, p_fg=0.6)
    loss_fn = WeightedBCEDiceLoss()
    loss = loss_fn(with_background(s), target)
    per_class = [loss_fn(with_background(s[:, c - 1:c]), (target == c).long()) for c in range(1, k + 1)]
    torch.testing.assert_close(loss, torch.stack(per_class).mean())
    per_class_authors = [f32(authors_total(sig(s[:, c - 1:c]), (target == c).double())) for c in range(1, k + 1)]
    torch.testing.assert_close(loss, torch.stack(per_class_authors).mean(), rtol=1e-5, atol=1e-6)


def test_ignore_label():
    ignore = 9
    s, target = random_case(11, b=3, k=2, p_fg=0.5)
    g = torch.Generator().manual_seed(12)
    ignored = torch.rand(target.shape, generator=g) < 0.25
    target = torch.where(ignored, torch.full_like(target, ignore), target)
    loss_fn = WeightedBCEDiceLoss(ignore_label=ignore)
    loss = loss_fn(with_background(s), target)

    # changing (even to non-finite values) the logits of ignored pixels changes nothing
    s2 = s.clone()
    mask = ignored.expand_as(s2)
    s2[mask] = torch.randn(int(mask.sum()), generator=g) * 50
    torch.testing.assert_close(loss_fn(with_background(s2), target), loss)
    s2[mask] = float("nan")
    s2.requires_grad_(True)
    loss_nan = loss_fn(with_background(s2), target)
    torch.testing.assert_close(loss_nan, loss)
    loss_nan.backward()
    assert torch.isfinite(s2.grad).all() and (s2.grad[mask] == 0).all()

    # equal to the authors' losses on the remaining pixels: WBCE over the batch's valid pixels, WDice per sample
    keep = ~ignored[:, 0]
    per_class = []
    for c in (1, 2):
        p = sig(s[:, c - 1])
        t = (target[:, 0] == c).double()
        wbce = authors_wbce(p[keep], t[keep])
        wdice = torch.stack([authors_wdice(p[b][keep[b]][None], t[b][keep[b]][None]) for b in range(len(p))]).mean()
        per_class.append(f32(0.5 * wbce + 0.5 * wdice))
    torch.testing.assert_close(loss, torch.stack(per_class).mean(), rtol=1e-5, atol=1e-6)


def test_gradients_finite_for_extreme_logits_and_only_in_foreground_channels():
    s, target = random_case(3, b=2, k=2, p_fg=0.5)
    s = torch.where(s > 0, torch.full_like(s, 80.0), torch.full_like(s, -80.0))
    logits = with_background(s).requires_grad_(True)
    loss = WeightedBCEDiceLoss()(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, 0] == 0).all()
    assert logits.grad[:, 1:].abs().sum() > 0


def test_perfect_and_wrong_predictions():
    _, target = random_case(4, b=2, k=2, p_fg=0.5)
    onehot = torch.cat([(target == c) for c in (1, 2)], 1).float()
    loss_fn = WeightedBCEDiceLoss()
    perfect = loss_fn(with_background((onehot * 2 - 1) * 30), target)
    wrong = loss_fn(with_background((1 - onehot * 2) * 30), target)
    assert perfect < 1e-6
    assert wrong > 10  # WBCE ~ 30 for every pixel, WDice ~ 1


def test_sample_without_foreground_is_finite():
    s, target = random_case(6, b=3)
    target[1] = 0
    logits = with_background(s).requires_grad_(True)
    loss = WeightedBCEDiceLoss()(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss, f32(authors_total(sig(s), target.double())), rtol=1e-5, atol=1e-6)
    # whole batch without foreground: the positive half of WBCE is 0, as the authors' 1e-12 gives
    target.zero_()
    loss = WeightedBCEDiceLoss()(with_background(s), target)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, f32(authors_total(sig(s), target.double())), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_cpu():
    s, target = random_case(8, b=2, k=2)
    logits = with_background(s)
    loss_fn = WeightedBCEDiceLoss()
    ref = loss_fn(logits, target)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = loss_fn(logits.bfloat16(), target)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_input_checks():
    loss_fn = WeightedBCEDiceLoss()
    s, target = random_case(0)
    logits = with_background(s)
    with pytest.raises(ValueError, match="logits must be"):
        loss_fn(logits[:, :, 0], target[:, :, 0])
    with pytest.raises(ValueError, match="background"):
        loss_fn(logits[:, 1:], target)
    with pytest.raises(ValueError, match="target must be"):
        loss_fn(logits, target[:, 0])
    with pytest.raises(ValueError, match="target must be"):
        loss_fn(logits, target[..., :-1])
    with pytest.raises(ValueError, match="fixed background"):
        loss_fn(torch.cat([s, s], 1), target)
    with pytest.raises(ValueError, match="class_weights"):
        WeightedBCEDiceLoss(class_weights=(0.5,))
    with pytest.raises(ValueError, match="smooth"):
        WeightedBCEDiceLoss(smooth=0.0)
