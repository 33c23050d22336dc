"""Multi-GPU training (nnUNetv2_train -num_gpus N) checked on CPU: two ranks in a gloo process group, each
with half of a batch, give the gradients of one process on the whole batch, end the step with identical
weights, and write one checkpoint.

nnU-Net's DDP splits the global batch over the ranks, wraps the network in DistributedDataParallel (gradients
averaged) and, for batch Dice, gathers the Dice statistics of all ranks; with equal halves that is exactly the
single-process step. Each method's trainer is built as nnUNetv2_train builds it on each rank; the ranks load
the single-process trainer's weights and run the trainer's own train_step (networks in eval mode: no dropout
draws). RecLMIS also averages its training-only modules' gradients and computes its in-batch contrastive loss
over the whole batch; its random mask draws are replaced by a deterministic top-k on both sides (a split batch
cannot repeat one process's draws)."""
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from nnunet_textguided.conditioning.extract import build_trainer
from test_gpu_paths import CASES, DATASET_IDS, _batches

DDP_TRAINERS = ["BiCLIPTrainer_online", "TGCNetTrainer", "MPTPNTrainer_noPretrain", "CDPDNetTrainer", "BiCLIPTrainer",
                "RecLMISTrainer"]


def _dataset(name, request):
    import conftest
    fixture, configuration = CASES[name]
    request.getfixturevalue(fixture)
    return str(getattr(conftest, DATASET_IDS[fixture])), configuration


def _spawn(fn, *args):
    mp.start_processes(fn, nprocs=2, start_method="spawn", join=True, args=(2,) + args)


@pytest.mark.slow
@pytest.mark.parametrize("name", DDP_TRAINERS)
def test_two_ranks_give_the_single_process_step(name, request, tmp_path, monkeypatch):
    import ddp_worker
    dataset, configuration = _dataset(name, request)
    deterministic_masks = name.startswith("RecLMIS")
    if deterministic_masks:
        import nnunet_textguided.networks.reclmis as reclmis
        monkeypatch.setattr(reclmis, "sample_interest_mask", ddp_worker.top_interest_mask)
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
    if tr.training_only is not None:
        tr.training_only.eval()
    torch.save({"network": net.state_dict(), "batch": batch, "deterministic_masks": deterministic_masks,
                "training_only": tr.training_only.state_dict() if tr.training_only is not None else None},
               tmp_path / "inputs.pt")
    torch.manual_seed(0)
    np.random.seed(0)
    loss = float(tr.train_step(batch)["loss"])
    reference = {k: p.grad.clone() for k, p in ddp_worker.trainable_parameters(tr).items() if p.grad is not None}

    _spawn(ddp_worker.train_step_rank, str(tmp_path / "init"), dataset, configuration, name,
           str(tmp_path / "inputs.pt"), str(tmp_path / "out"))
    ranks = [torch.load(tmp_path / f"out.rank{r}") for r in range(2)]
    # a parameter without gradient counts as zero: under DDP nnU-Net weights the lowest deep-supervision output
    # 1e-6 instead of 0 (every parameter must get a gradient), so its head gets a negligible one
    assert set(reference) <= set(ranks[0]["grads"])
    if tr.training_only is not None:
        assert any(k.startswith("training_only.") for k in reference)
    largest = max(float(g.abs().max()) for g in reference.values())
    for key, g in ranks[0]["grads"].items():
        expected = reference.get(key, torch.zeros_like(g))
        assert float((g - expected).abs().max()) <= 1e-4 * largest, key
    assert np.isfinite(ranks[0]["loss"]) and np.isfinite(loss)
    # identical weights on both ranks after the optimiser step (one checkpoint stands for all), and that
    # checkpoint, written by rank 0 alone, holds them. (Not compared with the single-process step's weights: Adam
    # divides by the root of the squared gradient, so a gradient that is zero up to rounding - a bias before a
    # softmax - moves its weight by up to lr either way; the gradients are compared above.)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    checkpoint = torch.load(tmp_path / "out.pth", weights_only=True)
    for key, value in checkpoint["network_weights"].items():
        assert torch.equal(value, ranks[0]["state"][f"network.{key}"]), key
    if tr.training_only is not None:
        for key, value in checkpoint["training_only_weights"].items():
            assert torch.equal(value, ranks[0]["state"][f"training_only.{key}"]), key


@pytest.mark.slow
def test_an_incomplete_store_is_completed_once_by_rank_zero(phantom_dataset, tmp_path):
    """Paper-mode BiCLIP under DDP: rank 0 extracts the missing slice tables, the other rank waits, and both read
    the same tables."""
    import conftest
    import ddp_worker
    dataset = str(conftest.PHANTOM_ID)
    tr = build_trainer(dataset, "3d_tiny", "BiCLIPTrainer", for_extraction=False)
    tr.extract(progress=False)
    stores = tr.slice_stores()
    case = tr.all_case_identifiers()[0]
    for _, store in stores:
        (store.root / f"{case}.npy").unlink()
    _spawn(ddp_worker.register_tables_rank, str(tmp_path / "init"), dataset, "3d_tiny", "BiCLIPTrainer",
           str(tmp_path / "out"))
    ranks = [torch.load(tmp_path / f"out.rank{r}") for r in range(2)]
    assert ranks[0]["computed"] == len(stores) and ranks[1]["computed"] == 0
    assert all(store.is_current(case) for _, store in stores)
    assert ranks[0]["tables"].keys() == ranks[1]["tables"].keys() and ranks[0]["tables"]
    for i, tables in ranks[0]["tables"].items():
        for stream, table in tables.items():
            assert torch.equal(table, ranks[1]["tables"][i][stream]), (i, stream)
