"""BiCLIP network: shapes, gradients, conditioning changes the output, paper-size parameter counts."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_textguided.networks.biclip import BiCLIPNetwork
from nnunet_textguided.networks.blocks import GlobalSelfAttentionBlock, SliceEmbeddingAdapter


def tiny_backbone(deep_supervision=True):
    torch.manual_seed(0)
    return PlainConvUNet(1, 4, [8, 16, 32, 64], nn.Conv3d, 3, [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], 2, 4,
                         2, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
                         deep_supervision=deep_supervision)


class FixedConditioner:
    """Stands in for the frozen encoders: a fixed frozen linear map of each slice's mean intensity."""

    def __init__(self, dims):
        g = torch.Generator().manual_seed(0)
        self.proj = {n: torch.randn(1, e, generator=g) for n, e in dims.items()}
        self.override = None

    def __call__(self, x):
        m = x[:, 0].mean((-1, -2))[..., None]  # (B, D, 1)
        out = {n: m @ p for n, p in self.proj.items()}
        if self.override is not None:
            out = {n: self.override(v) for n, v in out.items()}
        return x, out


def make_net(streams=("image", "caption")):
    dims = {s: 32 for s in streams}
    net = BiCLIPNetwork(tiny_backbone(), dims, num_slices=16, bottleneck_grid=(4, 4, 4), bottleneck_channels=64)
    cond = FixedConditioner(dims)
    net.set_conditioner(cond)
    return net, cond


def test_shapes_and_deep_supervision():
    net, _ = make_net()
    out = net(torch.randn(2, 1, 16, 32, 32))
    assert [tuple(o.shape) for o in out] == [(2, 4, 16, 32, 32), (2, 4, 16, 16, 16), (2, 4, 8, 8, 8)]
    net.decoder.deep_supervision = False
    assert net(torch.randn(1, 1, 16, 32, 32)).shape == (1, 4, 16, 32, 32)


def test_net1_is_the_backbone():
    net = BiCLIPNetwork(tiny_backbone(), {}, 16, (4, 4, 4), 64)
    ref = tiny_backbone()
    x = torch.randn(1, 1, 16, 32, 32)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in ref.parameters())
    assert torch.equal(net(x)[0], ref(x)[0])


def test_conditioning_changes_the_output_and_gets_gradients():
    net, cond = make_net()
    x = torch.randn(1, 1, 16, 32, 32)
    y0 = net(x)[0]
    cond.override = lambda v: v + 1.0
    y1 = net(x)[0]
    assert not torch.allclose(y0, y1)
    y1.square().mean().backward()
    for name in ("image", "caption"):
        assert net.adapters[name].mlp[0].weight.grad.abs().sum() > 0
        assert net.adapters[name].slice_mix.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.attention.parameters())


def test_fusion_is_the_papers_concatenation_mlp():
    """fuse_bottleneck runs the clip half of the first fusion layer once per bottleneck slice: the result and every
    gradient equal the paper's form, MLP(concat(bottleneck features, CLIP map broadcast over H x W)) per voxel."""
    net, cond = make_net()
    net.double()  # float64: the two forms sum in different orders
    torch.manual_seed(1)
    feat = torch.randn(2, 64, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    _, emb = cond(torch.randn(2, 1, 16, 32, 32))
    emb = {n: e.double() for n, e in emb.items()}
    out = net.fuse_bottleneck(feat, emb)
    grads = torch.autograd.grad(out.square().sum(), [feat, *net.fuse.parameters(), *net.adapters.parameters()])

    clip = sum(net.adapters[n](emb[n]) for n in net.stream_names)  # (B, D_b, C)
    clip_map = clip.transpose(1, 2)[..., None, None].expand_as(feat)
    tokens = net.fuse(torch.cat((feat, clip_map), 1).flatten(2).transpose(1, 2))
    for block in net.attention:
        tokens = block(tokens)
    ref = tokens.transpose(1, 2).reshape(feat.shape)
    ref_grads = torch.autograd.grad(ref.square().sum(), [feat, *net.fuse.parameters(), *net.adapters.parameters()])
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_conditioner_is_not_a_submodule():
    net, cond = make_net()
    cond.frozen = nn.Linear(3, 3)
    assert not any("cond" in k for k in net.state_dict())
    assert len(list(net.parameters())) == len(list(net.backbone.parameters())) + sum(
        len(list(m.parameters())) for m in (net.adapters, net.fuse, net.attention))


@pytest.mark.parametrize("streams", [("image",), ("caption",), ("image", "caption")])
def test_ablation_streams(streams):
    net, _ = make_net(streams)
    assert set(net.adapters) == set(streams)
    assert net(torch.randn(1, 1, 16, 32, 32))[0].shape == (1, 4, 16, 32, 32)


def test_adapter_paper_parameter_count():
    """Synapse: MLP 768x192x1536, Conv1d 64 slices -> 4 (bottleneck depth), LayerNorm(1536)."""
    a = SliceEmbeddingAdapter(768, 1536, num_slices=64, out_depth=4)
    mlp = (768 * 192 + 192) + (192 * 1536 + 1536)
    residual = 768 * 1536  # E != C: bias-free projection residual
    conv = 64 * 4 + 4
    norm = 2 * 1536
    assert sum(p.numel() for p in a.parameters()) == mlp + residual + conv + norm == 1_627_076
    assert a(torch.randn(2, 64, 768)).shape == (2, 4, 1536)
    acdc = SliceEmbeddingAdapter(768, 768, num_slices=14, out_depth=3)  # identity residual
    assert sum(p.numel() for p in acdc.parameters()) == (768 * 192 + 192) + (192 * 768 + 768) + (14 * 3 + 3) + 2 * 768


def test_global_attention_block_matches_nnformer_bottleneck_size():
    """Synapse bottleneck: C 1536, 48 heads, window = whole 4x4x4 grid, MLP 4x, relative bias (2*4-1)^3 x 48."""
    b = GlobalSelfAttentionBlock(1536, 48, (4, 4, 4))
    expected = 2 * 2 * 1536 + (1536 * 4608 + 4608) + (1536 * 1536 + 1536) + 7 ** 3 * 48 \
        + (1536 * 6144 + 6144) + (6144 * 1536 + 1536)
    assert sum(p.numel() for p in b.parameters()) == expected == 28_347_984
    x = torch.randn(1, 64, 1536)
    assert b(x).shape == x.shape


def test_attention_uses_the_relative_bias():
    b = GlobalSelfAttentionBlock(32, 2, (2, 2, 2))
    x = torch.randn(1, 8, 32)
    y0 = b(x)
    with torch.no_grad():
        b.bias.table.add_(torch.randn_like(b.bias.table))
    assert not torch.allclose(y0, b(x))
