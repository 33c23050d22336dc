"""RecLMIS's auxiliary losses (seed 004): conditioned contrastive learning (CCL, Sec. III-B2, eq. 4-6) and the
W-weighted reconstruction MSE of CVR / CLR (Sec. III-C/D, eq. 8 and 10). Plain functions of tensors; the
modules that produce their inputs live in ``networks.reclmis.RecLMISAuxiliary``.

Shapes: B samples, N image patches (bottleneck tokens), L text tokens, C channels. ``text_mask`` (B, L) is bool,
True = a real token; padded tokens never enter a max, a sum or an average. Computed in float32 (safe under
autocast: the temperature 0.01 turns similarities into logits up to 100).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import gather_batch

__all__ = ["conditioned_similarity", "conditioned_contrastive_loss", "weighted_reconstruction_loss",
           "reclmis_objective", "OBJECTIVE_TERMS"]

#: eq. 11's terms, weight name -> what it weighs: L = λ1 L_V2T + λ2 L_T2V + λ3 L_CCL + λ4 (L_Dice + L_CE)
OBJECTIVE_TERMS = {"clr": "λ1, L_V2T (CLR: vision to text)", "cvr": "λ2, L_T2V (CVR: text to vision)",
                   "ccl": "λ3, L_CCL", "seg": "λ4, L_Dice + L_CE"}


def reclmis_objective(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Eq. 11 of seed 004, the one place its factors meet: sum over ``terms`` of weights[name] * term.

    terms: "seg" = L_Dice + L_CE unscaled (nnU-Net's DC_and_CE_loss with both weights 1), and any of "clr"
    (L_V2T), "cvr" (L_T2V), "ccl" (L_CCL); a term whose weight is 0 must be left out (never computed).
    weights: λ1..λ4 under the names of :data:`OBJECTIVE_TERMS` (the paper: clr 1, cvr 1, ccl 0.2, seg 5).
    """
    unknown = set(terms) - set(OBJECTIVE_TERMS)
    if unknown or "seg" not in terms:
        raise ValueError(f"RecLMIS objective terms must include 'seg' and be among {list(OBJECTIVE_TERMS)}; got "
                         f"{sorted(terms)}")
    return sum(float(weights[name]) * value for name, value in terms.items())


def _valid_tokens(text_mask: torch.Tensor | None, shape, device) -> torch.Tensor:
    if text_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    valid = text_mask.to(device=device, dtype=torch.bool)
    if tuple(valid.shape) != tuple(shape):
        raise ValueError(f"text_mask must be (B, L) = {tuple(shape)}, got {tuple(valid.shape)}")
    return valid


def conditioned_similarity(image: torch.Tensor, text: torch.Tensor, image_weights: torch.Tensor,
                           text_weights: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """S (eq. 5) for every image-text pair of the batch: -> (B_image, B_text).

    a_nl = cos(v_n, e_l) for the patches v (image: (B, N, C)) of image i and the tokens e (text: (B, L, C)) of
    text j; S_ij = 1/2 (sum_n w_v^n max_l a_nl + sum_l w_e^l max_n a_nl), with w_v = image_weights (B, N) of
    image i (W_poi) and w_e = text_weights (B, L) of text j (W_woi). Padded tokens of text j take part in neither
    the max over tokens nor the sum; their weights are set to 0. The weights are used as given (the authors'
    code passes the already-softmaxed W through a second softmax, flattening them towards uniform — not done).
    """
    if image.ndim != 3 or text.ndim != 3 or image.shape[-1] != text.shape[-1]:
        raise ValueError(f"image (B, N, C) and text (B, L, C) must share C; got {tuple(image.shape)}, "
                         f"{tuple(text.shape)}")
    valid = _valid_tokens(text_mask, text.shape[:2], text.device)
    # a text without any real token would make every max over its tokens -inf: treat all its positions as real
    valid = valid | ~valid.any(1, keepdim=True)
    v = F.normalize(image.float(), dim=-1)
    e = F.normalize(text.float(), dim=-1)
    a = torch.einsum("inc,jlc->ijnl", v, e)  # (B_image, B_text, N, L)
    best_token = a.masked_fill(~valid[None, :, None, :], float("-inf")).amax(-1)  # (Bi, Bt, N)
    best_patch = a.amax(-2)  # (Bi, Bt, L)
    w_v = image_weights.float()
    w_e = text_weights.float() * valid
    s_image = (best_token * w_v[:, None, :]).sum(-1)
    s_text = (best_patch * w_e[None, :, :]).sum(-1)
    return 0.5 * (s_image + s_text)


def conditioned_contrastive_loss(image: torch.Tensor, text: torch.Tensor, image_weights: torch.Tensor,
                                 text_weights: torch.Tensor, text_mask: torch.Tensor | None = None,
                                 temperature: float = 0.01) -> torch.Tensor:
    """L_CCL (eq. 6): symmetric InfoNCE over the batch on S / temperature -> scalar.

    -1/2 [mean_i log softmax_j(S_ij / tau)_i + mean_i log softmax_j(S_ji / tau)_i]: the matched pair (i, i) is
    the positive of image i among all texts and of text i among all images. (Eq. 6 prints exp(S) / tau, a typo
    for exp(S / tau); the code scales S by CLIP's logit scale exp(ln 100) = 1 / 0.01.) A batch of one gives 0.
    Under DDP the batch is every rank's (``distributed.gather_batch``): the negatives of a split batch are the
    single-process ones.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if text_mask is None:
        text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    image, text, image_weights, text_weights, text_mask = gather_batch(image, text, image_weights, text_weights,
                                                                       text_mask.to(torch.bool))
    s = conditioned_similarity(image, text, image_weights, text_weights, text_mask) / temperature
    labels = torch.arange(s.shape[0], device=s.device)
    return 0.5 * (F.cross_entropy(s, labels) + F.cross_entropy(s.t(), labels))


def weighted_reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_T2V (eq. 8) / L_V2T (eq. 10): the squared error of each item weighted by its interest weight -> scalar.

    prediction, target: (B, n, C); weights: (B, n) (w_v = W_poi for CVR, w_e = W_woi for CLR); valid: (B, n)
    bool, True = a real item (text padding excluded; None = all real).
    Per sample: sum_j w_j * mean_c (pred - target)^2 over the valid items, with w renormalised to sum to 1 over
    them; then the mean over the batch (eq. 8's 1/B sum_i).

    - W is detached: the weights say which items matter, they are not a free parameter of this loss (otherwise
      the interest MLPs could lower it by moving weight to easily reconstructed items); they still learn
      through the conditioned attention of the reconstructors and through CCL.
    - Scale: eq. 8 literally divides the W-weighted sum once more by N (1/N sum_j w_j |.|^2 with sum_j w_j = 1),
      which shrinks the loss N-fold (196 for the image, ~18 for text) against the authors' code (a plain mean,
      for which lambda_1 = lambda_2 = 1 were tuned). Here uniform weights give exactly that plain MSE over the
      valid items, so the paper's lambdas keep their meaning; only the weighting is the paper's.
    """
    if prediction.shape != target.shape or prediction.ndim != 3:
        raise ValueError(f"prediction and target must both be (B, n, C); got {tuple(prediction.shape)} and "
                         f"{tuple(target.shape)}")
    if tuple(weights.shape) != tuple(prediction.shape[:2]):
        raise ValueError(f"weights must be (B, n) = {tuple(prediction.shape[:2])}, got {tuple(weights.shape)}")
    err = (prediction.float() - target.float()).pow(2).mean(-1)  # (B, n)
    w = weights.detach().float()
    if valid is not None:
        keep = valid.to(device=w.device, dtype=torch.bool)
        w = w * keep
        err = err.masked_fill(~keep, 0.0)  # padded items never reach the loss, not even as 0 * inf
    w = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return (w * err).sum(1).mean()
