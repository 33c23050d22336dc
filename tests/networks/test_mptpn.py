"""MPTPN network (networks.mptpn): MSFF / PatchMerging / PatchExpand layouts and shapes (tiny and paper configuration on
the meta device), the PPE's scales, note conditioning and padding invariance, every Table-3 variant's logits and
gradients, the paper configuration's parameter count derived by hand, the stage-1 -> stage-2 state adaptation
(``adapt_ppe_state``) and the SimSiam predictors."""
import einops
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_textguided.networks.mptpn import (MPTPN, MultiscaleFeatureFusion, PatchExpand, PatchMerging,
                                              PromptEncoder, SimSiamPredictors, adapt_ppe_state)

C, D, L = 8, 16, 5  # tiny base channels (one ViT head-dim per head at 8 heads), text width, tokens
SIZE = (32, 48)  # token grid 2 x 3 (non-square: catches raster-order mix-ups)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Intra-op threads thrash on the 2-core test machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count(module):
    return sum(p.numel() for p in module.parameters())


def make_ppe(**kwargs):
    torch.manual_seed(0)
    return PromptEncoder(**{**dict(in_channels=1, base_channels=C, text_dim=D, max_tokens=L, image_size=SIZE),
                            **kwargs})


def make_net(num_classes=3, **variant):
    torch.manual_seed(0)
    return MPTPN(1, num_classes, D, L, SIZE, base_channels=C, **variant)


def inputs(b=2, size=SIZE, channels=1):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, channels, *size, generator=g)
    tokens = torch.randn(b, L, D, generator=g)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[0, 3:] = False  # notes of different lengths
    return x, tokens, mask


# ---------------------------------------------------------------- MSFF, PatchMerging, PatchExpand

def test_msff_shapes_tiny():
    torch.manual_seed(0)
    msff = MultiscaleFeatureFusion(C)
    f = [torch.randn(2, C, 64, 96), torch.randn(2, 2 * C, 32, 48), torch.randn(2, 4 * C, 16, 24)]
    out = msff(f)
    assert [tuple(o.shape) for o in out] == [(2, 3 * C, 64, 96), (2, 6 * C, 32, 48), (2, 12 * C, 16, 24)]
    # each scale carries its own input unchanged at its documented slot
    assert torch.equal(out[0][:, :C], f[0]) and torch.equal(out[1][:, 2 * C:4 * C], f[1])
    assert torch.equal(out[2][:, 8 * C:], f[2])


def test_msff_shapes_paper_configuration_on_meta():
    with torch.device("meta"):
        msff = MultiscaleFeatureFusion(64)
        out = msff([torch.empty(2, 64, 224, 224), torch.empty(2, 128, 112, 112), torch.empty(2, 256, 56, 56)])
    assert [tuple(o.shape) for o in out] == [(2, 192, 224, 224), (2, 384, 112, 112), (2, 768, 56, 56)]


def coded_map(b, c, h, w):
    """x[b, c, h, w] = 1000 b + 100 c + 10 h + w: every value names its position."""
    return (1000 * torch.arange(b)[:, None, None, None] + 100 * torch.arange(c)[None, :, None, None]
            + 10 * torch.arange(h)[None, None, :, None] + torch.arange(w)[None, None, None, :]).float()


def test_patch_merging_swin_order():
    torch.manual_seed(0)
    c = 3
    pm = PatchMerging(c)
    x = coded_map(2, c, 4, 6)
    seen = {}
    pm.norm.register_forward_pre_hook(lambda m, args: seen.setdefault("cat", args[0]))
    out = pm(x)
    assert out.shape == (2, 2 * c, 2, 3)
    cat = seen["cat"]  # (B, H/2, W/2, 4c), before the LayerNorm
    assert cat.shape == (2, 2, 3, 4 * c)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                # Swin: [x(0::2, 0::2), x(1::2, 0::2), x(0::2, 1::2), x(1::2, 1::2)], each group all c channels
                expected = [1000 * b + 100 * ch + 10 * (2 * i + dh) + (2 * j + dw)
                            for dh, dw in ((0, 0), (1, 0), (0, 1), (1, 1)) for ch in range(c)]
                assert cat[b, i, j].tolist() == expected
    # and the output is Linear(LN(cat)), no bias
    ref = F.linear(F.layer_norm(cat, (4 * c,), pm.norm.weight, pm.norm.bias), pm.reduction.weight)
    torch.testing.assert_close(out, ref.permute(0, 3, 1, 2))
    assert pm.reduction.bias is None and pm.reduction.in_features == 4 * c and pm.reduction.out_features == 2 * c


def test_patch_expand_sub_pixel_layout():
    c = 8  # 2 x 2 sub-pixels of c / 4 = 2 channels
    pe = PatchExpand(c)
    pe.norm = nn.Identity()
    with torch.no_grad():  # Linear c/4 -> c/2 as [identity; 2 x identity]
        pe.expand.weight.copy_(torch.cat([torch.eye(c // 4), 2 * torch.eye(c // 4)]))
    x = coded_map(2, c, 3, 5)
    out = pe(x)
    assert out.shape == (2, c // 2, 6, 10)
    q = c // 4
    for h in range(3):
        for w in range(5):
            for p1 in range(2):
                for p2 in range(2):
                    group = x[:, (2 * p1 + p2) * q:(2 * p1 + p2 + 1) * q, h, w]  # channel group (p1, p2)
                    assert torch.equal(out[:, :q, 2 * h + p1, 2 * w + p2], group)
                    assert torch.equal(out[:, q:, 2 * h + p1, 2 * w + p2], 2 * group)
    ref = einops.rearrange(x.permute(0, 2, 3, 1), "b h w (p1 p2 c) -> b (h p1) (w p2) c", p1=2, p2=2)
    assert torch.equal(out[:, :q], ref.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="divisible by 4"):
        PatchExpand(6)


# ---------------------------------------------------------------- PPE

def test_ppe_scales_and_reconstruction_raster_order():
    ppe = make_ppe().eval()
    assert ppe.grid == (2, 3) and ppe.widths == [C, 2 * C, 4 * C]
    x, tokens, mask = inputs()
    with torch.no_grad():
        f = ppe(x, tokens, mask)
    assert [tuple(t.shape) for t in f] == [(2, C, 32, 48), (2, 2 * C, 16, 24), (2, 4 * C, 8, 12)]
    # Reconstruct: token k of the g_h x g_w grid fills the s x s block (k // g_w, k % g_w)
    rec = ppe.reconstruct[1]
    with torch.no_grad():
        rec.conv.weight.copy_(torch.eye(2 * C)[..., None, None])
        rec.conv.bias.zero_()
    y = torch.rand(1, 6, 2 * C)  # relu(identity) keeps non-negative tokens
    out = rec(y)
    for k in range(6):
        block = out[0, :, 8 * (k // 3):8 * (k // 3 + 1), 8 * (k % 3):8 * (k % 3 + 1)]
        torch.testing.assert_close(block, y[0, k][:, None, None].expand(-1, 8, 8) / (1 + 1e-5) ** 0.5)


def test_ppe_note_changes_features_and_padding_does_not():
    ppe = make_ppe().eval()
    x, tokens, mask = inputs()
    padded = tokens.clone()
    padded[~mask] = 100 * torch.randn(int((~mask).sum()), D)
    with torch.no_grad():
        ref = ppe(x, tokens, mask)
        other = ppe(x, tokens.roll(1, 0), mask.roll(1, 0))
        same = ppe(x, padded, mask)
    for r, o, s in zip(ref, other, same):
        assert (r - o).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every scale of every sample responds
        torch.testing.assert_close(s, r, rtol=0, atol=1e-6)


def test_ppe_without_down_vit_ignores_the_note():
    """The authors' ablation: the text enters only through the first DownViT, so without DownViTs it has no
    effect at all (documented in the module docstring)."""
    ppe = make_ppe(down_vit=False).eval()
    assert not hasattr(ppe, "text_to_patches") and not hasattr(ppe, "down_blocks")
    x, tokens, mask = inputs()
    with torch.no_grad():
        ref = ppe(x, tokens, mask)
        other = ppe(x, torch.randn_like(tokens), torch.ones_like(mask))
    for r, o in zip(ref, other):
        assert torch.equal(r, o)


def test_ppe_errors():
    ppe = make_ppe()
    x, tokens, mask = inputs()
    with pytest.raises(ValueError, match="built for"):
        ppe(torch.randn(2, 1, 32, 32), tokens, mask)
    with pytest.raises(ValueError, match="note tokens must be"):
        ppe(x, tokens[..., :D - 1], mask)
    with pytest.raises(ValueError, match="note tokens must be"):
        ppe(x, tokens[:, :L - 1], mask[:, :L - 1])
    with pytest.raises(ValueError, match="multiples of 16"):
        make_ppe(image_size=(40, 48))
    with pytest.raises(ValueError, match="divisible"):
        make_ppe(base_channels=12)  # 12 is not divisible by 8 heads


# ---------------------------------------------------------------- MPTPN

@pytest.mark.parametrize("num_classes", [2, 3])
def test_logits_with_fixed_background(num_classes):
    net = make_net(num_classes).eval()
    x, tokens, mask = inputs()
    with torch.no_grad():
        out = net.segment(x, tokens, mask)
        other = net.segment(x, tokens.roll(1, 0), mask.roll(1, 0))
    assert out.shape == (2, num_classes, *SIZE) and torch.isfinite(out).all()
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    assert net.head.out_channels == num_classes - 1
    assert (out[:, 1:].std(dim=(2, 3)) > 0).all()  # non-constant foreground logits
    assert (out - other).abs().amax(dim=(1, 2, 3)).min() > 1e-5  # the note changes every sample's logits
    with pytest.raises(ValueError, match="at least one class"):
        MPTPN(1, 1, D, L, SIZE, base_channels=C)


def test_full_model_padding_invariance_and_conditioner():
    net = make_net().eval()
    x, tokens, mask = inputs()
    padded = tokens.clone()
    padded[~mask] = 50 * torch.randn(int((~mask).sum()), D)
    with pytest.raises(RuntimeError, match="needs a conditioner"):
        net(x)
    net.set_conditioner(lambda inp: (inp, {"tokens": padded, "mask": mask}))
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.segment(x, tokens, mask), rtol=0, atol=1e-6)
    assert net.text_dim == D and not any("cond" in k for k in net.state_dict())


VARIANTS = {
    "full": {},
    "no_down_vit": {"down_vit": False},
    "no_up_vit": {"up_vit": False},
    "no_msff": {"msff": False},
    "no_up_attention": {"up_attention": False},
}
@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_runs_and_trains_every_parameter(name):
    net = make_net(3, **VARIANTS[name]).train()
    x, tokens, mask = inputs()
    out = net.segment(x, tokens, mask)
    assert out.shape == (2, 3, *SIZE) and torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    groups = net.parameter_groups()
    assert sum(groups.values()) == count(net)
    assert ("msff" in groups) == (name != "no_msff")
    assert ("up_attention" in groups) == (name != "no_up_attention") and ("expand" in groups) == (name == "no_up_attention")
    F.cross_entropy(out, torch.randint(0, 3, (2, *SIZE))).backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_variant_structure():
    assert make_net(up_attention=False).head.in_channels == 9 * C  # 3C @ H + 2 x PatchExpand to 3C @ H
    assert make_net(msff=False, up_attention=False).head.in_channels == 3 * C
    assert make_net(msff=False).head.in_channels == C and make_net().head.in_channels == 3 * C
    up = make_net(up_vit=False).ppe
    assert not hasattr(up, "up_blocks") and not hasattr(up, "from_below") and hasattr(up, "down_blocks")


def test_paper_configuration_forward_on_meta():
    with torch.device("meta"):
        net = MPTPN(1, 2, 768, 10, (224, 224))
        out = net.segment(torch.empty(2, 1, 224, 224), torch.empty(2, 10, 768), torch.ones(2, 10, dtype=torch.bool))
        f = net.ppe(torch.empty(2, 1, 224, 224), torch.empty(2, 10, 768), torch.ones(2, 10, dtype=torch.bool))
    assert out.shape == (2, 2, 224, 224) and net.ppe.grid == (14, 14)
    assert [tuple(t.shape) for t in f] == [(2, 64, 224, 224), (2, 128, 112, 112), (2, 256, 56, 56)]
    # the authors' decoder: (768 + 384 -> 384) @ 112, (384 + 192 -> 192) @ 224
    assert [(b.convs[0][0].in_channels, b.convs[-1][0].out_channels) for b in net.up] == [(1152, 384), (576, 192)]


# ---------------------------------------------------------------- parameter report (paper configuration)

def conv2d(i, o, k):
    return i * o * k * k + o


def conv1d(i, o, k=3):
    return i * o * k + o


def conv_bn(i, o):  # Conv3x3 + BatchNorm2d (ConvBNReLU)
    return conv2d(i, o, 3) + 2 * o


def conv_trans_bn(i, o):  # Conv1d k3 + BatchNorm1d
    return conv1d(i, o) + 2 * o


def vit_block(d):  # 2 LN + qkv (bias) + proj + MLP d -> 4d -> d
    return 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)


def expected_counts(text_dim, c=64, tokens=10, grid=14, in_channels=1):
    n = grid * grid
    w = [c, 2 * c, 4 * c]
    image = conv_bn(in_channels, c) + conv_bn(c, 2 * c) + conv_bn(2 * c, 2 * c) + conv_bn(2 * c, 4 * c) \
        + conv_bn(4 * c, 4 * c)
    text = conv1d(text_dim, 8 * c) + conv1d(8 * c, 4 * c) + conv1d(4 * c, 2 * c) + conv1d(2 * c, c)
    embeddings = sum(conv2d(wi, wi, p) + n * wi for wi, p in zip(w, (16, 8, 4)))  # conv k = s + positions
    word_to_patch = conv_trans_bn(tokens, n)
    down_vits = sum(vit_block(wi) for wi in w)
    halving = conv_trans_bn(2 * c, c) + conv_trans_bn(4 * c, 2 * c)
    up_vits = sum(vit_block(wi) for wi in w)
    from_below = conv_trans_bn(2 * c, c) + conv_trans_bn(4 * c, 2 * c)
    reconstruct = sum(conv2d(wi, wi, 1) + 2 * wi for wi in w)
    ppe = image + text + embeddings + word_to_patch + down_vits + halving + up_vits + from_below + reconstruct

    def merging(ch):  # LN(4ch) + Linear(4ch -> 2ch, no bias)
        return 2 * 4 * ch + 4 * ch * 2 * ch

    def expand(ch):  # LN(ch/4) + Linear(ch/4 -> ch/2, no bias)
        return 2 * (ch // 4) + (ch // 4) * (ch // 2)

    msff = merging(c) + merging(2 * c) + expand(2 * c) + merging(2 * c) + expand(4 * c) + expand(2 * c)

    def plam(ch):
        return 2 * ch * ch + 31

    up = plam(6 * c) + conv_bn(6 * c + 12 * c, 6 * c) + conv_bn(6 * c, 6 * c) \
        + plam(3 * c) + conv_bn(3 * c + 6 * c, 3 * c) + conv_bn(3 * c, 3 * c)
    head = conv2d(3 * c, 1, 1)
    return {"ppe": ppe, "msff": msff, "up_attention": up, "head": head}, text


@pytest.mark.parametrize("text_dim, total, ppe", [(768, 15_774_339, 8_456_452), (384, 15_184_515, 7_866_628)])
def test_parameter_counts_paper_configuration(text_dim, total, ppe):
    """C = 64, 224 x 224, 8 heads, 10 tokens, one input channel, background + 1 class: BERT-base (768, the paper's)
    or MiniLM (384, the offline default) token states."""
    with torch.device("meta"):
        net = MPTPN(1, 2, text_dim, 10, (224, 224), base_channels=64, num_heads=8)
    expected, text = expected_counts(text_dim)
    groups = net.parameter_groups()
    print(f"\nMPTPN D={text_dim}: {count(net):,} {groups}")
    assert groups == expected
    assert count(net) == sum(expected.values()) == total
    assert groups["ppe"] == ppe and count(net.ppe.text) == text
    assert expected["msff"] == 310_016 and expected["up_attention"] == 7_007_678 and expected["head"] == 193
    # only the text chain's first convolution depends on the text width: 3 x 64 x (768 - 384)
    if text_dim == 768:
        assert total - 15_184_515 == 3 * 512 * (768 - 384)


# ---------------------------------------------------------------- stage-1 -> stage-2 adaptation

def test_adapt_same_geometry_is_identity():
    src = make_ppe()
    state = src.state_dict()
    torch.manual_seed(9)
    tgt = PromptEncoder(1, C, D, L, SIZE)
    adapted, notes = adapt_ppe_state(state, {"in_channels": 1, "image_size": SIZE}, tgt)
    assert notes == []
    tgt.load_state_dict(adapted, strict=True)
    for k, v in tgt.state_dict().items():
        assert torch.equal(v, state[k]), k


def pretrained_rgb_ppe():
    torch.manual_seed(3)
    src = PromptEncoder(3, C, D, L, (32, 32))  # stage 1: RGB, grid 2 x 2
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-zero positions, non-trivial BN affine
    return src


def test_adapt_grid_and_stem():
    src = pretrained_rgb_ppe()
    state = src.state_dict()
    with torch.no_grad():
        state["embed.1.position"] = torch.full_like(state["embed.1.position"], 0.25)
    tgt = PromptEncoder(1, C, D, L, (64, 48))  # stage 2: grey, grid 4 x 3
    adapted, notes = adapt_ppe_state(state, {"in_channels": 3, "image_size": (32, 32)}, tgt)
    tgt.load_state_dict(adapted, strict=True)
    assert any("token grid 2x2 -> 4x3" in n for n in notes) and any("stem: 3 -> 1" in n for n in notes)
    for i, wi in enumerate(tgt.widths):
        assert tgt.embed[i].position.shape == (1, 12, wi)
    torch.testing.assert_close(tgt.embed[1].position, torch.full((1, 12, 2 * C), 0.25))  # bicubic keeps constants
    assert tgt.text_to_patches.conv.weight.shape == (12, L, 3)
    assert torch.equal(tgt.down_blocks[0].qkv.weight, src.down_blocks[0].qkv.weight)  # grid-free tensors copied
    assert torch.equal(state["image.stages.0.0.weight"], src.image.stages[0][0].weight)  # the input is not mutated
    # the stem: a grey image gives exactly what its RGB copy gave in stage 1
    g = torch.randn(2, 1, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(tgt.image.stages[0][0](g), src.image.stages[0][0](g.repeat(1, 3, 1, 1)),
                                   rtol=0, atol=1e-5)
    x, tokens, mask = inputs(size=(64, 48))
    with torch.no_grad():
        assert all(torch.isfinite(f).all() for f in tgt.eval()(x, tokens, mask))


def test_adapt_stem_to_more_channels_cycles_and_scales():
    src = pretrained_rgb_ppe()
    tgt = PromptEncoder(4, C, D, L, (32, 32))
    adapted, notes = adapt_ppe_state(src.state_dict(), {"in_channels": 3, "image_size": (32, 32)}, tgt)
    w = src.image.stages[0][0].weight
    torch.testing.assert_close(adapted["image.stages.0.0.weight"], w[:, [0, 1, 2, 0]] * 0.75)
    assert notes == ["stem: 3 -> 4 input channels (cycled, scaled by 3/4)"]


def test_adapted_running_variances_stay_positive():
    src = PromptEncoder(3, C, D, L, (32, 32))
    state = src.state_dict()
    state["text_to_patches.norm.running_var"] = torch.tensor([0.01, 1.0, 1.0, 0.01])  # trained, positive
    tgt = PromptEncoder(1, C, D, L, (64, 48))
    adapted, _ = adapt_ppe_state(state, {"in_channels": 3, "image_size": (32, 32)}, tgt)
    tgt.load_state_dict(adapted, strict=True)
    x, tokens, mask = inputs(size=(64, 48))
    with torch.no_grad():
        out = tgt.eval()(x, tokens, mask)
    assert (adapted["text_to_patches.norm.running_var"] > 0).all()
    assert all(torch.isfinite(f).all() for f in out)


def test_adapt_refuses_other_base_channels_and_missing_modules():
    state = PromptEncoder(1, 2 * C, D, L, SIZE).state_dict()
    with pytest.raises(ValueError, match="base channels"):
        adapt_ppe_state(state, {"in_channels": 1, "image_size": SIZE}, make_ppe())
    no_up = make_ppe(up_vit=False).state_dict()
    with pytest.raises(ValueError, match="lacks"):
        adapt_ppe_state(no_up, {"in_channels": 1, "image_size": SIZE}, make_ppe())


def test_adapt_full_state_into_up_vit_ablation_drops_and_reports():
    src = make_ppe()
    state = src.state_dict()
    tgt = PromptEncoder(1, C, D, L, SIZE, up_vit=False)
    adapted, notes = adapt_ppe_state(state, {"in_channels": 1, "image_size": SIZE}, tgt)
    tgt.load_state_dict(adapted, strict=True)
    assert not any(k.startswith(("up_blocks.", "from_below.")) for k in adapted)
    assert len(state) - len(adapted) == sum(k.startswith(("up_blocks.", "from_below.")) for k in state) > 0
    assert notes == ["not in this variant, not loaded: from_below, up_blocks"]
    for k, v in tgt.state_dict().items():
        assert torch.equal(v, state[k]), k


# ---------------------------------------------------------------- SimSiam predictors

def test_simsiam_predictors_pooled_as_the_authors_code():
    torch.manual_seed(0)
    heads = SimSiamPredictors([C, 2 * C, 4 * C], projection="pool")
    f = [torch.randn(3, C, 8, 12), torch.randn(3, 2 * C, 4, 6), torch.randn(3, 4 * C, 2, 3)]
    z, p = heads(f)
    for fi, zi, pi, head in zip(f, z, p, heads.heads):
        assert zi.shape == pi.shape == fi.shape[:2]
        torch.testing.assert_close(zi, fi.flatten(2).mean(-1))
        torch.testing.assert_close(pi, head[2](F.leaky_relu(zi @ head[0].weight.T)))
        assert head[0].bias is None and head[2].bias is not None
        assert not torch.allclose(pi, zi)
    assert count(heads) == sum(2 * w * w + w for w in (C, 2 * C, 4 * C))


def test_simsiam_predictors_dense_as_algorithm_1():
    """P = G(Y) on the feature maps themselves (Algorithm 1: no pooling): a 1x1-convolution head, P shaped like
    Y; the same parameters as the pooled heads (a state dict loads into either)."""
    torch.manual_seed(0)
    heads = SimSiamPredictors([C, 2 * C, 4 * C])
    assert heads.projection == "dense"
    f = [torch.randn(3, C, 8, 12), torch.randn(3, 2 * C, 4, 6), torch.randn(3, 4 * C, 2, 3)]
    z, p = heads(f)
    for fi, zi, pi, head in zip(f, z, p, heads.heads):
        assert zi is fi and pi.shape == fi.shape
        conv = F.conv2d(F.leaky_relu(F.conv2d(fi, head[0].weight[..., None, None])),
                        head[2].weight[..., None, None], head[2].bias)
        torch.testing.assert_close(pi, conv)
    SimSiamPredictors([C, 2 * C, 4 * C], projection="pool").load_state_dict(heads.state_dict())
    with pytest.raises(ValueError, match="projection"):
        SimSiamPredictors([C], projection="gap")
