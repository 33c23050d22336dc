"""Multi-scale deformable attention: core vs a hand-written bilinear loop, init, gradients, encoder shapes."""
import math

import pytest
import torch

from nnunet_textguided.networks.blocks.deformable import (DeformableEncoder, MSDeformAttn, ms_deform_attn_core,
                                                          sine_position_embedding)

SHAPES = [(5, 7), (3, 4), (2, 3)]


def reference_core(value, shapes, locations, weights):
    """Per sample/query/head/level/point bilinear interpolation by hand (pixel centres at +0.5, zeros outside)."""
    b, _, heads, head_dim = value.shape
    _, lq, _, levels, points, _ = locations.shape
    starts = [sum(h * w for h, w in shapes[:lvl]) for lvl in range(levels)]
    out = torch.zeros(b, lq, heads, head_dim, dtype=torch.float64)
    for n in range(b):
        for q in range(lq):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(points):
                        x = locations[n, q, m, lvl, p, 0].item() * w - 0.5
                        y = locations[n, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= xi < w and 0 <= yi < h:
                                bilinear = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                out[n, q, m] += (weights[n, q, m, lvl, p].item() * bilinear
                                                 * value[n, starts[lvl] + yi * w + xi, m].double())
    return out.reshape(b, lq, heads * head_dim)


def test_core_matches_hand_written_bilinear():
    g = torch.Generator().manual_seed(0)
    b, lq, heads, head_dim, points = 2, 4, 2, 3, 3
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(b, s, heads, head_dim, generator=g)
    # a margin beyond [0, 1] so that some points fall partly or wholly outside their map
    locations = torch.rand(b, lq, heads, len(SHAPES), points, 2, generator=g) * 1.6 - 0.3
    weights = torch.rand(b, lq, heads, len(SHAPES), points, generator=g)
    assert ((locations < 0) | (locations > 1)).any()
    out = ms_deform_attn_core(value, torch.tensor(SHAPES), locations, weights)
    assert out.shape == (b, lq, heads * head_dim)
    torch.testing.assert_close(out.double(), reference_core(value, SHAPES, locations, weights), atol=1e-5, rtol=1e-5)


def test_core_rejects_wrong_spatial_shapes():
    value = torch.randn(1, 10, 1, 2)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn_core(value, torch.tensor([[3, 3]]), torch.rand(1, 1, 1, 1, 1, 2), torch.ones(1, 1, 1, 1, 1))


def test_init_matches_reference():
    heads, levels, points = 8, 3, 4
    attn = MSDeformAttn(32, levels, heads, points)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    bias = attn.sampling_offsets.bias.view(heads, levels, points, 2)
    for h in range(heads):
        d = torch.tensor([math.cos(2 * math.pi * h / heads), math.sin(2 * math.pi * h / heads)])
        d = d / d.abs().max()
        for p in range(points):
            torch.testing.assert_close(bias[h, :, p], (d * (p + 1)).expand(levels, 2))
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0
    logits = attn.attention_weights(torch.randn(2, 5, 32)).view(2, 5, heads, -1)
    torch.testing.assert_close(logits.softmax(-1), torch.full_like(logits, 1 / (levels * points)))
    assert attn.value_proj.bias.abs().sum() == 0 and attn.output_proj.bias.abs().sum() == 0


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(30, 2, 8, 4)


def make_inputs(d_model, b=2, lq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    return (torch.randn(b, lq, d_model, generator=g), torch.rand(b, lq, len(SHAPES), 2, generator=g),
            torch.randn(b, s, d_model, generator=g), torch.tensor(SHAPES))


def probe_loss(maps):
    # a fixed random projection: the mean square of LayerNorm outputs is ~constant, so it would give ~no gradient
    g = torch.Generator().manual_seed(1)
    return sum((m.float() * torch.randn(m.shape, generator=g).to(m.device)).sum() for m in maps)


def assert_grads(attn):
    for lin in (attn.sampling_offsets, attn.attention_weights, attn.value_proj, attn.output_proj):
        for p in (lin.weight, lin.bias):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_msdeformattn_gradients_reach_every_projection():
    torch.manual_seed(0)
    attn = MSDeformAttn(16, len(SHAPES), 2, 3)
    query, ref, inp, shapes = make_inputs(16)
    out = attn(query, ref, inp, shapes)
    assert out.shape == query.shape
    out.square().sum().backward()
    # zero attention-weight matrix at init still gets a gradient through the softmax
    assert_grads(attn)


def test_padding_mask_hides_positions():
    torch.manual_seed(0)
    attn = MSDeformAttn(16, len(SHAPES), 2, 3)
    query, ref, inp, shapes = make_inputs(16)
    mask = torch.zeros(inp.shape[:2], dtype=torch.bool)
    mask[:, ::3] = True
    changed = inp.clone()
    changed[mask] = 100.0
    torch.testing.assert_close(attn(query, ref, inp, shapes, mask), attn(query, ref, changed, shapes, mask))
    assert not torch.allclose(attn(query, ref, inp, shapes), attn(query, ref, changed, shapes))


def test_sine_embedding_matches_detr_formula():
    h, w, f = 3, 5, 8
    pos = sine_position_embedding(h, w, f).view(h, w, 2 * f)
    i, j, k = 1, 4, 5  # k odd -> cos of dim_t[k] = 10000^(2*(k//2)/f)
    y, x = (i + 0.5) / h * 2 * math.pi, (j + 0.5) / w * 2 * math.pi
    dim_t = 10000 ** (2 * (k // 2) / f)
    assert pos[i, j, k].item() == pytest.approx(math.cos(y / dim_t), abs=1e-5)
    assert pos[i, j, f + k - 1].item() == pytest.approx(math.sin(x / dim_t), abs=1e-5)


@pytest.mark.parametrize("shapes", [[(8, 8), (4, 4), (2, 2)], [(6, 10), (3, 5), (2, 3)]])
def test_encoder_keeps_shapes_and_gets_gradients(shapes):
    torch.manual_seed(0)
    enc = DeformableEncoder(d_model=32, n_levels=3, n_heads=4, n_points=2, ffn_dim=64, layers=2)
    feats = [torch.randn(2, 32, h, w) for h, w in shapes]
    out = enc(feats)
    assert [o.shape for o in out] == [f.shape for f in feats]
    probe_loss(out).backward()
    for layer in enc.layers:
        assert_grads(layer.self_attn)
    # positions enter only through the query's zero-initialised offset/weight matrices: no gradient until a step
    assert enc.level_embed.grad.abs().sum() == 0
    torch.optim.SGD(enc.parameters(), lr=0.1).step()
    enc.zero_grad()
    probe_loss(enc(feats)).backward()
    assert enc.level_embed.grad.abs().sum() > 0


def test_encoder_level_count_mismatch():
    enc = DeformableEncoder(d_model=32, n_levels=3, n_heads=4, n_points=2, ffn_dim=64, layers=1)
    with pytest.raises(ValueError, match="3 levels, got 2"):
        enc([torch.randn(1, 32, 4, 4), torch.randn(1, 32, 2, 2)])


def test_encoder_under_cpu_autocast():
    torch.manual_seed(0)
    enc = DeformableEncoder(d_model=32, n_levels=2, n_heads=4, n_points=2, ffn_dim=64, layers=1).eval()
    feats = [torch.randn(1, 32, 6, 4), torch.randn(1, 32, 3, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(feats)
    ref = enc(feats)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and torch.isfinite(o).all()
        torch.testing.assert_close(o.float(), r, atol=0.1, rtol=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_encoder_on_cuda_with_autocast(dtype):
    torch.manual_seed(0)
    enc = DeformableEncoder(d_model=32, n_levels=2, n_heads=4, n_points=2, ffn_dim=64, layers=2).eval()
    feats = [torch.randn(2, 32, 12, 10), torch.randn(2, 32, 6, 5)]
    ref = enc(feats)
    enc, feats = enc.cuda(), [f.cuda() for f in feats]
    torch.testing.assert_close([o.cpu() for o in enc(feats)], ref, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=dtype):
        out = enc(feats)
    probe_loss(out).backward()
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.float().cpu(), r, atol=0.1, rtol=0.1)
    assert_grads(enc.layers[0].self_attn)
