"""TGCNetTrainer in-process on the synthetic referring dataset with auxiliary notes: the (note, auxiliary note)
tokens in the store equal what the note-aware predictor computes, adding / editing / deleting an auxiliary note
recomputes exactly that case and an empty one stops extraction before any work, the frozen text and CLIP towers
stay out of the network, the optimizer and the checkpoint weights (and unchanged by a train step), auxiliary notes
are dropped in training mode only, and the ablation trainers build their variant's modules."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_textguided.conditioning.dense import NoteImageConditioner
from nnunet_textguided.conditioning.extract import build_trainer
from nnunet_textguided.conditioning.notes import NoteConditioner, NoteError, encode_notes, note_sha256, unpack_note
from nnunet_textguided.conditioning.slices import get_encoder
from nnunet_textguided.data.referring import auxiliary_note, generate_referring_case
from nnunet_textguided.inference.predict import TextGuidedPredictor

TRAINER = "TGCNetTrainer_2epochs"
#: training cases given an auxiliary note by this module (the shared dataset has none); the others have none
AUX_CASES = ("referring_000", "referring_002", "referring_003", "referring_005")
TOP_LEVEL = {"sse", "date", "text_proj", "vlcm", "class_embed", "decoder"}


def _aux_text(case: str) -> str:
    """The generator's auxiliary note for a case of the shared dataset (same target, other words)."""
    from conftest import REFERRING_ID
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    raw = Path(os.environ["nnUNet_raw"]) / maybe_convert_to_dataset_name(REFERRING_ID)
    seed = json.loads((raw / "referring.json").read_text())["parameters"]["seed"]
    return auxiliary_note(generate_referring_case(int(case.rsplit("_", 1)[1]), seed=seed), seed)


@pytest.fixture(scope="module")
def aux_notes(referring_dataset):
    """Auxiliary notes for AUX_CASES in the shared dataset's imagesTr, removed again at teardown (with any other
    ``.aux.txt`` a test of this module left there)."""
    folder = referring_dataset / "imagesTr"
    assert not list(folder.glob("*.aux.txt")), "the shared referring dataset is expected without auxiliary notes"
    try:
        for case in AUX_CASES:
            (folder / f"{case}.aux.txt").write_text(_aux_text(case) + "\n", encoding="utf-8")
        yield folder
    finally:
        for p in folder.glob("*.aux.txt"):
            p.unlink()


@pytest.fixture(scope="module")
def trainer(aux_notes):
    from conftest import REFERRING_ID
    tr = build_trainer(str(REFERRING_ID), "2d_tiny", TRAINER, for_extraction=False)
    tr.initialize()
    return tr


def _case_files(folder):
    return {p.name[:-len("_0000.png")]: [str(p)] for p in sorted(folder.glob("*_0000.png"))}


def _store_snapshot(store) -> dict:
    return {p.name: p.read_bytes() for p in sorted(store.root.iterdir())}


def _stored_key(store, case) -> str:
    return json.loads((store.root / f"{case}.json").read_text())["source_sha256"]


def _batch(trainer, keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    return {"data": torch.randn(len(keys), 1, *patch, generator=g),
            "target": torch.randint(0, 2, (len(keys), 1, *patch), generator=g).float(), "keys": list(keys)}


def _conditioning_seen(trainer, step, batch) -> dict:
    """Run ``step(batch)`` and return the conditioning the network's segment() received."""
    net, seen = trainer.network, {}

    def spy(x, cond):
        seen.update({k: v.detach().clone() for k, v in cond.items() if torch.is_tensor(v)})
        return type(net).segment(net, x, cond)
    net.segment = spy
    try:
        step(batch)
    finally:
        del net.segment
    return seen


def test_stored_tokens_equal_what_the_predictor_computes_for_note_and_auxiliary_note(trainer, aux_notes):
    counts = trainer.extract(progress=False)
    n_cases = len(trainer.all_case_identifiers())
    assert counts["computed"] + counts["skipped"] == n_cases
    n = trainer.textguided["max_tokens"]
    store = trainer.note_store()
    assert store.identity.get("aux_notes") is True
    predictor = TextGuidedPredictor(device=torch.device("cpu"))
    predictor.network, predictor.dataset_json = trainer.network, trainer.dataset_json
    files = _case_files(aux_notes)
    with_aux, without_aux = AUX_CASES[0], "referring_001"
    cases = [with_aux, without_aux]
    for case, (tokens, mask) in zip(cases, predictor.read_case_notes([files[c] for c in cases])):
        stored_tokens, stored_mask = unpack_note(store.load(case))
        assert stored_tokens.shape == (2 * n, trainer.network.text_dim)  # note rows, then auxiliary note rows
        assert torch.equal(tokens[0], stored_tokens) and torch.equal(mask[0], stored_mask)
        assert stored_mask[:n].any()
        note = " ".join((aux_notes / f"{case}.txt").read_text(encoding="utf-8").split())
        aux = _aux_text(case) if case == with_aux else None
        assert _stored_key(store, case) == note_sha256((note, aux))
        # the in-memory API (set_note) hands the network the same tokens
        predictor.set_note(note, aux)
        cond = trainer.note_conditioner()
        assert torch.equal(cond.tokens[0], stored_tokens) and torch.equal(cond.mask[0], stored_mask)
        cond.set_notes(None)
        if aux is not None:  # the auxiliary half is the auxiliary note encoded on its own
            aux_states, aux_mask = encode_notes(trainer.textguided["text_encoder"], [aux], n)
            assert torch.equal(stored_tokens[n:], aux_states[0]) and torch.equal(stored_mask[n:], aux_mask[0])
            assert stored_mask[n:].any()
        else:  # no auxiliary note: zero states and an all-False mask
            assert not stored_tokens[n:].any() and not stored_mask[n:].any()
    # with the same texts the store key of a case without auxiliary note is that of the note alone
    assert _stored_key(store, without_aux) == note_sha256(" ".join(
        (aux_notes / f"{without_aux}.txt").read_text(encoding="utf-8").split()))
    again = trainer.extract(progress=False)
    assert (again["computed"], again["skipped"], again["truncated"]) == (0, n_cases, {})


def test_adding_editing_or_deleting_an_auxiliary_note_recomputes_that_case_and_an_empty_one_stops_before_any_work(
        trainer, aux_notes):
    trainer.extract(progress=False)
    store, n = trainer.note_store(), trainer.textguided["max_tokens"]
    case, other = "referring_004", AUX_CASES[1]
    aux = aux_notes / f"{case}.aux.txt"
    original = store.load(case).copy()
    snapshot = _store_snapshot(store)
    try:
        aux.write_text("Solitary focal opacity, upper zone, left side.\n", encoding="utf-8")  # added
        assert trainer.extract(progress=False)["computed"] == 1
        added = store.load(case)
        changed = [k for k, v in _store_snapshot(store).items() if snapshot[k] != v]
        assert sorted(changed) == [f"{case}.json", f"{case}.npy"]  # exactly that case
        assert (added[n:, -1] > 0.5).any() and (added[:n] == original[:n]).all()
        aux.write_text("Round well-defined density in the lower zone, right side.\n", encoding="utf-8")  # edited
        assert trainer.extract(progress=False)["computed"] == 1
        edited = store.load(case)
        assert (edited[:n] == original[:n]).all() and not (edited[n:] == added[n:]).all()
        aux.unlink()  # deleted: back to the note alone, bitwise what was stored before
        assert trainer.extract(progress=False)["computed"] == 1
        assert (store.load(case) == original).all() and _store_snapshot(store) == snapshot
        # an empty auxiliary note, while another case has work pending: nothing is computed, the file is named
        aux.write_text("  \n", encoding="utf-8")
        shutil.copy2(aux_notes / f"{other}.aux.txt", aux_notes / f"{other}.aux.bak")
        (aux_notes / f"{other}.aux.txt").write_text("Single circumscribed focus, central field.\n", encoding="utf-8")
        with pytest.raises(NoteError, match=r"1 of \d+ auxiliary notes of training cases have no usable note: "
                                            r".*referring_004\.aux\.txt is empty"):
            trainer.extract(progress=False)
        assert _store_snapshot(store) == snapshot
    finally:
        aux.unlink(missing_ok=True)
        if (aux_notes / f"{other}.aux.bak").exists():
            shutil.move(aux_notes / f"{other}.aux.bak", aux_notes / f"{other}.aux.txt")
    assert (aux_notes / f"{other}.aux.txt").read_text(encoding="utf-8") == _aux_text(other) + "\n"
    assert trainer.extract(progress=False)["computed"] == 0


def test_frozen_encoders_stay_out_of_the_network_and_optimizer_and_a_train_step_leaves_them_unchanged(trainer):
    net = trainer.network
    cond = net.conditioner
    assert isinstance(cond, NoteImageConditioner) and cond.aux
    assert (cond.spec, cond.image_spec) == ("minilm", "tiny-clip")
    text, clip = get_encoder(cond.spec), get_encoder(cond.image_spec)
    encoder_params = {id(p) for enc in (text, clip) for p in enc.parameters()}
    assert len(encoder_params) > 0
    assert not encoder_params & {id(p) for p in net.parameters()}
    state = net.state_dict()
    assert {k.split(".")[0] for k in state} == TOP_LEVEL
    assert not any(k.startswith("conditioner") or "encoder.model" in k for k in state)
    encoder_storages = {t.untyped_storage().data_ptr() for enc in (text, clip) for t in enc.state_dict().values()}
    assert not encoder_storages & {t.untyped_storage().data_ptr() for t in state.values()}
    assert not any(p.requires_grad for enc in (text, clip) for p in enc.parameters())
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in net.parameters()} == optimised and not encoder_params & optimised
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.training_only is None
    assert trainer.inference_allowed_mirroring_axes is None  # notes name sides: no test-time mirroring

    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in
              (("text", text), ("clip", clip), ("net", net))}
    trainer.network.train()
    out = trainer.train_step(_batch(trainer, [AUX_CASES[0]]))
    assert torch.isfinite(torch.as_tensor(out["loss"]))
    assert cond.tokens is None  # notes are cleared after the step
    after = {"text": text.state_dict(), "clip": clip.state_dict(), "net": net.state_dict()}
    changed = {name: [k for k in b if not torch.equal(b[k], after[name][k])] for name, b in before.items()}
    assert changed["text"] == [] and changed["clip"] == []
    assert changed["net"]
    assert not any(p.requires_grad for enc in (text, clip) for p in enc.parameters())


def test_auxiliary_notes_are_dropped_in_training_mode_only(trainer, monkeypatch):
    trainer.extract(progress=False)
    n = trainer.textguided["max_tokens"]
    keys = [AUX_CASES[0], "referring_001"]
    stored = {k: unpack_note(trainer.note_store().load(k)) for k in keys}
    assert stored[keys[0]][1][n:].any() and not stored[keys[1]][1][n:].any()
    monkeypatch.setitem(trainer.textguided, "aux_dropout", 1.0)
    batch = _batch(trainer, keys)

    trainer.network.train()
    seen = _conditioning_seen(trainer, trainer.train_step, batch)
    assert not seen["aux_mask"].any() and not seen["aux_tokens"].any()  # every auxiliary note dropped
    for i, k in enumerate(keys):  # the primary notes are kept as stored
        assert torch.equal(seen["tokens"][i], stored[k][0][:n]) and torch.equal(seen["mask"][i], stored[k][1][:n])

    trainer.network.eval()  # what nnU-Net's validation epoch does
    try:
        seen = _conditioning_seen(trainer, trainer.validation_step, batch)
    finally:
        trainer.network.train()
    for i, k in enumerate(keys):  # validation keeps them, bitwise
        assert torch.equal(seen["aux_tokens"][i], stored[k][0][n:])
        assert torch.equal(seen["aux_mask"][i], stored[k][1][n:])
    assert seen["aux_mask"][0].any()
    # the default rate is back and drops nothing at 0
    monkeypatch.undo()
    assert trainer.textguided["aux_dropout"] == pytest.approx(0.1)
    monkeypatch.setitem(trainer.textguided, "aux_dropout", 0.0)
    tokens, mask = torch.stack([stored[k][0] for k in keys]), torch.stack([stored[k][1] for k in keys])
    kept = trainer.augment_notes(tokens, mask)
    assert torch.equal(kept[0], tokens) and torch.equal(kept[1], mask)


EXPECTED_VARIANTS = {
    # trainer: (variant, modules that must exist, modules that must not)
    "TGCNetTrainer": ({"sse": "full", "text": "date", "alignment": "vlcm"},
                      ["sse.cnn", "sse.msda", "sse.p_v", "date.attn", "vlcm.gate_v", "vlcm.attn_t"], ["sse.up"]),
    "TGCNetTrainer_noDATE": ({"sse": "full", "text": "main", "alignment": "vlcm"},
                             ["sse.cnn", "vlcm.gate_v"], ["date.attn", "date.norm"]),
    "TGCNetTrainer_noSSE": ({"sse": "vit", "text": "date", "alignment": "vlcm"},
                            ["sse.p_v", "sse.up", "date.attn"], ["sse.cnn", "sse.msda", "sse.p_c"]),
    "TGCNetTrainer_noVLCM": ({"sse": "full", "text": "date", "alignment": "none"},
                             ["sse.cnn", "date.attn"], ["vlcm.gate_v", "vlcm.attn_v", "vlcm.attn_t"]),
    "TGCNetTrainer_none": ({"sse": "vit", "text": "main", "alignment": "none"},
                           ["sse.up"], ["sse.cnn", "date.attn", "vlcm.attn_v", "vlcm.gate_v"]),
    "TGCNetTrainer_CNNonly": ({"sse": "cnn", "text": "date", "alignment": "vlcm"},
                              ["sse.cnn", "sse.msda", "date.attn"], ["sse.p_v", "sse.up"]),
    "TGCNetTrainer_auxOnly": ({"sse": "full", "text": "aux", "alignment": "vlcm"},
                              ["sse.cnn", "vlcm.gate_v"], ["date.attn"]),
    "TGCNetTrainer_singleCA": ({"sse": "full", "text": "date", "alignment": "single"},
                               ["vlcm.attn_v"], ["vlcm.attn_t", "vlcm.gate_v"]),
    "TGCNetTrainer_biCA": ({"sse": "full", "text": "date", "alignment": "bidirectional"},
                           ["vlcm.attn_v", "vlcm.attn_t"], ["vlcm.gate_v"]),
}


def _modules(net) -> set[str]:
    return {name for name, _ in net.named_modules()}


@pytest.mark.parametrize("name", sorted(EXPECTED_VARIANTS))
def test_variant_trainers_build_their_modules(trainer, name):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    variant, present, absent = EXPECTED_VARIANTS[name]
    cls = recursive_find_trainer_class_by_name(name)
    short = recursive_find_trainer_class_by_name(f"{name}_2epochs")
    assert cls is not None and short is not None and issubclass(short, cls)
    full = {"sse": "full", "text": "date", "alignment": "vlcm"}
    assert {**full, **cls.own_settings()} == variant  # an ablation only changes the schema's defaults
    assert {**full, **{k: v for k, v in short.own_settings().items() if k in full}} == variant
    assert (short.own_settings()["epochs"], short.own_settings()["iterations_per_epoch"]) == (2, 4)
    # the tiny preset's settings as the dataset's plans hold them (the trainer fixture's block is resolved)
    plain = {k: v for k, v in trainer.configuration_manager.configuration.items() if k != "textguided"}
    plain["textguided"] = {"tgcnet": {"text_encoder": "minilm", "image_encoder": "tiny-clip",
                                      "unaligned_towers": True}}
    settings = cls.textguided_block(trainer.plans_manager, ConfigurationManager(plain))
    reads_aux = variant["text"] != "main"  # primary-note-only variants read no auxiliary notes at all
    uses_clip = variant["sse"] != "cnn"  # CNN-only loads no image tower
    assert settings["variant"] == variant and bool(settings.get("aux_notes")) == reads_aux
    assert (settings["image_encoder"] == "tiny-clip") == uses_clip
    # auxiliary notes are dropped (10 %) only where DATE fuses them with the primary note
    assert settings["aux_dropout"] == (0.1 if variant["text"] == "date" else 0.0)
    cm = ConfigurationManager({**trainer.configuration_manager.configuration, "textguided": settings})
    net = cls.build_network_architecture(trainer.plans_manager, cm, 1, trainer.label_manager.num_segmentation_heads,
                                         False)
    assert net.variant == variant and isinstance(net.conditioner, NoteConditioner)
    assert isinstance(net.conditioner, NoteImageConditioner) == uses_clip and net.conditioner.aux == reads_aux
    modules = _modules(net)
    assert set(present) <= modules, set(present) - modules
    assert not set(absent) & modules, set(absent) & modules
    # DATE without its cross-attention ("main", "aux") and no alignment ("none") have no weights
    weightless = {"date"} if variant["text"] != "date" else set()
    weightless |= {"vlcm"} if variant["alignment"] == "none" else set()
    assert {k.split(".")[0] for k in net.state_dict()} == TOP_LEVEL - weightless
    full = _modules(trainer.network)
    if name != "TGCNetTrainer":
        assert modules != full and sum(p.numel() for p in net.parameters()) != sum(
            p.numel() for p in trainer.network.parameters())


def test_a_variant_trainer_initialises_through_nnunet(aux_notes):
    from conftest import REFERRING_ID
    tr = build_trainer(str(REFERRING_ID), "2d_tiny", "TGCNetTrainer_noDATE_2epochs", for_extraction=False)
    tr.initialize()
    assert tr.textguided["variant"]["text"] == "main" and "date.attn" not in _modules(tr.network)
    assert not tr.network.conditioner.aux and tr.note_store().identity.get("aux_notes") is None
    assert tr.num_epochs == 2 and tr.num_iterations_per_epoch == 4


def test_towers_of_different_models_are_refused_unless_named(trainer):
    """The cost volume compares text and image features in one CLIP space: a pair from two models is refused
    with the fix; the tiny preset names its stand-in pair (unaligned_towers)."""
    from nnunet_textguided.settings import SettingsError
    from nnunet_textguided.training.tgcnet import TGCNetTrainer, TGCNetTrainer_CNNonly
    plain = {k: v for k, v in trainer.configuration_manager.configuration.items() if k != "textguided"}
    plain["textguided"] = {"tgcnet": {"text_encoder": "minilm", "image_encoder": "tiny-clip"}}
    with pytest.raises(SettingsError, match="one CLIP model's.*unaligned_towers=true"):
        TGCNetTrainer.textguided_block(trainer.plans_manager, ConfigurationManager(plain))
    # without an image tower there is no pair to align
    assert TGCNetTrainer_CNNonly.textguided_block(trainer.plans_manager, ConfigurationManager(plain))
    plain["textguided"] = {"tgcnet": {"text_encoder": "tiny-clip", "image_encoder": "tiny-clip"}}
    assert TGCNetTrainer.textguided_block(trainer.plans_manager, ConfigurationManager(plain))["image_encoder"] == \
        "tiny-clip"
