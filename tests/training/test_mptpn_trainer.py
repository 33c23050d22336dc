"""MPTPNTrainer in-process on the synthetic referring dataset with a stage-1 checkpoint pretrained here on a
generated image-caption folder (32 x 32 RGB, so the 64 x 64 one-channel 2d_tiny network needs both adaptations):
the stage-1 tensors really initialise the PPE (and nothing else), a train step then changes the network and
never the frozen text encoder, and a missing or mismatched stage 1 stops with the fix."""
import shutil

import pytest
import torch

from nnunet_textguided.conditioning.extract import build_trainer
from nnunet_textguided.conditioning.notes import NoteConditioner
from nnunet_textguided.conditioning.slices import get_encoder
from nnunet_textguided.data.captions import write_caption_folder
from nnunet_textguided.losses.mptpn import WeightedBCEDiceLoss
from nnunet_textguided.networks.mptpn import adapt_ppe_state
from nnunet_textguided.training.mptpn import StageOneError
from nnunet_textguided.training.ppe_pretrain import load_ppe_checkpoint, pretrain_ppe

TRAINER = "MPTPNTrainer_2epochs"
STAGE1 = dict(text_encoder="minilm", max_tokens=10, image_size=(32, 32), base_channels=8, num_heads=8,
              epochs=1, batch_size=8, device="cpu", num_workers=0, progress=False)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("mptpn_stage1")
    write_caption_folder(root / "pairs", n=16, size=32, seed=0)
    pretrain_ppe(root / "pairs", root / "ppe.pth", **STAGE1)
    return root / "ppe.pth"


def _built(name: str, ppe=None):
    """A trainer from ``build_trainer`` with the configuration's setting ``ppe_weights`` = ppe (if given)."""
    from conftest import REFERRING_ID
    return build_trainer(str(REFERRING_ID), "2d_tiny", name, for_extraction=False,
                         settings={"ppe_weights": str(ppe)} if ppe is not None else None)


def _initialised(name: str, ppe=None, seed: int = 0):
    """``_built``, its network initialised from ``seed``."""
    tr = _built(name, ppe)
    torch.manual_seed(seed)
    tr.initialize()
    return tr


@pytest.fixture(scope="module")
def trainer(referring_dataset, stage1):
    return _initialised(TRAINER, stage1)


def _batch(trainer, keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    return {"data": torch.randn(len(keys), 1, *patch, generator=g),
            "target": torch.randint(0, 2, (len(keys), 1, *patch), generator=g).float(), "keys": list(keys)}


def _clone(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_the_run_records_the_stage1_checkpoint_and_builds_the_paper_training_parts(trainer, stage1):
    s = trainer.textguided
    assert s["stage1"]["path"] == str(stage1) and len(s["stage1"]["sha256"]) == 64
    assert (s["base_channels"], s["num_heads"], s["max_tokens"]) == (8, 8, 10)
    assert isinstance(trainer.loss, WeightedBCEDiceLoss)
    assert isinstance(trainer.optimizer, torch.optim.Adam) and trainer.optimizer.param_groups[0]["lr"] == 1e-4
    net = trainer.network
    assert isinstance(net.conditioner, NoteConditioner) and net.conditioner.spec == "minilm"
    assert {k.split(".")[0] for k in net.state_dict()} == {"ppe", "msff", "up", "head"}


def test_stage1_weights_initialise_the_ppe_and_nothing_else(trainer, stage1):
    net = trainer.bare_network()
    ckpt = load_ppe_checkpoint(stage1)
    expected, notes = adapt_ppe_state(ckpt["ppe"], ckpt["config"], net.ppe)
    assert any("grid 2x2 -> 4x4" in n for n in notes) and any("3 -> 1 input channels" in n for n in notes)
    log = open(trainer.log_file).read()
    assert f"stage 1: PPE initialised from {stage1}" in log and "3 -> 1 input channels" in log
    # the same network from the same seed without stage 1: only the PPE differs
    before = _clone(_initialised("MPTPNTrainer_noPretrain_2epochs").bare_network())
    assert not any(torch.equal(before[f"ppe.{k}"], v) for k, v in expected.items() if v.dtype.is_floating_point
                   and v.numel() > 8 and not k.endswith(("running_mean", "running_var", ".bias", ".position")))
    after = _clone(net)
    for k, v in expected.items():
        assert torch.equal(after[f"ppe.{k}"], v), k
    # tensors the grid and channel adaptations leave alone are the checkpoint's own, bit for bit
    untouched = [k for k in ckpt["ppe"] if "position" not in k and not k.startswith("text_to_patches.")
                 and k != "image.stages.0.0.weight"]
    assert len(untouched) > 50 and all(torch.equal(after[f"ppe.{k}"], ckpt["ppe"][k]) for k in untouched)
    stem = ckpt["ppe"]["image.stages.0.0.weight"]
    assert torch.equal(after["ppe.image.stages.0.0.weight"], stem.sum(1, keepdim=True))
    # MSFF, UpAttention and the head keep their initialisation
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("ppe."))
    assert trainer.initialise_ppe_from_stage1() == notes  # idempotent

    # a train step then updates the network (the PPE included) and never the frozen text encoder
    encoder = get_encoder("minilm")
    frozen = _clone(encoder)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in net.parameters()} == optimised
    assert not {id(p) for p in encoder.parameters()} & optimised
    net.train()
    out = trainer.train_step(_batch(trainer, ["referring_000", "referring_001"]))
    assert torch.isfinite(torch.as_tensor(out["loss"]))
    stepped = _clone(net)
    changed = {k for k in stepped if not torch.equal(stepped[k], after[k])}
    ppe_params = {f"ppe.{n}" for n, _ in net.ppe.named_parameters()}
    assert ppe_params <= changed  # the stage-1 PPE is fine-tuned with the rest (the authors' code froze it by omission)
    assert {n for n, _ in net.named_parameters()} <= changed
    assert all(torch.equal(v, frozen[k]) for k, v in encoder.state_dict().items())
    assert not any(p.requires_grad for p in encoder.parameters())


def test_a_missing_or_mismatched_stage1_stops_with_the_fix(trainer, stage1, tmp_path):
    s = trainer.textguided
    saved = s["stage1"]
    try:
        s["stage1"] = None
        with pytest.raises(StageOneError, match=r"pretrain-ppe .*--max-tokens 10 --base-channels 8.*MPTPNTrainer_noPretrain"):
            trainer.initialise_ppe_from_stage1()
        other = tmp_path / "ppe_8tokens.pth"
        write_caption_folder(tmp_path / "pairs", n=8, size=32, seed=1)
        pretrain_ppe(tmp_path / "pairs", other, **{**STAGE1, "max_tokens": 8})
        s["stage1"] = {"path": str(other), "sha256": __import__("nnunet_textguided.conditioning.store", fromlist=["x"])
                       .file_sha256(other)}
        before = _clone(trainer.bare_network())
        with pytest.raises(StageOneError, match=r"max_tokens 8 \(trainer: 10\).*--max-tokens 10"):
            trainer.initialise_ppe_from_stage1()
        after = _clone(trainer.bare_network())
        assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded
    finally:
        s["stage1"] = saved


def test_the_no_pretrain_ablation_needs_no_stage1_and_a_missing_file_is_named_before_any_data_is_read(
        referring_dataset, tmp_path):
    from conftest import REFERRING_ID
    absent = tmp_path / "absent.pth"
    with pytest.raises(StageOneError, match=r"absent\.pth: no such file.*pretrain-ppe"):
        _initialised(TRAINER, absent)
    tr = _initialised("MPTPNTrainer_noPretrain_2epochs", absent)
    assert tr.textguided["stage1"] is None
    assert "stage 1: none (MPTPNTrainer_noPretrain)" in open(tr.log_file).read()
    assert build_trainer(str(REFERRING_ID), "2d_tiny", TRAINER, for_extraction=False).textguided["stage1"] is None


def test_resuming_needs_no_stage1_file_and_ignores_another_one(trainer, stage1, tmp_path):
    ck = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(ck))
    saved = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    away = tmp_path / "stage1_moved_away.pth"
    shutil.move(stage1, away)
    try:
        for ppe in (None, stage1):  # unset, or naming the (now missing) file the run started from
            resumed = _built(TRAINER, ppe)
            torch.manual_seed(1)  # another initialisation: the weights must come from the checkpoint
            resumed.load_checkpoint(str(ck))
            assert resumed.textguided["stage1"] == trainer.textguided["stage1"]
            state = resumed.network.state_dict()
            assert all(torch.equal(state[k], v) for k, v in saved.items())
        other = tmp_path / "other.pth"
        other.write_bytes(away.read_bytes() + b"another file")
        elsewhere = _built(TRAINER, other)
        elsewhere.load_checkpoint(str(ck))
        assert elsewhere.textguided["stage1"] == trainer.textguided["stage1"]
        assert f"ppe_weights={other} is not the stage-1 checkpoint this run started from" in open(elsewhere.log_file).read()
    finally:
        shutil.move(away, stage1)
