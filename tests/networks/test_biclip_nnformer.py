"""BiCLIP-nnFormer: fusion at nnFormer's bottleneck, fused attention layers copied from its last layer."""
from __future__ import annotations

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_textguided.evaluation.params import _placeholder_conditioning, build_for_counting, count_plans
from nnunet_textguided.presets import preset_plans
from nnunet_textguided.training.biclip import BiCLIPTrainer, BiCLIPTrainer_Net2_online, BiCLIPTrainer_online, nnFormerTrainer


@pytest.mark.parametrize("preset, grid, channels, slices", [("3d_nnformer_synapse", (4, 4, 4), 1536, 64),
                                                            ("3d_nnformer_acdc", (3, 5, 5), 768, 14)])
def test_paper_shapes(preset, grid, channels, slices):
    plans, name, dj = count_plans(BiCLIPTrainer, "paper", preset=preset)
    net, structures, cm, lm, n_in = build_for_counting(BiCLIPTrainer, plans, name, dj)
    assert tuple(net.backbone.grids[-1]) == grid and net.backbone.channels[-1] == channels
    emb = torch.empty(2, slices, 768, device="meta")
    assert net.adapters["image"](emb).shape == (2, grid[0], channels)  # Conv1d: crop slices -> bottleneck depth
    x = torch.empty(2, 1, *cm.patch_size, device="meta")
    with _placeholder_conditioning(net, {s: st.embed_dim for s, st in structures.items()}):
        assert net(x).shape == (2, lm.num_segmentation_heads, *cm.patch_size)
        skips = net.backbone.encoder(x)
        fused = net.fuse_bottleneck(skips[-1], {"image": emb, "caption": emb})
    assert fused.shape == (2, channels, *grid)


def tiny_network(trainer=BiCLIPTrainer):
    plans, name = preset_plans("3d_nnformer_tiny", {"spacing": [2.5, 1.25, 1.25], "modality": "CT"})
    pm = PlansManager(plans)
    cm = pm.get_configuration(name)
    cm.configuration["textguided"] = trainer.textguided_block(pm, cm)
    torch.manual_seed(0)
    return trainer.build_network_architecture(pm, cm, 1, 4, True), cm


def test_fused_attention_starts_as_the_last_bottleneck_layer_and_trains_on_its_own():
    net, cm = tiny_network(BiCLIPTrainer_Net2_online)
    last = net.backbone.bottleneck_blocks()[-1]
    a, b = net.attention
    for block in (a, b):
        for (k, p), q in zip(block.state_dict().items(), last.state_dict().values()):
            assert torch.equal(p, q), k
    # copies, not shared: distinct storage
    ptrs = {id(p) for p in last.parameters()}
    assert not ptrs & {id(p) for p in a.parameters()} and not ptrs & {id(p) for p in b.parameters()}
    assert not {p.data_ptr() for p in a.parameters()} & {p.data_ptr() for p in b.parameters()}

    net.train()
    out = net(torch.randn(2, 1, *cm.patch_size))
    sum(o.square().mean() for o in out).backward()
    for block in (a, b, last):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in block.named_parameters()
                   if "relative_position_bias_table" not in n)
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    diff = lambda m1, m2: any(not torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert diff(a, b) and diff(a, last) and diff(b, last)


def test_reset_after_loading_backbone_weights():
    net, _ = tiny_network()
    with torch.no_grad():
        for p in net.backbone.bottleneck_blocks()[-1].parameters():
            p.add_(1.0)  # as if pretrained nnFormer weights had been loaded
    net.reset_attention_from_bottleneck()
    last = net.backbone.bottleneck_blocks()[-1].state_dict()
    for block in net.attention:
        assert all(torch.equal(v, last[k]) for k, v in block.state_dict().items())


def test_net1_is_nnformer_alone():
    net, cm = tiny_network(nnFormerTrainer)
    assert not hasattr(net, "attention") and len(net.adapters) == 0
    x = torch.randn(1, 1, *cm.patch_size)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], net.backbone(x)[0])


def test_paper_mode_on_nnformer_reads_tables_through_positional_channels():
    """Offline (paper) mode on nnFormer: the tables of whole slices replace the online encoders; a patch that
    is a whole volume gets exactly the online embeddings, so both modes give the same output."""
    import numpy as np

    from nnunet_textguided.data.position_channels import append_position_channels
    offline, cm = tiny_network(BiCLIPTrainer)
    online, _ = tiny_network(BiCLIPTrainer_online)
    online.load_state_dict(offline.state_dict())
    volume = torch.randn(1, *cm.patch_size)
    offline.conditioner.set_tables({0: offline.conditioner.compute_tables(volume)})
    x = torch.from_numpy(np.asarray(append_position_channels(volume.numpy(), 0)))[None]
    offline.eval(), online.eval()
    with torch.no_grad():
        torch.testing.assert_close(offline(x)[0], online(volume[None])[0], atol=1e-4, rtol=1e-4)
