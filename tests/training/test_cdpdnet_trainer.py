"""CDPDNetTrainer in-process on the merged phantom dataset: partial-label masking from the batch keys, frozen
DINOv2 outside checkpoints and optimizer, prompts as checkpointed buffers, per-label task routing at inference
equal to the per-task passes, and the label-to-task cover."""
import numpy as np
import pytest
import torch

from nnunet_textguided.conditioning.dense import DenseSliceConditioner
from nnunet_textguided.conditioning.extract import build_trainer
from nnunet_textguided.training.cdpdnet import fused_stages, route_labels


def test_route_labels_covers_every_label_with_few_tasks():
    tasks = [["liver"], ["liver", "liver tumor"], ["spleen", "liver", "right kidney", "left kidney"],
             ["right kidney", "kidney tumor"]]
    labels = ["liver", "spleen", "right kidney", "left kidney", "liver tumor", "kidney tumor"]
    assert route_labels(tasks, labels) == [2, 2, 2, 2, 1, 3]
    # a wanted subset is covered by the task annotating most of it; the rest go to that task too
    assert route_labels(tasks, labels, ["liver", "liver tumor"]) == [1] * 6
    assert route_labels(tasks, labels, ["kidney tumor"]) == [3] * 6
    assert fused_stages(6) == [2, 3, 4] and fused_stages(4) == [1, 2]


@pytest.fixture(scope="module")
def trainer(universal_dataset):
    from conftest import UNIVERSAL_ID
    tr = build_trainer(str(UNIVERSAL_ID), "3d_tiny", "CDPDNetTrainer", for_extraction=False)
    tr.initialize()
    return tr


def test_settings_prompts_and_frozen_dino(trainer):
    s = trainer.textguided
    assert s["labels"] == ["liver", "spleen", "right kidney", "left kidney"]
    assert s["organ_prompts"][2] == "A computerized tomography of a right kidney."
    assert s["task_prompts"] == ["A task of segmenting liver, spleen in computerized tomography.",
                                 "A task of segmenting right kidney, left kidney in computerized tomography."]
    assert s["label_tasks"] == [0, 0, 1, 1]
    net = trainer.network
    assert isinstance(net.conditioner, DenseSliceConditioner)
    dino = net.conditioner.encoder()
    dino_ids = {id(p) for p in dino.parameters()}
    assert dino_ids and not dino_ids & {id(p) for p in net.parameters()}
    assert not dino_ids & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    sd = net.state_dict()
    assert {"organ_embeddings", "task_embeddings"} <= set(sd) and not any("conditioner" in k for k in sd)
    assert not trainer.enable_deep_supervision


def test_paper_optimiser_and_warm_up_cosine_schedule(trainer):
    """AdamW (beta1 0.9, weight decay 1e-5), lr 4e-4, linear warm-up over 50 of 1000 epochs, then cosine to 0,
    stepped per epoch like nnU-Net's schedule; nnU-Net's SGD + poly one trainer name away."""
    from conftest import UNIVERSAL_ID
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    assert type(opt) is torch.optim.AdamW and trainer.num_epochs == 1000
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 1e-5
    expected = {0: 4e-4 / 50, 24: 4e-4 * 25 / 50, 49: 4e-4, 50: 4e-4, 525: 2e-4, 999: 0.5 * 4e-4 * (1 + np.cos(
        np.pi * 949 / 950))}
    for epoch, lr in expected.items():
        sched.step(epoch)
        assert group["lr"] == pytest.approx(lr, rel=1e-9, abs=1e-12), epoch
    assert expected[999] < 2e-9
    sched.step(0)
    short = build_trainer(str(UNIVERSAL_ID), "3d_tiny", "CDPDNetTrainer_40epochs", for_extraction=False)
    short.initialize()
    assert short.settings.warmup_epochs == 2  # the warm-up keeps its share of a short schedule
    sgd = build_trainer(str(UNIVERSAL_ID), "3d_tiny", "CDPDNetTrainer_nnUNetSGD", for_extraction=False)
    sgd.initialize()
    assert type(sgd.optimizer) is torch.optim.SGD and sgd.optimizer.param_groups[0]["momentum"] == 0.99
    sgd.lr_scheduler.step(500)
    assert sgd.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * (1 - 500 / 1000) ** 0.9)


def test_unannotated_labels_of_a_sample_get_zero_gradient_in_a_train_step(trainer):
    keys = ["D994_phantom_000", "D995_phantom_001"]  # liver + spleen annotated, then the two kidneys
    tasks, annotated = trainer._batch_partial(keys)
    assert tasks.tolist() == [0, 1]
    assert annotated.tolist() == [[True, True, False, False], [False, False, True, True]]
    net = trainer.network
    x = torch.randn(2, 1, *trainer.configuration_manager.patch_size)
    target = (torch.rand(2, 4, *x.shape[2:]) > 0.8).float()
    net.train()
    net.set_batch_tasks(tasks)
    out = net(x)
    out.retain_grad()
    trainer.loss.annotated = annotated
    try:
        trainer.loss(out, target).backward()
    finally:
        trainer.loss.annotated = None
        net.set_batch_tasks(None)
    g = out.grad.abs().flatten(2).sum(-1)
    assert torch.all(g[~annotated] == 0) and torch.all(g[annotated] > 0)
    with pytest.raises(KeyError, match="merge"):
        trainer._batch_partial(["not_a_case"])


def test_sliding_window_with_label_routing_equals_the_per_task_passes(trainer):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    net = trainer.network.eval()
    patch = trainer.configuration_manager.patch_size
    x = torch.randn(1, 1, *patch)
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=False, use_mirroring=False, device=torch.device("cpu"),
                           perform_everything_on_device=False, allow_tqdm=False)
    pred.manual_initialization(net, trainer.plans_manager, trainer.configuration_manager, [net.state_dict()],
                               trainer.dataset_json, "CDPDNetTrainer", None)
    with torch.no_grad():
        window = pred.predict_sliding_window_return_logits(x[0])
        net.set_batch_tasks(torch.tensor([0]))
        task0 = net(x)[0]
        net.set_batch_tasks(torch.tensor([1]))
        task1 = net(x)[0]
        net.set_batch_tasks(None)
    # labels 0, 1 (liver, spleen) come from task 0's pass, 2, 3 (kidneys) from task 1's; one patch = one window
    expected = torch.cat((task0[:2], task1[2:]))
    diff = (window.float() - expected).abs().max()
    assert diff < 2e-2, diff  # nnU-Net accumulates CPU windows in half
    assert not torch.allclose(task0, task1)  # the task prompt changes the prediction


def test_validation_cases_are_scored_on_their_annotated_labels(trainer):
    regions = trainer.validation_case_regions()
    lm = trainer.label_manager
    assert regions["D994_phantom_000.nii.gz"] == lm.foreground_regions[:2]
    assert regions["D995_phantom_000.nii.gz"] == lm.foreground_regions[2:]
    assert np.all([len(v) == 2 for v in regions.values()])


def test_predictor_label_and_task_selection(trainer, capsys):
    from nnunet_textguided.inference.predict import LabelSelectionError, TextGuidedPredictor
    pred = TextGuidedPredictor(use_mirroring=False, device=torch.device("cpu"), perform_everything_on_device=False)
    pred.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                               [trainer.network.state_dict()], trainer.dataset_json, "CDPDNetTrainer", None)
    sel = pred.select_labels(labels="liver, kidney on the left")
    assert sel["labels"] == ["liver", "left kidney"] and sel["channels"] == [0, 3]
    assert sel["routing"]["liver"] == "PhantomLiverSpleen" and sel["routing"]["left kidney"] == "PhantomKidneys"
    # --task: that task's prompt for every label, writing the labels it annotates (or those asked for, warned)
    sel = pred.select_labels(task="phantomkidneys")
    assert sel["labels"] == ["right kidney", "left kidney"] and set(sel["routing"].values()) == {"PhantomKidneys"}
    assert trainer.network._label_tasks == [1, 1, 1, 1]
    sel = pred.select_labels(labels="spleen", task="PhantomKidneys")
    assert sel["labels"] == ["spleen"] and "never annotated spleen" in capsys.readouterr().out
    with pytest.raises(LabelSelectionError, match="PhantomLiverSpleen"):
        pred.select_labels(task="Nope")
    trainer.network.set_label_tasks(trainer.textguided["label_tasks"])
