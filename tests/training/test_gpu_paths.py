"""The GPU code paths of every method's training step, checked on CPU (nnU-Net compiles the network and trains
under autocast on CUDA only).

Each method's trainer is built as nnUNetv2_train builds it, and one batch of its own dataloader goes through
the trainer's own ``train_step`` (RecLMIS's custom step with its training-only losses, CDPDNet's per-sample
task routing and masked partial-label loss, the notes handed over per batch):

- **compile**: ``trainer.network`` compiled as nnU-Net compiles it (``torch.compile(network)``; here with the
  ``aot_eager`` backend, which traces the same graphs, forward and backward, without a GPU compiler) gives the
  eager step's loss (relative 1e-5) and gradients (within 1e-4 of the largest), as one graph, also on a second batch with other notes / tasks (no recompile);
- **mixed precision**: the step under bf16 autocast (the CPU's mixed precision; CUDA runs fp16 or bf16) gives
  the float32 step's loss within 5 % and gradients pointing the same way (cosine >= 0.99), nothing NaN, and the
  conditioning the frozen encoders compute is bitwise the float32 one (they run outside autocast).

The networks run in eval mode for the comparisons: dropout draws differ between eager and compiled code, and
eval mode switches nothing else in these networks.
"""
import copy
import random
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from nnunet_textguided.conditioning.extract import build_trainer

#: (trainer, dataset fixture, configuration)
CASES = {
    "BiCLIPTrainer": ("phantom_dataset", "3d_tiny"),
    "BiCLIPTrainer_online": ("phantom_dataset", "3d_tiny"),
    "CDPDNetTrainer": ("universal_dataset", "3d_tiny"),
    "RecLMISTrainer": ("referring_dataset", "2d_tiny"),
    "TGCNetTrainer": ("referring_dataset", "2d_tiny"),
    "MPTPNTrainer_noPretrain": ("referring_dataset", "2d_tiny"),
}
DATASET_IDS = {"phantom_dataset": "PHANTOM_ID", "universal_dataset": "UNIVERSAL_ID",
               "referring_dataset": "REFERRING_ID"}


class CountingBackend:
    """A torch.compile backend that runs the traced graph as traced (aot_eager) and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _batches(tr, n: int = 2) -> list[dict]:
    """``n`` training batches of the trainer's own dataloader (augmented, deep-supervision targets, keys)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_n_proc_DA", "0")  # single-threaded augmenter: no worker processes
        dl_train, dl_val = tr.get_dataloaders()
    try:
        return [next(dl_train) for _ in range(n)]
    finally:
        for dl in (dl_train, dl_val):
            if hasattr(dl, "_finish"):
                dl._finish()


@pytest.fixture(scope="module", params=list(CASES))
def prepared(request):
    import conftest
    name = request.param
    fixture, configuration = CASES[name]
    request.getfixturevalue(fixture)
    torch.manual_seed(0)
    tr = build_trainer(str(getattr(conftest, DATASET_IDS[fixture])), configuration, name, for_extraction=False)
    tr.initialize()
    if tr.textguided.get("mode") == "offline" and tr.textguided.get("streams"):  # paper-mode BiCLIP reads the store
        tr.extract(progress=False)
        tr._register_tables()
    np.random.seed(0)
    batches = _batches(tr)
    tr.network.eval()
    return name, tr, batches


def _trainable(tr) -> list[torch.nn.Parameter]:
    return [p for g in tr.optimizer.param_groups for p in g["params"]]


def _step(tr, batch, snapshot, amp: bool = False) -> tuple[float, torch.Tensor]:
    """(loss, flat gradient) of one train_step from the snapshot's weights and optimizer state."""
    tr.bare_network().load_state_dict(snapshot["network"])
    tr.optimizer.load_state_dict(snapshot["optimizer"])
    if tr.training_only is not None:
        tr.training_only.load_state_dict(snapshot["training_only"])
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16) if amp else nullcontext():
        loss = float(tr.train_step(batch)["loss"])
    grads = [p.grad.detach().float().flatten() if p.grad is not None else torch.zeros(p.numel()) for p in _trainable(tr)]
    return loss, torch.cat(grads)


def _snapshot(tr) -> dict:
    return {"network": copy.deepcopy(tr.bare_network().state_dict()),
            "optimizer": copy.deepcopy(tr.optimizer.state_dict()),
            "training_only": copy.deepcopy(tr.training_only.state_dict()) if tr.training_only is not None else None}


@pytest.mark.slow
def test_compiled_step_equals_eager_step(prepared):
    name, tr, batches = prepared
    snapshot = _snapshot(tr)
    bare = tr.bare_network()
    eager = [_step(tr, b, snapshot) for b in batches]
    backend = CountingBackend()
    torch._dynamo.reset()
    tr.network = torch.compile(bare, backend=backend)  # what nnUNetTrainer.initialize does on CUDA
    try:
        compiled = [_step(tr, b, snapshot) for b in batches]
    finally:
        tr.network = bare
        tr.bare_network().load_state_dict(snapshot["network"])
        tr.optimizer.load_state_dict(snapshot["optimizer"])
    assert list(batches[0]["keys"]) != list(batches[1]["keys"])
    for (l_e, g_e), (l_c, g_c) in zip(eager, compiled):
        assert np.isfinite(l_e) and g_e.abs().sum() > 0
        assert l_c == pytest.approx(l_e, rel=1e-5, abs=1e-6), name
        # float32 rounding of the traced (decomposed) ops: differences below 1e-4 of the largest gradient
        assert float((g_c - g_e).abs().max()) <= 1e-4 * float(g_e.abs().max()), name
        assert torch.nn.functional.cosine_similarity(g_c, g_e, dim=0) > 0.99999, name
    # the trainable network is one graph (the conditioner runs eagerly before it), traced once: other notes,
    # tasks and augmentations in the second batch reuse it
    assert backend.graphs == 1, f"{name}: {backend.graphs} graphs (graph breaks or recompiles)"


@pytest.mark.slow
def test_bf16_autocast_step_matches_float32_step(prepared):
    name, tr, batches = prepared
    snapshot = _snapshot(tr)
    batch = batches[0]
    loss32, grad32 = _step(tr, batch, snapshot)
    loss16, grad16 = _step(tr, batch, snapshot, amp=True)
    assert np.isfinite(loss16) and torch.isfinite(grad16).all(), name
    assert loss16 == pytest.approx(loss32, rel=0.05), name
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)
    assert cosine >= 0.99, f"{name}: gradient cosine {cosine:.4f} under bf16 autocast"
    tr.bare_network().load_state_dict(snapshot["network"])
    tr.optimizer.load_state_dict(snapshot["optimizer"])


@pytest.mark.slow
def test_frozen_encoders_run_outside_autocast(prepared):
    """The conditioning (frozen encoders, stored tables, notes) is the float32 one under autocast: encoders run
    in their weights' dtype, so online conditioning stays equal to what the store computed."""
    name, tr, batches = prepared
    net = tr.bare_network()
    batch = batches[0]
    data = batch["data"][:1]
    setter = getattr(tr, "case_notes", None)
    context = setter(batch["keys"][:1]) if setter is not None else nullcontext()
    with context, torch.no_grad():
        _, plain = net.condition(data)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, mixed = net.condition(data)
    assert plain, name
    for key, value in plain.items():
        if torch.is_tensor(value):
            assert mixed[key].dtype == value.dtype, key
            assert torch.equal(mixed[key], value), key
