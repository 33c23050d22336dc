"""`nnunet-textguided params`: counts equal a direct sum(numel) of the trained network, paper sizes on meta."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_textguided.conditioning.slices import get_encoder
from nnunet_textguided.encoders.structure import encoder_structure
from nnunet_textguided.evaluation.params import count, count_plans, main
from nnunet_textguided.networks.blocks import SliceEmbeddingAdapter
from nnunet_textguided.settings import BiCLIPSettings, CDPDNetSettings, MPTPNSettings, TGCNetSettings
from nnunet_textguided.training import trainer_classes
from nnunet_textguided.training.biclip import (BiCLIPTrainer, BiCLIPTrainer_Net1, BiCLIPTrainer_Net2,
                                               BiCLIPTrainer_Net4, BiCLIPTrainer_online, nnFormerTrainer)

#: TGC-Net's text / alignment ablations only drop modules inside one network: its two image-path variants stand
#: for them (one without a CNN branch, one without any image tower)
BASE_TRAINERS = [t for t in trainer_classes() if t.schedule_of is None and (
    not t.__name__.startswith("TGCNetTrainer_") or t.__name__ in ("TGCNetTrainer_noSSE", "TGCNetTrainer_CNNonly"))]


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("trainer", BASE_TRAINERS, ids=lambda t: t.__name__)
def test_tiny_counts_match_the_network_nnunet_trains(trainer):
    report = count(trainer, "tiny")
    plans, name, dataset_json = count_plans(trainer, "tiny")
    pm = PlansManager(plans)
    cm = pm.get_configuration(name)
    cm.configuration["textguided"] = trainer.textguided_block(pm, cm, None, dataset_json)
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads
    net = trainer.build_network_architecture(pm, cm, 1, heads, False)  # what nnUNetv2_train builds
    extra = trainer.build_training_only_modules(cm.configuration["textguided"], net)  # optimised beside it
    n_extra = numel(extra) if extra is not None else 0
    assert report.trainable == sum(p.numel() for p in net.parameters() if p.requires_grad) + n_extra
    assert report.training_only >= n_extra
    assert report.patch_size == list(cm.patch_size)
    assert report.trainable - report.training_only + report.frozen_in_network == numel(net)
    specs = cm.configuration["textguided"]["encoders"]
    assert set(report.encoders) == set(specs)
    use = cm.configuration["textguided"].get("encoder_use", {})

    def used(spec) -> int:  # the towers the method runs (TGC-Net's image role: CLIP's image tower only)
        towers = use.get(spec, {}).get("towers")
        return encoder_structure(spec).num_parameters(towers) if towers else numel(get_encoder(spec))

    for spec, row in report.encoders.items():
        assert row["params"] == used(spec)
        if spec.startswith("tiny-") and use.get(spec, {}).get("towers") == ["image"]:
            assert row["params"] == numel(get_encoder(spec).model.visual)
    needed = [s for s in specs if report.encoders[s]["at_inference"]]  # label-prompt encoders: buffers instead
    assert report.inference == numel(net) + sum(used(s) for s in needed)
    assert report.network_gflops > 0


def test_paper_configuration_is_built_on_meta_with_real_size_encoders():
    """BiCLIP's paper configuration: nnFormer (Synapse) with PMC-CLIP and CoCa ViT-L-14."""
    reports = {t: count(t, "paper") for t in (BiCLIPTrainer_Net1, BiCLIPTrainer_Net2, BiCLIPTrainer_Net4,
                                               BiCLIPTrainer_online)}
    full, online = reports[BiCLIPTrainer_Net4], reports[BiCLIPTrainer_online]
    assert full.patch_size == [64, 128, 128] and full.num_classes == 14
    paper = BiCLIPSettings()  # the paper's encoders are the schema's defaults
    coca, pmc = paper.caption_encoder, paper.image_encoder
    assert full.encoders[coca]["params"] == 638_450_177  # open_clip coca_ViT-L-14, all towers
    assert full.encoders[pmc]["params"] == 37_792_352  # PMC-CLIP ModifiedResNet-50, 768-d
    # online: 64 slices per patch through each encoder; CoCa captions cost at least 64 image-tower forwards;
    # paper mode: none per forward (tables computed once per case), the same trainable network
    assert online.encoders[coca]["gflops_per_forward"] > online.encoders[pmc]["gflops_per_forward"] > 64 * 10
    assert full.encoders[coca]["gflops_per_forward"] == full.encoders[pmc]["gflops_per_forward"] == 0
    assert (online.trainable, online.network_gflops) == (full.trainable, full.network_gflops)
    assert reports[BiCLIPTrainer_Net1].encoders == {}
    # one stream adds one 3D CLIP adapter: Net4 - Net2 is exactly one adapter of the paper's shape
    # (768 -> 192 -> 1536, 64 slices -> bottleneck depth 4)
    adapter = SliceEmbeddingAdapter(768, 1536, 64, 4)
    assert full.trainable - reports[BiCLIPTrainer_Net2].trainable == numel(adapter)
    assert reports[BiCLIPTrainer_Net1].network_gflops < full.network_gflops


@pytest.mark.parametrize("preset, params", [("3d_nnformer_synapse", 150_054_210), ("3d_nnformer_acdc", 37_197_072)])
def test_nnformer_paper_configurations(preset, params):
    """nnFormer's authors publish 150.5 M for Synapse (14 classes); ACDC has all three heads built (nnU-Net
    switches deep supervision at run time), one more than the authors' ACDC file."""
    assert count(nnFormerTrainer, "paper", preset=preset).trainable == params
    fused = count(BiCLIPTrainer, "paper", preset=preset)
    assert fused.trainable > params and len(fused.encoders) == 2


def test_paper_network_is_never_allocated():
    """The paper-size build stays on the meta device (no memory, no weights needed)."""
    from nnunet_textguided.evaluation.params import build_for_counting, count_plans
    plans, name, dj = count_plans(BiCLIPTrainer, "paper")
    net, *_ = build_for_counting(BiCLIPTrainer, plans, name, dj)
    assert all(p.device.type == "meta" for p in net.parameters())


def test_command_prints_table_and_json(capsys):
    assert main(["BiCLIPTrainer", "--config", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "at inference" in out and "tiny-coca" in out
    assert main(["BiCLIPTrainer", "--config", "tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inference"] == data["trainable"] - data["training_only"] + data["frozen"]
    assert main(["NoSuchTrainer"]) == 2
    assert "nnunet-textguided list" in capsys.readouterr().err
    assert main(["BiCLIPTrainer", "--config", "plans"]) == 2  # needs -d and -c


def test_plans_config_counts_a_dataset(phantom_dataset):
    report = count(BiCLIPTrainer, "plans", dataset="991", configuration="3d_tiny")
    plans = Path(os.environ["nnUNet_preprocessed"]) / phantom_dataset.name / "nnUNetPlans.json"
    tiny = json.loads(plans.read_text())["configurations"]["3d_tiny"]
    assert report.patch_size == tiny["patch_size"]
    assert report.trainable > 0 and torch.isfinite(torch.tensor(report.network_gflops))


def test_cdpdnet_paper_configuration_on_meta():
    """CDPDNet at 96^3 with 32 labels / 11 tasks: CLIP ViT-B/32 text (prompts only) and DINOv2-base (no weights)."""
    from nnunet_textguided.training.cdpdnet import CDPDNetTrainer, CDPDNetTrainer_Baseline
    r = count(CDPDNetTrainer, "paper")
    assert r.patch_size == [96, 96, 96] and r.num_classes == 32
    text, dino = CDPDNetSettings().text_encoder, CDPDNetSettings().dino_encoder
    assert r.encoders[dino]["params"] == 86_580_480  # facebook/dinov2-base
    assert r.encoders[text]["params"] == 63_428_096 and not r.encoders[text]["at_inference"]  # CLIP text tower
    # 96 slices of one patch at 98 px (7 x 7 tokens) through DINOv2-base
    assert 96 * 8 < r.encoders[dino]["gflops_per_forward"] < 96 * 9
    assert r.trainable == 64_687_856  # networks/test_cdpdnet.py derives it module by module
    assert r.inference == r.trainable + 86_580_480
    assert count(CDPDNetTrainer_Baseline, "paper").trainable == 31_137_248  # CNN encoder + decoder only


def test_tgcnet_paper_configuration_on_meta():
    """TGC-Net at 224^2 (CNN branch 768^2) with CLIP ViT-L/14@336's two towers, one spec for both roles."""
    from nnunet_textguided.training.tgcnet import TGCNetTrainer, TGCNetTrainer_noSSE
    r = count(TGCNetTrainer, "paper")
    clip = TGCNetSettings().image_encoder
    assert TGCNetSettings().text_encoder == clip  # one CLIP model's two towers
    assert list(r.encoders) == [clip] and r.encoders[clip]["roles"] == ["case notes + image tokens"]
    assert 427e6 < r.encoders[clip]["params"] < 429e6  # both towers of ViT-L/14@336
    assert 370 < r.encoders[clip]["gflops_per_forward"] < 400  # one 336^2 image per patch; notes once per case
    assert abs(r.trainable / 10.3e6 - 1) < 0.05 and r.training_only == 0  # paper: 10.3 M trainable
    assert count(TGCNetTrainer_noSSE, "paper").trainable < r.trainable - 2e6  # no CNN / deformable encoder


def test_mptpn_paper_configuration_on_meta():
    """MPTPN at 2d_mptpn_paper (224^2, C = 64) with the paper's BERT-base token states (the paper gives no count)."""
    from nnunet_textguided.training.mptpn import MPTPNTrainer, MPTPNTrainer_noMSFF
    r = count(MPTPNTrainer, "paper")
    bert = MPTPNSettings().text_encoder
    assert r.patch_size == [224, 224] and list(r.encoders) == [bert]
    assert r.trainable == 15_774_339 and r.training_only == 0  # networks/test_mptpn.py derives it module by module
    assert r.encoders[bert]["params"] == 109_482_240 and r.inference == r.trainable + 109_482_240
    assert 290 < r.network_gflops < 310  # UpAttention's full-resolution convolutions dominate
    assert count(MPTPNTrainer_noMSFF, "paper").trainable == 15_774_339 - 310_016 - 7_007_678 - 193 + 779_454 + 65


PAPER_TRAINERS = ["BiCLIPTrainer", "nnFormerTrainer", "CDPDNetTrainer", "RecLMISTrainer", "TGCNetTrainer",
                  "MPTPNTrainer"]


@pytest.mark.parametrize("name", PAPER_TRAINERS)
def test_training_memory_at_each_paper_configuration(name):
    """Every method's paper configuration gets a memory estimate on the meta device: the weights part is exactly
    (parameters + gradients + optimiser state) x 4 bytes, and half precision saves less than float32."""
    from nnunet_textguided.evaluation.params import OPTIMIZER_STATES, trainer_class, training_memory
    trainer = trainer_class(name)
    plans, configuration, dataset_json = count_plans(trainer, "paper")
    memory = training_memory(trainer, plans, configuration, dataset_json)
    report = count(trainer, "paper")
    states = OPTIMIZER_STATES[trainer.resolve_settings({}).optimizer]
    assert memory.batch == PlansManager(plans).get_configuration(configuration).batch_size
    assert memory.weights * 2 ** 30 == pytest.approx(report.trainable * 4 * (2 + states), rel=1e-9)
    assert 0 < memory.activations_half < memory.activations_fp32
    assert memory.frozen_encoders * 2 ** 30 == pytest.approx(sum(e["params"] for e in report.encoders.values()) * 4)


@pytest.mark.parametrize("name", ["BiCLIPTrainer_online", "RecLMISTrainer"])
def test_activation_estimate_is_per_sample(name):
    """Activations (weights excluded) grow with the batch: twice the batch saves twice the bytes."""
    from nnunet_textguided.evaluation.params import trainer_class, training_memory
    trainer = trainer_class(name)
    args = count_plans(trainer, "paper")
    one, two = (training_memory(trainer, *args, batch=b) for b in (2, 4))
    assert two.activations_fp32 == pytest.approx(2 * one.activations_fp32, rel=0.02)
    assert two.weights == one.weights


def test_command_prints_training_memory(capsys):
    assert main(["CDPDNetTrainer"]) == 0
    out = capsys.readouterr().out
    assert "Training memory of one GPU at batch 8" in out and "activations saved for backward" in out
    assert main(["CDPDNetTrainer", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["training_memory_gib"]
    assert memory["total_fp32"] > memory["total_half"] > memory["weights"] > 0
