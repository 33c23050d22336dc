"""RecLMISTrainer in-process on the synthetic referring dataset: note tokens in the store equal what the
note-aware predictor computes, batches get their cases' notes, training-only modules stay out of the network
(and its checkpoint weights) but are optimised and checkpointed, the frozen text encoder stays frozen."""
import shutil

import pytest
import torch

from nnunet_textguided.conditioning.extract import build_trainer
from nnunet_textguided.conditioning.notes import NoteConditioner, NoteError, unpack_note
from nnunet_textguided.inference.predict import TextGuidedPredictor

AUX_PARTS = ("reconstructor", "cvr", "clr", "interest", "ccl")


@pytest.fixture(scope="module")
def trainer(referring_dataset):
    from conftest import REFERRING_ID
    tr = build_trainer(str(REFERRING_ID), "2d_tiny", "RecLMISTrainer_2epochs", for_extraction=False)
    tr.initialize()
    return tr


def _case_files(folder):
    return {p.name[:-len("_0000.png")]: [str(p)] for p in sorted(folder.glob("*_0000.png"))}


def test_stored_note_tokens_equal_what_the_predictor_computes_for_the_same_note(trainer, referring_dataset):
    counts = trainer.extract(progress=False)
    assert counts["computed"] + counts["skipped"] == len(trainer.all_case_identifiers())
    store = trainer.note_store()
    predictor = TextGuidedPredictor(device=torch.device("cpu"))
    predictor.network, predictor.dataset_json = trainer.network, trainer.dataset_json
    files = _case_files(referring_dataset / "imagesTr")
    cases = sorted(files)[:4]
    for case, (tokens, mask) in zip(cases, predictor.read_case_notes([files[c] for c in cases])):
        stored_tokens, stored_mask = unpack_note(store.load(case))
        assert torch.equal(tokens[0], stored_tokens) and torch.equal(mask[0], stored_mask)
        assert 4 < int(mask.sum()) < trainer.textguided["max_tokens"]  # not truncated: the position words survive
    again = trainer.extract(progress=False)
    assert (again["computed"], again["skipped"]) == (0, counts["computed"] + counts["skipped"])
    assert again["truncated"] == {}  # the referring notes fit max_tokens


def test_an_edited_note_is_recomputed_and_a_missing_note_stops_extraction_before_any_work(trainer, referring_dataset):
    trainer.extract(progress=False)
    note = referring_dataset / "imagesTr" / "referring_001.txt"
    original = note.read_text(encoding="utf-8")
    backup = note.with_suffix(".bak")
    shutil.copy2(note, backup)
    try:
        note.write_text("Segment the nodule in the lower right.\n", encoding="utf-8")
        assert trainer.extract(progress=False)["computed"] == 1
        note.unlink()
        before = sorted(p.name for p in trainer.note_store().root.iterdir())
        with pytest.raises(NoteError, match=r"1 of \d+ training cases have no usable note: .*referring_001\.txt"):
            trainer.extract(progress=False)
        assert sorted(p.name for p in trainer.note_store().root.iterdir()) == before
    finally:
        shutil.move(backup, note)
    assert note.read_text(encoding="utf-8") == original
    assert trainer.extract(progress=False)["computed"] == 1


def test_frozen_encoder_and_training_only_modules_stay_out_of_the_network(trainer):
    net = trainer.network
    assert isinstance(net.conditioner, NoteConditioner) and net.conditioner.spec == "minilm"
    names = [n for n, _ in net.named_parameters()]
    assert not [n for n in names if any(part in n for part in AUX_PARTS)]
    assert not any("conditioner" in k or "encoder.model" in k for k in net.state_dict())
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in trainer.training_only.parameters()} <= optimised
    assert {id(p) for p in net.parameters()} <= optimised
    encoder = __import__("nnunet_textguided.conditioning.slices", fromlist=["get_encoder"]).get_encoder("minilm")
    assert not {id(p) for p in encoder.parameters()} & optimised
    assert not any(p.requires_grad for p in encoder.parameters())
    assert trainer.inference_allowed_mirroring_axes is None  # notes name sides: no test-time mirroring


def test_a_train_step_uses_the_batch_notes_and_updates_network_and_reconstructors_only(trainer):
    trainer.set_case_notes(["referring_000"])  # loads the store
    trainer.note_conditioner().set_notes(None)
    encoder = __import__("nnunet_textguided.conditioning.slices", fromlist=["get_encoder"]).get_encoder("minilm")
    enc_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    net_before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    aux_before = {k: v.clone() for k, v in trainer.training_only.state_dict().items()}
    patch = trainer.configuration_manager.patch_size
    batch = {"data": torch.randn(2, 1, *patch), "target": torch.randint(0, 2, (2, 1, *patch)).float(),
             "keys": ["referring_000", "referring_001"]}
    trainer.network.train()
    out = trainer.train_step(batch)
    assert torch.isfinite(torch.as_tensor(out["loss"]))
    assert trainer.note_conditioner().tokens is None  # notes are cleared after the step
    changed = lambda before, now: [k for k in before if not torch.equal(before[k], now[k])]  # noqa: E731
    assert changed(net_before, trainer.network.state_dict())
    assert changed(aux_before, trainer.training_only.state_dict())
    assert not changed(enc_before, encoder.state_dict())
    with pytest.raises(KeyError, match="no stored note for case nope"):
        trainer.train_step({**batch, "keys": ["referring_000", "nope"]})


def test_checkpoint_holds_the_inference_graph_as_network_weights_and_the_rest_apart(trainer, tmp_path):
    trainer.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    ck = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert set(ck["network_weights"]) == set(trainer.network.state_dict())
    assert set(ck["training_only_weights"]) == set(trainer.training_only.state_dict())
    # what nnU-Net's predictor does: build the network from the plans and load the weights strictly
    fresh = type(trainer).build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, trainer.label_manager.num_segmentation_heads, False)
    fresh.load_state_dict(ck["network_weights"], strict=True)
    assert not [t for t in tmp_path.iterdir() if t.name.startswith(".")]  # atomic write left no temp file


def test_resume_restores_training_only_weights_and_refuses_changed_settings(trainer, tmp_path):
    trainer.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    saved = {k: v.clone() for k, v in trainer.training_only.state_dict().items()}
    with torch.no_grad():
        for p in trainer.training_only.parameters():
            p.add_(1.0)
    trainer.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert all(torch.equal(v, saved[k]) for k, v in trainer.training_only.state_dict().items())
    ck = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    ck["init_args"]["plans"]["configurations"]["2d_tiny"]["textguided"]["max_tokens"] = 10
    torch.save(ck, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match=r"max_tokens: 10 -> 18.*the configuration's textguided settings"):
        trainer.load_checkpoint(str(tmp_path / "other.pth"))


def test_final_validation_gives_each_case_its_own_note(trainer):
    from nnunet_textguided.training.base import CaseLoadHookDatasetClass
    seen = {}

    class FakeDataset:
        def __init__(self, folder, keys, **kwargs):
            self.identifiers = keys

        def load_case(self, key):
            return key

    def on_load(key):
        trainer.set_case_notes([key])
        seen[key] = trainer.note_conditioner().tokens[0].clone()

    dataset = CaseLoadHookDatasetClass(FakeDataset, on_load)("folder", ["referring_002", "referring_005"])
    for k in dataset.identifiers:
        assert dataset.load_case(k) == k
        assert torch.equal(trainer.note_conditioner().tokens[0], unpack_note(trainer.note_store().load(k))[0])
    assert not torch.equal(seen["referring_002"], seen["referring_005"])
    trainer.note_conditioner().set_notes(None)


def test_table_iii_rows_switch_the_modules_the_paper_names(trainer):
    """Table III: (b) no CLR, (c) no CVR, (d) CI only — CCL stays, it is part of CI (Sec. III-B2) — and (e) no CI
    (no text, no auxiliary module at all)."""
    from nnunet_textguided.networks.reclmis import RecLMIS
    from nnunet_textguided.training.reclmis import (RecLMISTrainer_CI, RecLMISTrainer_noCI, RecLMISTrainer_noCLR,
                                                    RecLMISTrainer_noCVR)
    assert RecLMISTrainer_noCLR.own_settings() == {"loss_clr": 0.0}
    assert RecLMISTrainer_noCVR.own_settings() == {"loss_cvr": 0.0}
    own = RecLMISTrainer_CI.own_settings()
    assert own == {"loss_cvr": 0.0, "loss_clr": 0.0}
    weights = {k: own.get(f"loss_{k}", v) for k, v in trainer.textguided["loss_weights"].items()}
    assert weights["ccl"] == 0.2
    aux = RecLMISTrainer_CI.build_training_only_modules(dict(trainer.textguided, loss_weights=weights),
                                                        trainer.network)
    assert aux is not None  # the interest heads that CCL needs
    assert RecLMISTrainer_noCI.own_settings() == {"use_ci": False, "loss_cvr": 0.0, "loss_clr": 0.0, "loss_ccl": 0.0}
    net = trainer.network
    plain = RecLMIS(1, 2, net.text_dim, features=net.features, strides=[list(s) for s in net.strides],
                    patch_size=net.patch_size, use_ci=False)
    assert plain.text_proj is None and plain.interaction is None
    x = torch.randn(2, 1, *net.patch_size)
    tokens, mask = torch.randn(2, 5, net.text_dim), torch.ones(2, 5, dtype=torch.bool)
    plain.eval()
    torch.testing.assert_close(plain.segment(x, tokens, mask), plain.segment(x, torch.randn_like(tokens), mask))
    with pytest.raises(ValueError, match="use_ci=false"):
        RecLMISTrainer_noCI.build_training_only_modules(
            dict(trainer.textguided, loss_weights={"cvr": 1.0, "clr": 0.0, "ccl": 0.0, "seg": 5.0}), plain)


