"""RecLMIS's auxiliary losses: the conditioned similarity (eq. 5) against an explicit loop, the conditioned
contrastive loss (eq. 6) on aligned vs shuffled pairs, its symmetry and padding, and the W-weighted
reconstruction MSE (eq. 8 / 10)."""
import pytest
import torch
import torch.nn.functional as F

from nnunet_textguided.losses.reclmis import (conditioned_contrastive_loss, conditioned_similarity,
                                              weighted_reconstruction_loss)

B, N, L, C = 4, 9, 5, 16


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, N, C, generator=g)
    text = torch.randn(B, L, C, generator=g)
    w_v = torch.rand(B, N, generator=g).softmax(-1)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 4:] = False
    w_e = torch.rand(B, L, generator=g).masked_fill(~mask, float("-inf")).softmax(-1)
    return image, text, w_v, w_e, mask


def test_similarity_matches_explicit_formula():
    image, text, w_v, w_e, mask = batch()
    s = conditioned_similarity(image, text, w_v, w_e, mask)
    assert s.shape == (B, B)
    for i in range(B):
        for j in range(B):
            e = text[j][mask[j]]
            a = F.cosine_similarity(image[i][:, None], e[None], dim=-1)  # (N, L_j)
            expected = 0.5 * ((w_v[i] * a.amax(1)).sum() + (w_e[j][mask[j]] * a.amax(0)).sum())
            torch.testing.assert_close(s[i, j], expected)


def test_aligned_pairs_score_lower_than_shuffled():
    """Each note's tokens are noisy copies of some of its own image's patches: the matched pairing must give a
    lower loss than any shuffled one."""
    g = torch.Generator().manual_seed(1)
    image = torch.randn(B, N, C, generator=g)
    text = image[:, :L] + 0.1 * torch.randn(B, L, C, generator=g)
    w_v, w_e = torch.full((B, N), 1 / N), torch.full((B, L), 1 / L)
    aligned = conditioned_contrastive_loss(image, text, w_v, w_e)
    for shift in (1, 2, 3):
        shuffled = conditioned_contrastive_loss(image, text.roll(shift, 0), w_v, w_e.roll(shift, 0))
        assert aligned < shuffled
    assert aligned < 0.05  # tau = 0.01 separates the aligned pairs clearly


def test_contrastive_loss_is_symmetric_and_explicit():
    image, text, w_v, w_e, _ = batch(2)
    s = conditioned_similarity(image, text, w_v, w_e)
    # the two modalities play symmetric roles: swapping them transposes S
    torch.testing.assert_close(conditioned_similarity(text, image, w_e, w_v), s.t())
    labels = torch.arange(B)
    expected = 0.5 * (F.cross_entropy(s / 0.01, labels) + F.cross_entropy(s.t() / 0.01, labels))
    torch.testing.assert_close(conditioned_contrastive_loss(image, text, w_v, w_e), expected)
    torch.testing.assert_close(conditioned_contrastive_loss(text, image, w_e, w_v), expected)
    # relabelling the batch consistently changes nothing
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(conditioned_contrastive_loss(image[perm], text[perm], w_v[perm], w_e[perm]),
                               expected)


def test_padded_tokens_are_ignored_and_finite():
    image, text, w_v, w_e, mask = batch(3)
    image.requires_grad_(True)
    text.requires_grad_(True)
    loss = conditioned_contrastive_loss(image, text, w_v, w_e, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
    assert (text.grad[~mask] == 0).all()
    changed = text.detach().clone()
    changed[~mask] = 50 * torch.randn(int((~mask).sum()), C)
    torch.testing.assert_close(conditioned_contrastive_loss(image.detach(), changed, w_v, w_e, mask), loss.detach())
    # a note without any real token stays finite
    empty = mask.clone()
    empty[0] = False
    assert torch.isfinite(conditioned_contrastive_loss(image.detach(), text.detach(), w_v, w_e, empty))
    with pytest.raises(ValueError, match="temperature"):
        conditioned_contrastive_loss(image, text, w_v, w_e, mask, temperature=0)


def test_weighted_mse_uniform_weights_give_plain_mse():
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(3, 6, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    uniform = torch.full((3, 6), 1 / 6)
    torch.testing.assert_close(weighted_reconstruction_loss(pred, target, uniform), F.mse_loss(pred, target))
    # explicit: per sample sum_j w_j mean_c err^2 with w renormalised over the valid items, mean over the batch
    w = torch.rand(3, 6, generator=g)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[0, 4:] = False
    err = (pred - target).pow(2).mean(-1)
    wv = w * valid
    expected = ((wv / wv.sum(1, keepdim=True)) * err).sum(1).mean()
    torch.testing.assert_close(weighted_reconstruction_loss(pred, target, w, valid), expected)


def test_weighted_mse_weights_are_detached_and_padding_excluded():
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    target = torch.randn(2, 5, 4, generator=g)
    w = torch.rand(2, 5, generator=g).softmax(-1).requires_grad_(True)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    loss = weighted_reconstruction_loss(pred, target, w, valid)
    loss.backward()
    assert w.grad is None  # W is a detached condition of this loss
    assert (pred.grad[~valid] == 0).all()
    changed = pred.detach().clone()
    changed[~valid] = float("inf")
    assert torch.isfinite(weighted_reconstruction_loss(changed, target, w, valid))
    torch.testing.assert_close(weighted_reconstruction_loss(changed, target, w, valid), loss.detach())
    # moving weight onto the worst-reconstructed item raises the loss
    err = (pred.detach() - target).pow(2).mean(-1)
    focused = F.one_hot(err.masked_fill(~valid, -1).argmax(1), 5).float()
    assert weighted_reconstruction_loss(pred.detach(), target, focused, valid) > loss.detach()
    with pytest.raises(ValueError, match="weights must be"):
        weighted_reconstruction_loss(pred, target, w[:, :3])


def test_objective_is_eq_11_with_the_paper_weights():
    """L = λ1 L_V2T + λ2 L_T2V + λ3 L_CCL + λ4 (L_Dice + L_CE), λ = 1, 1, 0.2, 5 (the settings' defaults)."""
    from nnunet_textguided.losses.reclmis import reclmis_objective
    from nnunet_textguided.settings import RecLMISSettings
    s = RecLMISSettings()
    weights = {"clr": s.loss_clr, "cvr": s.loss_cvr, "ccl": s.loss_ccl, "seg": s.loss_seg}
    assert weights == {"clr": 1.0, "cvr": 1.0, "ccl": 0.2, "seg": 5.0}
    terms = {"seg": torch.tensor(0.7), "clr": torch.tensor(0.3), "cvr": torch.tensor(0.11), "ccl": torch.tensor(2.0)}
    assert float(reclmis_objective(terms, weights)) == pytest.approx(5 * 0.7 + 0.3 + 0.11 + 0.2 * 2.0)
    assert float(reclmis_objective({"seg": torch.tensor(0.7)}, weights)) == pytest.approx(3.5)
    with pytest.raises(ValueError, match="seg"):
        reclmis_objective({"clr": torch.tensor(1.0)}, weights)
