"""Runs in each spawned DDP rank (imports nothing from conftest: the session folders come with the environment)."""


def train_step_rank(rank: int, world_size: int, init_file: str, dataset: str, configuration: str, trainer: str,
                    inputs: str, output: str) -> None:
    """One train_step of ``trainer`` on this rank's share of the saved global batch, from the saved weights, in a
    gloo process group; rank 0 saves the (all-reduced) gradients of the network's parameters."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from nnunet_textguided.conditioning.extract import build_trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        saved = torch.load(inputs, weights_only=False)  # written by the test itself
        tr = build_trainer(dataset, configuration, trainer, for_extraction=False)
        assert tr.is_ddp and tr.device.type == "cpu"
        tr.initialize()
        if tr.textguided.get("mode") == "offline" and tr.textguided.get("streams"):
            tr._register_tables()  # paper-mode BiCLIP: rank 0 completes the store, the other rank waits
        net = tr.bare_network()
        net.load_state_dict(saved["network"])
        net.eval()  # as the single-process reference: no dropout draws
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
        if rank == 0:
            torch.save({"loss": loss, "grads": {k: p.grad.clone() for k, p in net.named_parameters()
                                                if p.grad is not None}}, output)
    finally:
        dist.destroy_process_group()
