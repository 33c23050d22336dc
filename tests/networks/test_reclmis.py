"""RecLMIS network: shapes (tiny and paper configuration), parameter counts against the authors' modules and the
paper's figures, text conditioning and padding, gradients, the clean inference graph, the conditioned attention,
interest-weighted masking, PLAM, and errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_textguided.networks.blocks import PLAM
from nnunet_textguided.networks.reclmis import (RecLMIS, RecLMISAuxiliary, conditioned_attention,
                                                sample_interest_mask)

TINY = dict(features=(8, 16, 32, 64, 64), strides=(1, 2, 2, 2, 2), patch_size=(64, 64))
D, L = 32, 7  # tiny text width and tokens


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Intra-op threads thrash on the 2-core test machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_net(**kwargs):
    torch.manual_seed(0)
    return RecLMIS(1, 2, D, **{**TINY, **kwargs})


def make_aux(**kwargs):
    torch.manual_seed(1)
    return RecLMISAuxiliary(64, D, **{**dict(layers=2, ffn_dim=128), **kwargs})


def inputs(b=3):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, 1, 64, 64, generator=g)
    tokens = torch.randn(b, L, D, generator=g)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[0, 4:] = False  # padded notes of different lengths
    mask[-1, 6:] = False
    return x, tokens, mask


def count(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- shapes

def test_tiny_shapes_and_features():
    net = make_net().train()
    x, tokens, mask = inputs()
    logits, f = net.forward_features(x, tokens, mask)
    assert logits.shape == (3, 2, 64, 64)
    assert net.grid == (4, 4) and net.bottleneck_channels == 64 and net.text_dim == D
    assert f["text"].shape == (3, L, 64) and f["text_ci"] is None  # the paper's CI: E' is training-only
    assert f["image_emb"].shape == f["image_ci"].shape == (3, 16, 64)
    assert f["image"].shape == f["image_ci"].shape == (3, 16, 64)
    assert f["tokens"] is tokens and f["mask"].dtype == torch.bool
    assert net.decoder.deep_supervision is False
    assert net.training_only_modules == ()


def test_per_axis_strides_and_three_stages():
    torch.manual_seed(0)
    net = RecLMIS(2, 3, D, features=(8, 16, 24), strides=(1, [2, 1], [2, 2]), patch_size=(32, 16)).eval()
    assert net.grid == (8, 8)
    _, tokens, mask = inputs(2)
    assert net.segment(torch.randn(2, 2, 32, 16), tokens, mask).shape == (2, 3, 32, 16)
    # decoder widths: the level on skip s outputs features[max(s - 1, 0)]
    assert [b.convs[-1][0].out_channels for b in net.decoder.blocks] == [8, 8]


def test_paper_configuration_on_meta():
    with torch.device("meta"):
        net = RecLMIS(3, 1, 512)
    x = torch.empty(2, 3, 224, 224, device="meta")
    logits, f = net.forward_features(x, torch.empty(2, 18, 512, device="meta"),
                                     torch.ones(2, 18, dtype=torch.bool, device="meta"))
    assert logits.shape == (2, 1, 224, 224) and net.grid == (14, 14)
    assert f["image"].shape == f["image_ci"].shape == (2, 196, 512)
    assert f["text"].shape == (2, 18, 512) and f["text_ci"] is None
    # the authors' decoder widths: up4..up1 = 1024 -> 256, 512 -> 128, 256 -> 64, 128 -> 64
    assert [(b.convs[0][0].in_channels, b.convs[-1][0].out_channels) for b in net.decoder.blocks] == \
        [(1024, 256), (512, 128), (256, 64), (128, 64)]


def test_paper_size_real_forward_batch_one():
    """One real inference forward at 224 x 224 (about 24 GMACs: ~3 s on one CPU core)."""
    torch.manual_seed(0)
    net = RecLMIS(3, 1, 512).eval()
    tokens, mask = torch.randn(1, 18, 512), torch.arange(18)[None] < 11
    with torch.no_grad():
        out = net.segment(torch.randn(1, 3, 224, 224), tokens, mask)
    assert out.shape == (1, 1, 224, 224) and torch.isfinite(out).all()


# ---------------------------------------------------------------- parameter counts

def authors_counts(layers: int) -> dict[str, int]:
    """Parameters of the authors' modules (nets/RecLMIS.py at base_channel 64, CLIP ViT-B/32 frozen and not
    counted), derived from their layer shapes."""
    def conv(i, o, k=3, bias=True):
        return i * o * k * k + (o if bias else 0)

    def cbn(i, o):
        return conv(i, o) + 2 * o

    d = 512
    mha = 4 * d * d + 4 * d
    enc = cbn(3, 64) + sum(cbn(i, o) + cbn(o, o) for i, o in [(64, 128), (128, 256), (256, 512), (512, 512)])
    ups = [(1024, 256), (512, 128), (256, 64), (128, 64)]  # UpblockAttention(in, out): PLAM(in // 2)
    plam = sum(2 * conv(i // 2, i // 2, 1, False) + (3 * 6 + 6) + (6 + 1) for i, _ in ups)
    dec = plam + sum(cbn(i, o) + cbn(o, o) for i, o in ups) + conv(64, 1, 1)
    layer = 2 * (mha + 2 * d) + (d * 2 * d + 2 * d) + (2 * d * d + d) + 2 * d  # TransformerDecoderLayer
    return {"encoder": enc, "text_module4": conv(d, d, 1) * 3 - 2 * d,  # Conv1d(512, 512, 3): 3 d^2 + d
            "interactor_ci": conv(d, d, 1) + 196 * d + 2 * mha, "decoder": dec,
            "plam_conv_sig_unused": sum(conv(i // 2, i // 2, 1) for i, _ in ups),
            "interactor_ctbn": 3 * d * d + d + 2 * d, "mlps": 2 * (d * d + d + d + 1),
            "dual_transformers": 2 * 2 * layers * layer,
            "decoder1_cross_attention_unused": 2 * layers * (mha + 2 * d)}


def test_parameter_counts_paper_configuration():
    with torch.device("meta"):
        net = RecLMIS(3, 1, 512)  # the paper's CI: only the text-to-vision encoder at inference
        code_net = RecLMIS(3, 1, 512, image_reads="text_ci")  # the authors' code: both CI encoders
        aux3, aux4 = RecLMISAuxiliary(512, 512, layers=3), RecLMISAuxiliary(512, 512, layers=4)
        code_aux4 = RecLMISAuxiliary(512, 512, layers=4, vision_to_text=False)
    groups = net.parameter_groups()
    inference = count(net)
    print(f"\nRecLMIS inference graph: {inference:,}  {groups}")
    print(f"RecLMISAuxiliary: layers=3 {count(aux3):,} {aux3.parameter_groups()}; layers=4 {count(aux4):,}")
    a3, a4 = authors_counts(3), authors_counts(4)
    mha = 4 * 512 * 512 + 4 * 512
    # the authors' variant is exactly their modules on the inference path (PLAM's conv_sig is never called)
    assert code_net.parameter_groups() == {"encoder": a4["encoder"], "text_proj": a4["text_module4"],
                                           "interaction": a4["interactor_ci"], "decoder": a4["decoder"]}
    assert count(code_net) == 17_305_917
    # the paper's: the vision-to-text encoder (one MHA) moves to the training-only modules
    assert inference == 17_305_917 - mha == 16_255_293
    assert count(net) + count(aux4) == count(code_net) + count(code_aux4)
    # training-only: CTBN + MLPs + the reconstructors without decoder1's never-called cross-attention
    for aux, a in ((aux3, a3), (aux4, a4)):
        assert count(aux) == (a["interactor_ctbn"] + a["mlps"] + a["dual_transformers"]
                              - a["decoder1_cross_attention_unused"] + mha)
    assert count(aux3) == 32_857_602 + mha and count(aux4) == 43_372_034 + mha
    # the paper (Table II): 74.2 - 23.7 = 50.5 M is the authors' two DualTransformer of the 4-layer code
    # configuration, every parameter counted (3 layers would give 37.9 M)
    assert abs(a4["dual_transformers"] - (74.2e6 - 23.7e6)) / 50.5e6 < 0.005
    assert abs(a3["dual_transformers"] - 50.5e6) / 50.5e6 > 0.2
    ours_trained_reconstructors = aux4.parameter_groups()["cvr"] + aux4.parameter_groups()["clr"]
    assert ours_trained_reconstructors + a4["decoder1_cross_attention_unused"] == a4["dual_transformers"]
    # everything else outside CLIP: 18.97 M; the paper's 23.7 M is 4.73 M more (not in the released code)
    rest = sum(a4[k] for k in ("encoder", "text_module4", "interactor_ci", "decoder", "plam_conv_sig_unused",
                               "interactor_ctbn", "mlps"))
    assert rest == 18_969_343
    assert 4.70e6 < 23.7e6 - rest < 4.80e6 and 4.70e6 < 74.2e6 - (rest + a4["dual_transformers"]) < 4.82e6
    # CLIP ViT-B/32's text tower alone (63.4 M) exceeds 23.7 M: the paper's figure cannot contain it
    clip_text = 49408 * 512 + 77 * 512 + 12 * (4 * 512 * 512 + 4 * 512 + 2 * 512 + 512 * 2048 + 2048
                                             + 2048 * 512 + 512 + 2 * 512) + 2 * 512 + 512 * 512
    assert clip_text == 63_428_096 > 23.7e6


def test_clr_projection_only_when_text_width_differs():
    assert make_aux().clr.out_proj is not None and make_aux().clr.out_proj.out_features == D
    assert RecLMISAuxiliary(64, 64, layers=1, ffn_dim=32).clr.out_proj is None
    assert make_aux().cvr.out_proj is None


# ---------------------------------------------------------------- conditioning

def test_text_changes_output_and_padding_does_not():
    """In train mode (BatchNorm on batch statistics) without dropout: at initialisation the text enters only
    through CI's attention weights, and with eval-mode running statistics of an untrained network that effect is
    below float precision; batch statistics normalise it to order 1, as training does."""
    net = make_net(dropout=0.0).train()
    x, tokens, mask = inputs()
    with torch.no_grad():
        ref = net.segment(x, tokens, mask)
        other = net.segment(x, torch.randn_like(tokens), mask)
        padded = tokens.clone()
        padded[~mask] = 100 * torch.randn(int((~mask).sum()), D)
        same = net.segment(x, padded, mask)
    assert (ref - other).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # every sample responds to a new note
    torch.testing.assert_close(same, ref, rtol=0, atol=1e-6)
    # dropping the padded positions altogether changes nothing either
    keep = [0, 2]
    with torch.no_grad():
        full = net.segment(x[keep], tokens[keep], mask[keep])
        short = net.segment(x[keep], tokens[keep, :6], mask[keep, :6])
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def test_forward_uses_the_conditioner():
    net = make_net().eval()
    x, tokens, mask = inputs()
    with pytest.raises(RuntimeError, match="needs a conditioner"):
        net(x)
    net.set_conditioner(lambda inp: (inp, {"tokens": tokens, "mask": mask}))
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.segment(x, tokens, mask))
    assert not any("cond" in k for k in net.state_dict())


# ---------------------------------------------------------------- gradients and the clean inference graph

def test_segmentation_loss_reaches_text_conv_and_ci():
    net = make_net().train()
    logits, _ = net.forward_features(*inputs())
    F.cross_entropy(logits, torch.randint(0, 2, (3, 64, 64))).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert net.text_proj.weight.grad.abs().sum() > 0 and net.interaction.position.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", ["cvr", "clr", "ccl"])
def test_each_auxiliary_loss_reaches_its_modules(loss):
    net, aux = make_net().train(), make_aux().train()
    _, f = net.forward_features(*inputs())
    out = aux(f)
    assert set(out) == {"cvr", "clr", "ccl"} and all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    out[loss].backward()

    def reached(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    # W is detached in the MSE: the interest heads learn through the conditioned attention and CCL
    expected = {"cvr": {"word_interest", "cvr"}, "clr": {"patch_interest", "clr"},
                "ccl": {"word_interest", "patch_interest"}}[loss]
    for name in ("word_interest", "patch_interest", "cvr", "clr"):
        assert reached(getattr(aux, name)) == (name in expected), (loss, name)
    assert reached(net.encoder) and reached(net.text_proj)


def test_all_auxiliary_parameters_are_trained():
    net, aux = make_net().train(), make_aux().train()
    _, f = net.forward_features(*inputs())
    sum(aux(f).values()).backward()
    for name, p in aux.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _reached(module):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_a_module_without_its_condition_ignores_the_interest_weights():
    """Table IV: CVR without its condition reconstructs the same whatever W_woi says; with it, W_woi matters and
    the word-interest head learns through CVR's attention."""
    net = make_net().train()
    _, f = net.forward_features(*inputs())
    for conditions, expected in ((("ccl", "clr", "cvr"), True), (("ccl", "clr"), False)):
        aux = make_aux(conditions=conditions, dropout=0.0).train()
        torch.manual_seed(4)
        out = aux({k: v.detach() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in f.items()})
        out["cvr"].backward()
        assert _reached(aux.word_interest) == expected, conditions
    with pytest.raises(ValueError, match="Table IV"):
        make_aux(conditions=("seg",))


def test_random_masking_draws_uniformly():
    net = make_net().train()
    _, f = net.forward_features(*inputs())
    aux = make_aux(mask_strategy="random")
    assert all(torch.isfinite(v) for v in aux(f).values())
    with pytest.raises(ValueError, match="mask_strategy"):
        make_aux(mask_strategy="greedy")


def test_table_v_self_attention_variants_train_and_keep_the_inference_graph():
    """Self-attention CI: V' and E' from one MHA over [V_emb; E] (the note still changes the output); self-
    attention reconstruction: one reconstructor over [V_m; E_m] whose every parameter is trained."""
    net = make_net(ci_attention="self").train()
    assert net.interaction.computes_text_ci and net.interaction.text_attention is None
    logits, f = net.forward_features(*inputs())
    assert f["text_ci"].shape == f["text"].shape and f["image_ci"].shape == f["image"].shape
    aux = make_aux(reconstruction_attention="self", vision_to_text=False).train()
    assert aux.cvr is None and aux.clr is None and aux.joint is not None
    out = aux(f)
    (sum(out.values()) + logits.sum()).backward()
    for name, p in aux.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    net.eval()
    x, tokens, mask = inputs()
    assert not torch.allclose(net.segment(x, tokens, mask), net.segment(x, tokens.flip(0), mask.flip(0)))
    with pytest.raises(ValueError, match="Table V"):
        make_aux(reconstruction_attention="mixed")
    with pytest.raises(ValueError, match="Table V"):
        make_net(ci_attention="mixed")


def test_inference_graph_is_clean():
    names = [n for n, _ in make_net().named_parameters()] + list(make_net().state_dict())
    for part in ("interest", "mlp", "reconstruct", "cvr", "clr", "ccl", "poi", "woi", "ctbn"):
        assert not any(part in n.lower() for n in names), part


def test_auxiliary_options():
    net = make_net().train()
    _, f = net.forward_features(*inputs())
    torch.manual_seed(5)
    a = make_aux(cvr_target="image")(f)
    assert all(torch.isfinite(v) for v in a.values())
    with pytest.raises(ValueError, match="cvr_target"):
        make_aux(cvr_target="pixels")
    with pytest.raises(ValueError, match="image_mask_rate"):
        make_aux(image_mask_rate=1.5)
    w_poi, w_woi = make_aux().interest(f)
    torch.testing.assert_close(w_poi.sum(1), torch.ones(3))
    torch.testing.assert_close(w_woi.sum(1), torch.ones(3))
    assert (w_woi[~f["mask"]] == 0).all()


# ---------------------------------------------------------------- conditioned attention

def explicit_conditioned_attention(q, k, v, w, valid=None, causal=False, placement="logits"):
    """Eq. 7 / 9 ("logits"): softmax((q k^T / sqrt(d_h)) * W); the authors' code ("probabilities"):
    softmax(q k^T / sqrt(d_h)) * (W + 1e-10), / row sum. Masked scores are -inf either way."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if placement == "logits":
        s = s * w[:, None, None, :]
    if valid is not None:
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if placement == "logits":
        return s.softmax(-1) @ v
    a = s.softmax(-1) * (w[:, None, None, :] + 1e-10)
    return (a / a.sum(-1, keepdim=True)) @ v


def test_conditioned_attention_places_w_inside_the_softmax_as_eq_7():
    """A hand-computed case: one query, two keys, d_h = 1. Scores q k / sqrt(1) = (2, 4), W = (0.75, 0.25):
    eq. 7 gives softmax(2 * 0.75, 4 * 0.25) = softmax(1.5, 1.0); the code's placement gives
    softmax(2, 4) * W renormalised = (e^2 0.75, e^4 0.25) / sum."""
    q = torch.tensor([[[[2.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0], [2.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[10.0], [20.0]]]], dtype=torch.float64)
    w = torch.tensor([[0.75, 0.25]], dtype=torch.float64)
    a = math.exp(1.5) / (math.exp(1.5) + math.exp(1.0))
    assert conditioned_attention(q, k, v, w).item() == pytest.approx(10 * a + 20 * (1 - a), rel=1e-12)
    b = math.exp(2) * 0.75 / (math.exp(2) * 0.75 + math.exp(4) * 0.25)
    assert conditioned_attention(q, k, v, w, placement="probabilities").item() == pytest.approx(
        10 * b + 20 * (1 - b), rel=1e-6)  # log W is taken in float32
    with pytest.raises(ValueError, match="placement"):
        conditioned_attention(q, k, v, w, placement="values")


@pytest.mark.parametrize("placement", ["logits", "probabilities"])
@pytest.mark.parametrize("causal", [False, True])
def test_conditioned_attention_equals_explicit_formula(causal, placement):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    w = torch.rand(2, 6, generator=g, dtype=torch.float64).masked_fill(~valid, 0)
    w = w / w.sum(1, keepdim=True)
    w[0, 2] = 0.0  # a real key of zero interest: score 0 (logits) or the 1e-10 floor (probabilities)
    out = conditioned_attention(q, k, v, w, valid, causal, placement)
    torch.testing.assert_close(out, explicit_conditioned_attention(q, k, v, w, valid, causal, placement))
    assert torch.isfinite(out).all()
    # without W it is plain attention
    torch.testing.assert_close(conditioned_attention(q, k, v, placement=placement),
                               F.scaled_dot_product_attention(q, k, v))


def test_reclmis_reconstructors_follow_the_placement_setting():
    aux = RecLMISAuxiliary(16, 12, num_heads=2, layers=1, ffn_dim=32)
    placements = {m.placement for m in aux.modules() if hasattr(m, "placement")}
    assert placements == {"logits"}
    aux = RecLMISAuxiliary(16, 12, num_heads=2, layers=1, ffn_dim=32, condition_placement="probabilities")
    assert {m.placement for m in aux.modules() if hasattr(m, "placement")} == {"probabilities"}


def test_conditioned_attention_is_nan_free_for_empty_rows():
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    valid = torch.tensor([[False, True, True]])  # causal row 0 has no allowed key
    out = conditioned_attention(q, q, q, torch.tensor([[0.0, 0.5, 0.5]]), valid, causal=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


# ---------------------------------------------------------------- masking

def test_masking_draws_k_valid_items_reproducibly():
    valid = torch.ones(4, 18, dtype=torch.bool)
    valid[1, 10:] = False
    valid[2, 3:] = False
    valid[3] = False
    w = torch.rand(4, 18).masked_fill(~valid, 0)
    torch.manual_seed(0)
    m = sample_interest_mask(w, 0.3, valid)
    assert m.sum(1).tolist() == [5, 3, 1, 0]  # max(floor(n * 0.3), 1), n = 18, 10, 3, 0
    assert not (m & ~valid).any()
    torch.manual_seed(0)
    assert torch.equal(sample_interest_mask(w, 0.3, valid), m)
    assert sample_interest_mask(torch.rand(2, 196), 0.5).sum(1).tolist() == [98, 98]
    # zero weights on real items (softmax underflow) still give k distinct real items
    assert sample_interest_mask(torch.tensor([[1.0, 0, 0, 0]]), 0.5).sum() == 2


def test_masking_follows_the_interest_weights():
    w = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(400, 1)
    torch.manual_seed(1)
    frequency = sample_interest_mask(w, 0.25).float().mean(0)
    assert frequency[0] > 0.9 and frequency[1:].max() < 0.05


# ---------------------------------------------------------------- PLAM and errors

def test_plam_matches_lvit_formula():
    torch.manual_seed(0)
    plam = PLAM(6)
    x = torch.randn(2, 6, 5, 7)
    a = torch.relu(F.conv2d(x, plam.avg_branch.weight)).mean(1)
    m = torch.relu(F.conv2d(x, plam.max_branch.weight)).amax(1)
    desc = torch.stack([a, m, a + m], -1)  # channel-last, LViT's Linear(3, 6) -> ReLU -> Linear(6, 1)
    l1, l2 = plam.gate[0], plam.gate[2]
    gate = F.linear(torch.relu(F.linear(desc, l1.weight[:, :, 0, 0], l1.bias)), l2.weight[:, :, 0, 0], l2.bias)
    torch.testing.assert_close(plam(x), gate.squeeze(-1)[:, None] * x)
    assert count(plam) == 2 * 36 + 31


def test_errors():
    with pytest.raises(ValueError, match="stride must be 1"):
        RecLMIS(1, 2, D, features=(8, 16), strides=(2, 2), patch_size=(16, 16))
    with pytest.raises(ValueError, match="divisible"):
        RecLMIS(1, 2, D, features=(8, 16), strides=(1, 2), patch_size=(15, 16))
    with pytest.raises(ValueError, match="at least 2 stages"):
        RecLMIS(1, 2, D, features=(8,), strides=(1,), patch_size=(16, 16))
    net = make_net()
    _, tokens, mask = inputs()
    with pytest.raises(ValueError, match="built for patches"):
        net.segment(torch.randn(3, 1, 32, 32), tokens, mask)
    with pytest.raises(ValueError, match="tokens must be"):
        net.segment(torch.randn(3, 1, 64, 64), tokens[..., :5], mask)
