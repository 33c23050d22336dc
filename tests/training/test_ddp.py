"""Multi-GPU training (nnUNetv2_train -num_gpus N) checked on CPU: two ranks in a gloo process group, each
with half of a batch, give the gradients of one process on the whole batch.

nnU-Net's DDP splits the global batch over the ranks, wraps the network in DistributedDataParallel (gradients
averaged) and, for batch Dice, gathers the Dice statistics of all ranks; with equal halves that is exactly the
single-process step. Each method's trainer is built as nnUNetv2_train builds it on each rank; the ranks load
the single-process trainer's weights and run the trainer's own train_step (networks in eval mode: no dropout
draws)."""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from nnunet_textguided.conditioning.extract import build_trainer
from test_gpu_paths import CASES, DATASET_IDS, _batches

DDP_TRAINERS = ["BiCLIPTrainer_online", "TGCNetTrainer", "MPTPNTrainer_noPretrain", "CDPDNetTrainer", "BiCLIPTrainer"]


@pytest.mark.slow
@pytest.mark.parametrize("name", DDP_TRAINERS)
def test_two_ranks_give_the_single_process_gradients(name, request, tmp_path):
    import conftest
    from ddp_worker import train_step_rank
    fixture, configuration = CASES[name]
    request.getfixturevalue(fixture)
    dataset = str(getattr(conftest, DATASET_IDS[fixture]))
    torch.manual_seed(0)
    tr = build_trainer(dataset, configuration, name, for_extraction=False)
    tr.initialize()
    if tr.textguided.get("mode") == "offline" and tr.textguided.get("streams"):
        tr._register_tables()
    np.random.seed(0)
    batch = _batches(tr, 1)[0]
    batch["keys"] = list(batch["keys"])
    assert len(batch["keys"]) % 2 == 0
    net = tr.bare_network().eval()
    torch.save({"network": net.state_dict(), "batch": batch}, tmp_path / "inputs.pt")
    torch.manual_seed(0)
    np.random.seed(0)
    loss = float(tr.train_step(batch)["loss"])
    reference = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}

    mp.start_processes(train_step_rank, nprocs=2, start_method="spawn", join=True,
                       args=(2, str(tmp_path / "init"), dataset, configuration, name, str(tmp_path / "inputs.pt"),
                             str(tmp_path / "rank0.pt")))
    ranks = torch.load(tmp_path / "rank0.pt")
    # a parameter without gradient counts as zero: under DDP nnU-Net weights the lowest deep-supervision output
    # 1e-6 instead of 0 (every parameter must get a gradient), so its head gets a negligible one
    assert set(reference) <= set(ranks["grads"])
    largest = max(float(g.abs().max()) for g in reference.values())
    for key, g in ranks["grads"].items():
        expected = reference.get(key, torch.zeros_like(g))
        assert float((g - expected).abs().max()) <= 1e-4 * largest, key
    assert np.isfinite(ranks["loss"]) and np.isfinite(loss)
