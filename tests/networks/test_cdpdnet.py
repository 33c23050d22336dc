"""CDPDNet network: shapes, gradients, text and task conditioning, label routing, ablations, errors, the
shared window/FiLM blocks, and the paper configuration on the meta device (shape and parameter counts)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from torch import nn

from nnunet_textguided.networks.blocks import CrossWindowBlock, RelativePositionBias3d, TextFiLM, WindowAttention
from nnunet_textguided.networks.blocks.windows import relative_position_index
from nnunet_textguided.networks.cdpdnet import CDPDNet

K, T, E = 5, 3, 12          # labels, tasks, raw text width
PATCH = (16, 32, 32)
DINO_DIM, DINO_HW = 24, 3   # fake ViT token grid 3 x 3


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Intra-op threads thrash on the 2-core test machines: this file took 68 s with 2 threads, 5 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encoder(features=(8, 16, 32, 64), kernels=3, strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))):
    return PlainConvEncoder(1, len(features), list(features), nn.Conv3d, kernels, [list(s) for s in strides], 2,
                            conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                            nonlin=nn.LeakyReLU, nonlin_kwargs={"negative_slope": 1e-2, "inplace": True},
                            return_skips=True)


class FakeDino:
    """Stands in for frozen DINOv2: k hidden states (B, DINO_DIM, S, 3, 3), fixed functions of the input."""

    def __init__(self, k=3):
        g = torch.Generator().manual_seed(1)
        self.w = [torch.randn(DINO_DIM, generator=g) for _ in range(k)]
        self.b = [torch.randn(DINO_DIM, generator=g) for _ in range(k)]
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        pooled = F.adaptive_avg_pool3d(x[:, :1], (x.shape[2], DINO_HW, DINO_HW))  # (B, 1, S, 3, 3)
        feats = [torch.tanh(pooled * w.view(1, -1, 1, 1, 1) + b.view(1, -1, 1, 1, 1)) for w, b in zip(self.w, self.b)]
        return x, {"dino": feats}


def make_net(features=(8, 16, 32, 64), conditioner=True, **kwargs):
    torch.manual_seed(0)
    # the authors' initialisation by default: at identity init the new branches contribute nothing yet
    opts = dict(text_dim=6, dino_dim=DINO_DIM, dino_stages=(1, 2), slice_pool=4, patch_size=PATCH,
                identity_init=False)
    opts.update(kwargs)
    net = CDPDNet(encoder(features), K, torch.randn(K, E), torch.randn(T, E), **opts)
    if conditioner and net.use_dino:
        net.set_conditioner(FakeDino())
    return net


def inputs(b=2):
    return torch.randn(b, 1, *PATCH, generator=torch.Generator().manual_seed(2))


def trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------- network behaviour

def test_shape_and_gradients_reach_trainable_parts():
    net = make_net().train()
    net.set_batch_tasks(torch.tensor([0, 2]))
    out = net(inputs())
    assert out.shape == (2, K, *PATCH)
    out.float().square().mean().backward()
    # unused: nnU-Net's decoder builds deep-supervision heads it does not run without deep supervision
    unused = {f"decoder.seg_layers.{i}.{n}" for i in range(len(net.decoder.seg_layers) - 1) for n in ("weight", "bias")}
    missing = [n for n, p in net.named_parameters() if p.grad is None and n not in unused]
    assert not missing, missing
    for group in ("encoder", "organ_proj", "task_proj", "films", "dino_adaptors", "fusions", "ttpg", "decoder"):
        grads = [p.grad.abs().sum() for n, p in net.named_parameters() if n.startswith(group) and p.grad is not None]
        assert grads and sum(grads) > 0, group
    # texts are buffers: in the checkpoint, not optimised; the conditioner is not in the state dict
    state = net.state_dict()
    assert "organ_embeddings" in state and "task_embeddings" in state
    assert "organ_embeddings" not in dict(net.named_parameters())
    assert not any("dino." in k or "conditioner" in k for k in state)


@torch.no_grad()
def test_organ_texts_change_the_output():
    net = make_net().eval()
    x = inputs()
    before = net(x)
    net.organ_embeddings.add_(torch.randn(K, E))
    assert not torch.allclose(before, net(x), atol=1e-5)


@torch.no_grad()
def test_dino_features_change_the_output():
    net = make_net().eval()
    x = inputs()
    before = net(x)
    net.conditioner.b = [b + 1 for b in net.conditioner.b]
    assert not torch.allclose(before, net(x), atol=1e-5)


@torch.no_grad()
def test_a_samples_task_changes_its_output_only():
    net = make_net().eval()
    x = inputs()
    net.set_batch_tasks(torch.tensor([0, 1]))
    a = net(x)
    net.set_batch_tasks(torch.tensor([0, 2]))
    b = net(x)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    assert not torch.allclose(a[1], b[1], atol=1e-4)


@torch.no_grad()
def test_each_sample_uses_its_own_task_not_the_first_samples():
    net = make_net().eval()
    x = inputs()
    outs = {}
    for tasks in ((1, 2), (1, 1), (2, 2)):
        net.set_batch_tasks(torch.tensor(tasks))
        outs[tasks] = net(x)
    torch.testing.assert_close(outs[(1, 2)][1], outs[(2, 2)][1], rtol=0, atol=1e-6)
    assert not torch.allclose(outs[(1, 2)][1], outs[(1, 1)][1], atol=1e-4)  # the authors' task_id[0] behaviour


@torch.no_grad()
def test_label_routing_equals_per_task_passes_gathered():
    net = make_net().eval()
    x = inputs()
    assignment = [2, 0, 1, 0, 2]
    stage_calls = []
    hook = net.encoder.stages[0].register_forward_hook(lambda *a: stage_calls.append(1))
    net.set_label_tasks(assignment)
    routed = net(x)
    assert len(stage_calls) == 1  # the encoder runs once, TTPG + decoder once per task
    hook.remove()
    net.set_label_tasks(None)
    per_task = {}
    for t in set(assignment):
        net.set_batch_tasks(torch.full((2,), t))
        per_task[t] = net(x)
    net.set_batch_tasks(None)
    expected = torch.stack([per_task[t][:, k] for k, t in enumerate(assignment)], 1)
    torch.testing.assert_close(routed, expected, rtol=0, atol=1e-6)
    # with nnU-Net's deep-supervision toggle on, every output scale is gathered the same way
    net.decoder.deep_supervision = True
    net.set_label_tasks(assignment)
    routed_ds = net(x)
    assert [o.shape[2:] for o in routed_ds] == [PATCH, (8, 16, 16), (4, 8, 8)]
    torch.testing.assert_close(routed_ds[0], routed, rtol=0, atol=1e-6)
    net.decoder.deep_supervision = False
    net.set_label_tasks(None)
    # batch tasks win over the label assignment; neither set -> task 0
    net.set_label_tasks(assignment)
    net.set_batch_tasks(torch.tensor([1, 1]))
    torch.testing.assert_close(net(x), per_task[1], rtol=0, atol=1e-6)
    net.set_batch_tasks(None)
    net.set_label_tasks(None)
    torch.testing.assert_close(net(x), per_task[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("alignment, dino, ttpg", list(itertools.product([False, True], repeat=3)))
def test_ablations_build_only_their_modules_and_run(alignment, dino, ttpg):
    net = make_net(use_alignment=alignment, use_dino=dino, use_ttpg=ttpg, conditioner=False)
    names = [n for n, _ in net.named_parameters()]
    for prefix, on in (("organ_proj", alignment), ("films", alignment), ("dino_adaptors", dino), ("fusions", dino),
                       ("task_proj", ttpg), ("ttpg", ttpg)):
        assert any(n.startswith(prefix) for n in names) == on, prefix
    assert net.decoder.transpconvs[0].in_channels == 64 + ttpg
    groups = net.parameter_groups()
    assert sum(groups.values()) == trainable(net)
    if dino:
        with pytest.raises(RuntimeError, match="conditioner"):
            net(inputs())
        net.set_conditioner(FakeDino())
    net.set_batch_tasks(torch.tensor([2, 1]))  # ignored without TTPG
    out = net.eval()(inputs())
    assert out.shape == (2, K, *PATCH)
    if not ttpg:
        net.set_batch_tasks(None)
        torch.testing.assert_close(net(inputs()), out, rtol=0, atol=0)


def test_bottleneck_film_sharing():
    # deepest skip 32 vs bottleneck 64: no sharing possible -> one FiLM per skip + the bottleneck's
    assert len(make_net().films) == 4 and not make_net().share_bottleneck_film
    # equal widths: the authors' deep_film_block[-1] serves both, unless switched off
    shared = make_net(features=(8, 16, 32, 32))
    assert shared.share_bottleneck_film and len(shared.films) == 3
    own = make_net(features=(8, 16, 32, 32), share_bottleneck_film=False)
    assert len(own.films) == 4
    assert trainable(own) - trainable(shared) == 2 * (K * 6 * 32 + 32)
    with torch.no_grad():
        assert shared.eval()(inputs()).shape == (2, K, *PATCH)


def test_dino_features_are_matched_from_the_deep_end():
    net = make_net().eval()
    seen = []
    for i, adaptor in enumerate(net.dino_adaptors):
        adaptor.register_forward_hook(lambda m, args, out, i=i: seen.append((i, args[0])))
    x = inputs()
    _, cond = net.conditioner(x)
    with torch.no_grad():
        net(x)
    assert [i for i, _ in seen] == [0, 1]
    assert torch.equal(seen[0][1], cond["dino"][1]) and torch.equal(seen[1][1], cond["dino"][2])


def test_errors_are_clear():
    with pytest.raises(ValueError, match="slice_pool"):
        make_net(slice_pool=17)
    with pytest.raises(ValueError, match="divisible by fusion_heads"):
        make_net(fusion_heads=3)
    with pytest.raises(ValueError, match="patch_size"):
        make_net(patch_size=None)
    with pytest.raises(ValueError, match="one text per output label"):
        CDPDNet(encoder(), K, torch.randn(K + 1, E), torch.randn(T, E), use_dino=False)
    net = make_net()
    with pytest.raises(ValueError, match="out of range"):
        net.set_batch_tasks(torch.tensor([0, T]))
    with pytest.raises(ValueError, match="out of range"):
        net.set_label_tasks([0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match="one task per label"):
        net.set_label_tasks([0, 1])
    net.set_batch_tasks(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="batch of 2"):
        net(inputs())
    net.set_batch_tasks(None)
    with pytest.raises(ValueError, match="slice_pool 4 > S = 2"):
        net.set_conditioner(lambda x: (x, {"dino": [torch.zeros(2, DINO_DIM, 2, 3, 3)] * 3}))
        net(inputs())
    net.set_conditioner(lambda x: (x, {"dino": [torch.zeros(2, DINO_DIM, 16, 3, 3)]}))
    with pytest.raises(ValueError, match="needs 2 hidden states"):
        net(inputs())
    with pytest.raises(ValueError, match="built for grid"):
        net.set_conditioner(FakeDino())
        net(torch.randn(2, 1, 16, 32, 16))


# ---------------------------------------------------------------- shared blocks

def test_text_film_is_eq6():
    torch.manual_seed(0)
    film = TextFiLM(channels=3, num_texts=2, text_dim=4)
    feats, texts = torch.randn(2, 3, 2, 2, 2), torch.randn(2, 4)
    t = texts.reshape(-1)
    gamma = film.gamma.weight @ t + film.gamma.bias
    beta = film.beta.weight @ t + film.beta.bias
    torch.testing.assert_close(film(feats, texts), gamma.view(1, 3, 1, 1, 1) * feats + beta.view(1, 3, 1, 1, 1))
    # per-sample texts (B, K, D) give the same as the shared ones when identical
    torch.testing.assert_close(film(feats, texts.expand(2, 2, 4)), film(feats, texts))
    assert sum(p.numel() for p in film.parameters()) == 2 * (2 * 4 * 3 + 3)


def test_window_cross_attention_is_projected_attention():
    torch.manual_seed(0)
    attn = WindowAttention(8, (2, 2, 2), num_heads=2, mode="cross", qkv_bias=False, index="swin")
    assert attn.q.bias is None and attn.kv.bias is None and not hasattr(attn, "qkv")
    x, query = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    q = attn.q(query).view(3, 8, 2, 4).transpose(1, 2)
    k, v = attn.kv(x).view(3, 8, 2, 2, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + attn.relative_bias()[None], -1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(3, 8, 8))
    torch.testing.assert_close(attn(x, query), expected)


def test_swin_index_is_injective_and_nnformer_index_is_kept():
    swin = relative_position_index((3, 3, 3), "swin")
    assert swin.unique().numel() == 5 ** 3 and int(swin.max()) == 5 ** 3 - 1
    assert torch.equal(relative_position_index((2, 3, 4), "swin"), RelativePositionBias3d((2, 3, 4), 1).index)
    assert relative_position_index((4, 4, 4)).unique().numel() == 115  # nnFormer's, the default
    with pytest.raises(ValueError):
        relative_position_index((3, 3, 3), "other")


def test_cross_window_block_residual_is_the_cnn_path():
    torch.manual_seed(0)
    block = CrossWindowBlock(8, (4, 4, 4), 2, (3, 3, 3), shifted=True, qkv_bias=False)
    assert block.attn_mask is not None and block.shift == (1, 1, 1)
    x, q = torch.randn(2, 64, 8), torch.randn(2, 64, 8)
    out = block(x, q)
    assert out.shape == x.shape
    # queries steer the attention, but x is the residual stream: zero attention/MLP output gives x back
    for p in (block.attn.proj, block.mlp.fc2):
        nn.init.zeros_(p.weight)
        nn.init.zeros_(p.bias)
    torch.testing.assert_close(block(x, q), x)


# ---------------------------------------------------------------- paper configuration (meta device)

PAPER_FEATURES = [32, 64, 128, 256, 320, 320]
PAPER_KERNELS = [[1, 3, 3]] + [[3, 3, 3]] * 5
PAPER_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]


def paper_counts(labels=32, tasks=11, e=512, d=256, dino=768, pool=14, heads=4, window=3) -> dict[str, int]:
    """Trainable parameters of the paper configuration, derived per module group from the layer shapes."""
    def conv(cin, cout, k):  # conv with bias + InstanceNorm(affine)
        return cin * cout * math.prod(k) + cout + 2 * cout

    def film(c, texts):
        return 2 * (texts * d * c + c)

    f, ks = PAPER_FEATURES, PAPER_KERNELS
    enc, cin = 0, 1
    for c, k in zip(f, ks):
        enc += conv(cin, c, k) + conv(c, c, k)
        cin = c
    fused = f[2:5]
    adaptors = sum(dino * pool + dino + dino * c * 27 + c + 2 * c for c in fused)
    table = (2 * window - 1) ** 3 * heads

    def block(c):  # norm1, q, kv (no bias), proj, bias table, norm2, MLP 4x
        return 2 * c + c * c + 2 * c * c + (c * c + c) + table + 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c)

    fusion = sum(2 * block(c) + 2 * c for c in fused)  # two blocks + the output LayerNorm
    c, ct = f[-1], f[-1] + tasks
    ttpg = (conv(c, tasks, [3] * 3) + conv(tasks, tasks, [3] * 3) + film(tasks, tasks)
            + conv(ct, ct // 4, [3] * 3) + conv(ct // 4, ct // 4, [3] * 3) + conv(ct // 4, tasks, [3] * 3))
    dec, below = 0, c + 1
    for s in range(1, len(f)):
        skip, stride, k = f[-(s + 1)], PAPER_STRIDES[-s], ks[-(s + 1)]
        dec += below * skip * math.prod(stride) + skip + conv(2 * skip, skip, k) + conv(skip, skip, k)
        dec += skip * labels + labels  # 1x1 head (nnU-Net builds one per stage)
        below = skip
    return {"encoder": enc, "text_projections": 2 * (e * d + d),
            "alignment": sum(film(ch, labels) for ch in f[:-1]),  # bottleneck shares the 320 skip's FiLM
            "dino_adaptors": adaptors, "fusion": fusion, "ttpg": ttpg, "decoder": dec}


def test_paper_configuration_on_meta():
    with torch.device("meta"):
        enc = encoder(PAPER_FEATURES, PAPER_KERNELS, PAPER_STRIDES)
        net = CDPDNet(enc, 32, torch.randn(32, 512), torch.randn(11, 512), patch_size=(96, 96, 96))
    assert net.organ_embeddings.is_meta and all(p.is_meta for p in net.parameters())
    assert [net.grids[s] for s in (2, 3, 4)] == [(48, 24, 24), (24, 12, 12), (12, 6, 6)]
    assert net.share_bottleneck_film and len(net.films) == 5
    hidden = [torch.empty(1, 768, 96, 7, 7, device="meta") for _ in range(4)]  # last four DINOv2 blocks
    net.set_conditioner(lambda x: (x, {"dino": hidden}))
    net.set_batch_tasks(torch.tensor([6]))
    out = net(torch.empty(1, 1, 96, 96, 96, device="meta"))
    assert out.shape == (1, 32, 96, 96, 96)
    groups, expected = net.parameter_groups(), paper_counts()
    total = trainable(net)
    print(f"\nCDPDNet paper configuration, trainable parameters: {total:,}")
    for name, n in groups.items():
        print(f"  {name:17s} {n:>12,}")
    assert groups == expected
    assert total == sum(expected.values())
    # the five 1x1 heads exist for nnU-Net's deep-supervision toggle; only the last one runs here
    assert sum(p.numel() for p in net.decoder.seg_layers[-1].parameters()) == 32 * 32 + 32


def test_identity_init_starts_neutral_and_then_learns_from_dino():
    net = make_net(identity_init=True).train()
    assert all(torch.allclose(f.gamma.bias, torch.ones_like(f.gamma.bias)) for f in net.films)
    x = inputs()
    net.set_batch_tasks(torch.tensor([0, 1]))
    # at the start the fusion adds nothing: other DINO features give the same output
    other = FakeDino()
    other.w = [w + 1 for w in other.w]
    with torch.no_grad():
        a = net(x)
        net.set_conditioner(other)
        b = net(x)
        net.set_conditioner(FakeDino())
    assert torch.allclose(a, b, atol=1e-6)
    # one SGD step later the DINO branch receives gradient
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        net(x).float().square().mean().backward()
        opt.step()
    adaptor = sum(p.grad.abs().sum() for p in net.dino_adaptors.parameters())
    assert adaptor > 0
