"""nnFormer: paper-size shapes, parameter and FLOP counts (meta device), nnU-Net deep-supervision scales,
a tiny CPU configuration through get_network_from_plans, the bottleneck blocks BiCLIP copies, checkpoints."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnunet_textguided.networks.nnformer import NnFormer, SwinBlock, load_nnformer_checkpoint, relative_position_index

CLASS_NAME = "nnunet_textguided.networks.nnformer.NnFormer"
SYNAPSE = dict(crop_size=[64, 128, 128], embed_dim=192, depths=[2, 2, 2, 2], num_heads=[6, 12, 24, 48],
               patch_size=[2, 4, 4], window_size=[4, 4, 8, 4])
ACDC = dict(crop_size=[14, 160, 160], embed_dim=96, depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24], patch_size=[1, 4, 4],
            window_size=[[3, 5, 5], [3, 5, 5], [7, 10, 10], [3, 5, 5]],
            down_stride=[[1, 4, 4], [1, 8, 8], [2, 16, 16], [4, 32, 32]])
# the CPU preset (plans/3d_tiny crop): grids 16^3 -> 8^3 -> 4^3 -> 2^3, shifted windows in stages 0 and 1
TINY = dict(crop_size=[16, 32, 32], embed_dim=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], patch_size=[1, 2, 2],
            window_size=[4, 4, 4, 2], strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]])
# anisotropic like ACDC: padded + shifted windows (depth 6 in windows of 4), odd merge 3 -> 1, output_padding 1
TINY_ANISO = dict(crop_size=[6, 16, 16], embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                  patch_size=[1, 2, 2], window_size=[4, 4, [3, 2, 2], 1],
                  down_stride=[[1, 2, 2], [1, 4, 4], [2, 8, 8], [4, 16, 16]])


def configuration_manager(arch_kwargs: dict) -> ConfigurationManager:
    """A plans configuration naming the network, with arch_kwargs that went through JSON."""
    return ConfigurationManager({"patch_size": arch_kwargs["crop_size"], "architecture": {
        "network_class_name": CLASS_NAME, "arch_kwargs": json.loads(json.dumps(arch_kwargs)),
        "_kw_requires_import": []}})


def nnunet_target_shapes(cm: ConfigurationManager) -> list[tuple[int, ...]]:
    """Target shapes nnU-Net trains each deep-supervision output against: its own scale rule and transform."""
    scales = nnUNetTrainer._get_deep_supervision_scales(SimpleNamespace(enable_deep_supervision=True,
                                                                        configuration_manager=cm))
    seg = torch.zeros(1, *cm.patch_size, dtype=torch.uint8)
    return [tuple(t.shape[1:]) for t in DownsampleSegForDSTransform(scales)._apply_to_segmentation(seg)]


def with_strides(cfg: dict) -> dict:
    strides = NnFormer.deep_supervision_strides(cfg["patch_size"], len(cfg["depths"]), cfg.get("down_stride"))
    return dict(cfg, strides=strides)


def meta_net(cfg: dict, num_classes: int, deep_supervision: bool = True) -> NnFormer:
    with torch.device("meta"):
        return NnFormer(1, num_classes, deep_supervision=deep_supervision, **cfg)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def macs_like_fvcore(net: NnFormer, crop) -> float:
    """GMACs as fvcore counts them (the nnFormer/UNETR++ tables): FlopCounterMode's FLOPs / 2 (it counts a
    multiply-add as 2) plus fvcore's 5 per LayerNorm element, which FlopCounterMode does not count."""
    ln_elements = []
    hooks = [m.register_forward_hook(lambda m, i, o: ln_elements.append(i[0].numel()))
             for m in net.modules() if isinstance(m, nn.LayerNorm)]
    counter = FlopCounterMode(display=False)
    with torch.device("meta"), counter:
        net(torch.empty(1, 1, *crop))
    for h in hooks:
        h.remove()
    return (counter.get_total_flops() / 2 + 5 * sum(ln_elements)) / 1e9


@pytest.mark.parametrize("cfg, grids, channels", [
    (SYNAPSE, [(32, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4)], [192, 384, 768, 1536]),
    (ACDC, [(14, 40, 40), (14, 20, 20), (7, 10, 10), (3, 5, 5)], [96, 192, 384, 768]),
], ids=["synapse", "acdc"])
def test_paper_shapes_and_deep_supervision_match_nnunet(cfg, grids, channels):
    cm = configuration_manager(with_strides(cfg))
    net = meta_net(cm.network_arch_init_kwargs, num_classes=9)
    x = torch.empty(2, 1, *cfg["crop_size"], device="meta")
    skips = net.encoder(x)
    assert [tuple(s.shape) for s in skips] == [(2, c, *g) for c, g in zip(channels, grids)]
    outs = net.decoder(skips)
    assert [tuple(o.shape[2:]) for o in outs] == nnunet_target_shapes(cm)
    assert all(o.shape[:2] == (2, 9) for o in outs)
    net.decoder.deep_supervision = False
    assert net(x).shape == (2, 9, *cfg["crop_size"])
    # the bottleneck is global self-attention (window = whole grid, no shift) in both paper configurations
    assert all(b.window == grids[-1] and b.shift == (0, 0, 0) for b in net.bottleneck_blocks())


def test_deep_supervision_strides_rule():
    assert NnFormer.deep_supervision_strides(SYNAPSE["patch_size"], 4) == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert NnFormer.deep_supervision_strides(ACDC["patch_size"], 4, ACDC["down_stride"]) == \
        [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    with pytest.raises(ValueError, match="strides"):
        meta_net(dict(SYNAPSE, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]), 9)


def test_synapse_parameters_and_flops_match_the_paper():
    """Authors' Synapse model: 14 classes, deep supervision (3 heads). Paper: 150.5 M params, 213.4 GFLOPs."""
    net = meta_net(SYNAPSE, num_classes=14)
    n = count(net)
    print(f"\nSynapse (14 classes, 3 heads): {n / 1e6:.3f} M params, {(n - count(net.decoder.final[1:])) / 1e6:.3f} M "
          "with one head")
    assert n == 150_054_210
    macs = macs_like_fvcore(net, SYNAPSE["crop_size"])
    print(f"Synapse GMACs (fvcore convention) {macs:.2f}")
    assert macs == pytest.approx(213.4, abs=0.05)


def test_acdc_parameters_and_flops():
    """Authors' ACDC model: 4 classes, no deep supervision (their file builds only final[0])."""
    net = meta_net(ACDC, num_classes=4, deep_supervision=False)
    n, extra_heads = count(net), count(net.decoder.final[1:])
    macs = macs_like_fvcore(net, ACDC["crop_size"])
    print(f"\nACDC (4 classes): {n / 1e6:.3f} M params with all heads, {(n - extra_heads) / 1e6:.3f} M with the "
          f"authors' single head; {macs:.2f} GMACs (fvcore convention)")
    assert (n, n - extra_heads) == (37_197_072, 37_160_200)


def test_relative_position_index_is_nnformers():
    idx = relative_position_index((2, 3, 3))
    coords = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(3), indexing="ij")).flatten(1)
    i, j = 5, 11
    dd, dh, dw = (coords[:, i] - coords[:, j]).tolist()
    assert idx[i, j] == (dd + 1) * (3 * 3 - 1) + (dh + 2) * (2 * 3 - 1) + (dw + 2)
    # not injective, unlike Swin's: for window 4 the offsets (0,0,0) and (1,-2,3) share one bias entry
    idx4 = relative_position_index((4, 4, 4))
    assert idx4.unique().numel() == 115
    token = (1, 0, 3), (0, 2, 0)  # offset (1, -2, 3)
    flat = [d * 16 + h * 4 + w for d, h, w in token]
    assert idx4[flat[0], flat[1]] == idx4[0, 0]
    for window in [(4, 4, 4), (8, 8, 8), (3, 5, 5), (7, 10, 10)]:  # every paper window stays inside its table
        assert relative_position_index(window).max() < (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)


@pytest.mark.parametrize("masked, reached", [(True, {0, 1}), (False, {0, 1, 6, 7})])
def test_shifted_window_mask(masked, reached):
    """Grid 1x1x8, window 4, shift 2: windows {2..5} and {6,7,0,1}; the mask splits the wrapped window."""
    torch.manual_seed(0)
    block = SwinBlock(8, (1, 1, 8), 2, (1, 1, 4), shifted=True, shifted_window_mask=masked).eval()
    x = torch.randn(1, 8, 8)
    y = x.clone()
    y[0, 0] += torch.randn(8)  # not a constant: LayerNorm would remove that
    changed = (block(x) - block(y)).abs().sum(-1)[0] > 1e-6
    assert set(torch.nonzero(changed).flatten().tolist()) == reached


def test_tiny_through_get_network_from_plans_trains_every_parameter():
    cm = configuration_manager(dict(TINY, drop_path_rate=0.0))  # a dropped residual branch gets no gradient
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=True)
    assert isinstance(net, NnFormer) and net.decoder.deep_supervision
    assert all(m.bias.abs().sum() == 0 for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)))
    torch.manual_seed(0)
    outs = net(torch.randn(1, 1, *TINY["crop_size"]))
    assert [tuple(o.shape[2:]) for o in outs] == nnunet_target_shapes(cm)
    sum(o.square().mean() for o in outs).backward()
    assert not [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    net.decoder.deep_supervision = False
    with torch.no_grad():
        assert net(torch.randn(1, 1, *TINY["crop_size"])).shape == (1, 3, *TINY["crop_size"])


def test_tiny_anisotropic_matches_nnunet_scales():
    cfg = with_strides(TINY_ANISO)
    net = NnFormer(1, 2, **cfg)
    assert net.grids == [(6, 8, 8), (6, 4, 4), (3, 2, 2), (1, 1, 1)]
    assert net.encoder.layers[0].blocks[1].shift == (2, 2, 2)  # depth 6 padded to 8 and shifted
    with torch.no_grad():
        outs = net(torch.randn(1, 1, *cfg["crop_size"]))
    assert [tuple(o.shape[2:]) for o in outs] == nnunet_target_shapes(configuration_manager(cfg))
    assert all(torch.isfinite(o).all() for o in outs)


def test_bottleneck_block_copy_works_standalone():
    torch.manual_seed(0)
    net = NnFormer(1, 3, **TINY).eval()
    blocks = net.bottleneck_blocks()
    assert len(blocks) == 2 and all(isinstance(b, SwinBlock) for b in blocks)
    copied = copy.deepcopy(blocks[-1])
    tokens = torch.randn(2, 8, net.channels[-1])  # bottleneck 2x2x2 x 192
    with torch.no_grad():
        assert torch.equal(copied(tokens), blocks[-1](tokens))
        assert copied(tokens).shape == tokens.shape
    # the copy owns its weights: updating it leaves the bottleneck alone
    with torch.no_grad():
        copied.attn.qkv.weight.add_(1.0)
    assert not torch.equal(copied.attn.qkv.weight, blocks[-1].attn.qkv.weight)


def to_authors_keys(state: dict) -> dict:
    """Our names -> the authors' (DataParallel-prefixed), the inverse of the loader's mapping."""
    out = {}
    for k, v in state.items():
        k = k.replace(".upsample.", ".Upsample.")
        k = "model_down." + k[len("encoder."):] if k.startswith("encoder.") else k
        k = "final." + k[len("decoder.final."):] if k.startswith("decoder.final.") else k
        out["module." + k] = v
    return out


def test_checkpoint_loading_reports_everything(tmp_path):
    torch.manual_seed(0)
    source = NnFormer(1, 3, **TINY)
    authors = to_authors_keys(source.state_dict())
    assert any(".Upsample." in k for k in authors) and any(k.startswith("module.model_down.") for k in authors)
    torch.save({"state_dict": authors, "epoch": 1}, tmp_path / "model_final_checkpoint.model")
    torch.manual_seed(1)
    target = NnFormer(1, 3, **TINY).eval()
    report = load_nnformer_checkpoint(target, tmp_path / "model_final_checkpoint.model")
    assert report == {"matched": len(authors), "missing": [], "unexpected": [], "shape_mismatch": []}
    x = torch.randn(1, 1, *TINY["crop_size"])
    with torch.no_grad():
        assert torch.equal(target(x)[0], source.eval()(x)[0])

    broken = dict(authors)
    del broken["module.model_down.norm3.weight"]
    broken["module.model_down.extra.weight"] = torch.zeros(3)
    broken["module.final.0.up.weight"] = torch.zeros(24, 14, 1, 2, 2)  # trained with 14 classes
    torch.save(broken, tmp_path / "plain.pth")
    report = load_nnformer_checkpoint(NnFormer(1, 3, **TINY), tmp_path / "plain.pth")
    assert report["matched"] == len(authors) - 2
    assert report["missing"] == ["encoder.norm3.weight"]
    assert report["unexpected"] == ["module.model_down.extra.weight"]
    assert report["shape_mismatch"] == ["module.final.0.up.weight -> decoder.final.0.up.weight: "
                                        "(24, 14, 1, 2, 2) vs (24, 3, 1, 2, 2)"]


def test_rejects_unsupported_configurations():
    with pytest.raises(ValueError, match="3D only"):
        NnFormer(1, 2, conv_op="torch.nn.modules.conv.Conv2d", **TINY)
    with pytest.raises(ValueError, match="divisible"):
        NnFormer(1, 2, **dict(TINY, crop_size=[10, 32, 32]))
    with pytest.warns(UserWarning, match="kernel_sizes"):
        NnFormer(1, 2, kernel_sizes=[[3, 3, 3]] * 4, conv_op="torch.nn.Conv3d", **TINY)
    net = NnFormer(1, 2, **TINY)
    with pytest.raises(ValueError, match="crop"):
        net(torch.randn(1, 1, 16, 32, 48))
