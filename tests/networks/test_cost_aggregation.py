"""CAT-Seg-style cost-aggregation decoder: shapes and window clamping, gradients, class permutation equivariance,
text guidance, input checks, the guided window attention against a hand computation, and the parameter count
of the CAT-Seg ViT-L configuration."""
import pytest
import torch
import torch.nn.functional as F

from nnunet_textguided.networks.blocks.cost_aggregation import CostAggregationDecoder, group_count, linear_attention
from nnunet_textguided.networks.blocks.windows import GuidedWindowBlock

P, CA, DT, G16, G8 = 5, 8, 6, 7, 9
GRID = (4, 6)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Intra-op threads thrash on the 2-core test machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def decoder(window=2, **kwargs):
    torch.manual_seed(0)
    return CostAggregationDecoder(P, CA, DT, (G16, G8), GRID, hidden=16, appearance_guidance_dim=8,
                                  text_guidance_dim=8, num_heads=2, window=window, decoder_dims=(16, 8),
                                  guidance_proj_dims=(4, 4), **kwargs)


def inputs(t, b=2, grid=GRID, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    return (torch.rand(b, P, t, h, w, generator=g) * 2 - 1, torch.randn(b, CA, h, w, generator=g),
            torch.randn(b, t, DT, generator=g),
            [torch.randn(b, G16, 2 * h, 2 * w, generator=g), torch.randn(b, G8, 4 * h, 4 * w, generator=g)])


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("window, windows, shifts", [
    (8, (1, 4, 6), (0, 0, 0)),   # larger than the grid: one window, nothing to shift
    (4, (1, 4, 4), (0, 0, 2)),   # covers H only: W padded to 8 and shifted
    (2, (1, 2, 2), (0, 1, 1)),   # shifted windows with the shift mask
])
def test_shapes_and_windows(t, window, windows, shifts):
    model = decoder(window)
    first, second = model.layers[0].spatial.blocks
    assert first.window == second.window == windows
    assert first.shift == (0, 0, 0) and second.shift == shifts
    assert first.attn_mask is None and (second.attn_mask is not None) == any(shifts)
    assert model(*inputs(t)).shape == (2, t, 16, 24)


def test_gradients_reach_every_parameter():
    model = decoder(2)
    model(*inputs(3)).square().mean().backward()
    nonzero = total = 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
        nonzero, total = nonzero + (p.grad != 0).sum().item(), total + p.numel()
    # exact zeros: ReLU units dead on every sample at these tiny widths (text projection, class MLP, and the q/k
    # weight columns fed by a dead text unit) and the softmax attention's key bias, which only adds q.b_k to a
    # whole row of scores and so cancels in the softmax
    assert nonzero / total > 0.97


def test_class_permutation_equivariance():
    model = decoder(2).eval()
    cost, appearance, text, guidance = inputs(4)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = model(cost, appearance, text, guidance)
        permuted = model(cost[:, :, perm], appearance, text[:, perm], guidance)
    torch.testing.assert_close(permuted, out[:, perm], atol=1e-5, rtol=1e-5)


def test_text_guidance():
    model = decoder(2).eval()
    with torch.no_grad():
        for t in (1, 3):
            cost, appearance, text, guidance = inputs(t)
            delta = (model(cost, appearance, text, guidance)
                     - model(cost, appearance, torch.randn_like(text), guidance)).abs().max()
            if t == 1:
                # Text enters only through the class attention's q and k. Over a single class, linear attention
                # returns v * (q.k) / (q.k + eps): the weights always sum to 1 up to eps (1e-6, against q.k of
                # order head_dim), so with T = 1 the text has no effect beyond float rounding.
                assert delta < 1e-5
            else:
                assert delta > 1e-3


def test_linear_attention_matches_normalised_kernel_attention():
    q, k, v = torch.randn(3, 2, 5, 7, 2, 4).unbind(0)   # (B, L, N, heads, d)
    weights = torch.einsum("blnhd,bsnhd->bnhls", F.elu(q) + 1, F.elu(k) + 1)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(linear_attention(q, k, v), torch.einsum("bnhls,bsnhe->blnhe", weights, v))


def test_guided_window_attention_by_hand():
    """One window over the whole 3x4 grid, no shift: plain softmax attention with q, k from [x, guidance]."""
    torch.manual_seed(0)
    block = GuidedWindowBlock(8, 6, (1, 3, 4), num_heads=2, window=(1, 3, 4))
    x, guidance = torch.randn(2, 12, 8), torch.randn(2, 12, 6)
    attn, y = block.attn, block.norm1(x)
    heads = [t.reshape(2, 12, 2, 4).transpose(1, 2) for t in
             (attn.q(torch.cat([y, guidance], -1)), attn.k(torch.cat([y, guidance], -1)), attn.v(y))]
    scores = heads[0] @ heads[1].transpose(-1, -2) / 2.0 + attn.relative_bias()
    mixed = (scores.softmax(-1) @ heads[2]).transpose(1, 2).reshape(2, 12, 8)
    expected = x + attn.proj(mixed)
    expected = expected + block.mlp(block.norm2(expected))
    torch.testing.assert_close(block(x, guidance), expected)


def test_group_count():
    assert [group_count(c) for c in (64, 32, 16, 8, 56, 48)] == [4, 2, 1, 1, 2, 3]


@pytest.mark.parametrize("change, match", [
    (lambda c, a, t, g: (c[:, 1:], a, t, g), "cost"),
    (lambda c, a, t, g: (c[..., 1:], a, t, g), "cost"),
    (lambda c, a, t, g: (c, a[..., 1:], t, g), "appearance"),
    (lambda c, a, t, g: (c, a, t[:, 1:], g), "text"),
    (lambda c, a, t, g: (c, a, t, g[:1]), "2 maps"),
    (lambda c, a, t, g: (c, a, t, [g[0], g[1][..., 1:]]), "guidance"),
    (lambda c, a, t, g: (c, a, t, [g[0][:, 1:], g[1]]), "guidance"),
])
def test_shape_errors(change, match):
    with pytest.raises(ValueError, match=match):
        decoder()(*change(*inputs(2)))


def test_cat_seg_vit_l_configuration():
    """Constructor defaults, P = 77, Ca = Dt = 256, guidance dims 256, grid 24 x 24: count by hand and run."""
    p, ca, dt, grid = 77, 256, 256, (24, 24)
    model = CostAggregationDecoder(p, ca, dt, (256, 256), grid)
    h, ga, gt, heads, window = 128, 128, 128, 4, 12

    def linear(i, o):
        return i * o + o

    def conv(i, o, k, bias=True):
        return i * o * k * k + (o if bias else 0)

    def norm(c):
        return 2 * c

    mlp = linear(h, 4 * h) + linear(4 * h, h)
    swin = norm(h) + 2 * linear(h + ga, h) + 2 * linear(h, h) + (2 * window - 1) ** 2 * heads + norm(h) + mlp
    spatial = norm(ga) + 2 * swin
    classes = norm(h) + 2 * linear(h + gt, h) + 2 * linear(h, h) + norm(h) + mlp
    up1 = (h * 64 * 4 + 64) + conv(64 + 32, 64, 3, False) + norm(64) + conv(64, 64, 3, False) + norm(64)
    up2 = (64 * 32 * 4 + 32) + conv(32 + 16, 32, 3, False) + norm(32) + conv(32, 32, 3, False) + norm(32)
    expected = (conv(p, h, 7) + conv(ca, ga, 3) + linear(dt, gt) + 2 * (spatial + classes)
                + conv(256, 32, 1) + conv(256, 16, 1) + up1 + up2 + conv(32, 1, 3))
    count = sum(q.numel() for q in model.parameters())
    print(f"CAT-Seg ViT-L decoder parameters: {count}")
    assert count == expected == 2_375_489
    assert model.layers[0].spatial.blocks[1].shift == (0, 6, 6)
    assert [m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)] == [4, 4, 2, 2]

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(torch.rand(1, p, 2, *grid, generator=g), torch.randn(1, ca, *grid, generator=g),
                    torch.randn(1, 2, dt, generator=g),
                    [torch.randn(1, 256, 48, 48, generator=g), torch.randn(1, 256, 96, 96, generator=g)])
    assert out.shape == (1, 2, 96, 96) and torch.isfinite(out).all()
