"""Runs in each spawned DDP rank (imports nothing from conftest: the session folders come with the environment)."""


def top_interest_mask(weights, rate, valid=None):
    """A deterministic stand-in for RecLMIS's probability-weighted mask draw: the k most interesting items (the
    draw of a split batch cannot repeat the single-process draw; the DDP test compares gradients, not draws)."""
    import math

    import torch
    w = weights.detach().float()
    valid = torch.ones_like(w, dtype=torch.bool) if valid is None else valid.to(torch.bool)
    w = w.masked_fill(~valid, float("-inf"))
    masked = torch.zeros_like(valid)
    for b, n in enumerate(valid.sum(1).tolist()):
        if n:
            masked[b, w[b].topk(min(max(math.floor(n * rate + 1e-9), 1), n)).indices] = True
    return masked


def trainable_parameters(tr) -> dict:
    """{name: parameter} of the network and the trainer's training-only modules."""
    named = {f"network.{k}": p for k, p in tr.bare_network().named_parameters()}
    if tr.training_only is not None:
        named.update({f"training_only.{k}": p for k, p in tr.training_only.named_parameters()})
    return named


def trained_state(tr) -> dict:
    """What a checkpoint holds of the weights: the network's and the training-only modules' state."""
    state = {f"network.{k}": v.detach().clone() for k, v in tr.bare_network().state_dict().items()}
    if tr.training_only is not None:
        state.update({f"training_only.{k}": v.detach().clone() for k, v in tr.training_only.state_dict().items()})
    return state


def train_step_rank(rank: int, world_size: int, init_file: str, dataset: str, configuration: str, trainer: str,
                    inputs: str, output: str) -> None:
    """One train_step of ``trainer`` on this rank's share of the saved global batch, from the saved weights, in a
    gloo process group. Each rank saves its (all-reduced) gradients and its weights after the optimiser step to
    ``output.rank<r>``; every rank calls save_checkpoint(``output.pth``), which rank 0 alone writes."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from nnunet_textguided.conditioning.extract import build_trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        saved = torch.load(inputs, weights_only=False)  # written by the test itself
        if saved.get("deterministic_masks"):
            import nnunet_textguided.networks.reclmis as reclmis
            reclmis.sample_interest_mask = top_interest_mask
        tr = build_trainer(dataset, configuration, trainer, for_extraction=False)
        assert tr.is_ddp and tr.device.type == "cpu"
        tr.initialize()
        if tr.textguided.get("mode") == "offline" and tr.textguided.get("streams"):
            tr._register_tables()  # paper-mode BiCLIP: rank 0 completes the store, the other rank waits
        net = tr.bare_network()
        net.load_state_dict(saved["network"])
        net.eval()  # as the single-process reference: no dropout draws
        if tr.training_only is not None:
            tr.training_only.load_state_dict(saved["training_only"])
            tr.training_only.eval()
        batch = saved["batch"]
        share = len(batch["keys"]) // world_size
        part = slice(rank * share, (rank + 1) * share)
        mine = {"data": batch["data"][part], "keys": list(batch["keys"][part]),
                "target": [t[part] for t in batch["target"]] if isinstance(batch["target"], list)
                else batch["target"][part]}
        assert tr.batch_size == share
        torch.manual_seed(0)
        np.random.seed(0)
        loss = float(tr.train_step(mine)["loss"])
        grads = {k: p.grad.clone() for k, p in trainable_parameters(tr).items() if p.grad is not None}
        torch.save({"loss": loss, "grads": grads, "state": trained_state(tr)}, f"{output}.rank{rank}")
        tr.save_checkpoint(f"{output}.pth")
    finally:
        dist.destroy_process_group()


def register_tables_rank(rank: int, world_size: int, init_file: str, dataset: str, configuration: str,
                         trainer: str, output: str) -> None:
    """Paper-mode BiCLIP's store completion at training start under DDP: saves how many tables this rank
    extracted and the tables its conditioner reads to ``output.rank<r>``."""
    import torch
    import torch.distributed as dist

    from nnunet_textguided.conditioning.extract import build_trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tr = build_trainer(dataset, configuration, trainer, for_extraction=False)
        tr.initialize()
        computed = []
        extract = tr.extract

        def counting_extract(*args, **kwargs):
            counts = extract(*args, **kwargs)
            computed.append(counts["computed"])
            return counts
        tr.extract = counting_extract
        tr._register_tables()
        torch.save({"computed": sum(computed), "tables": tr._conditioner().tables}, f"{output}.rank{rank}")
    finally:
        dist.destroy_process_group()
