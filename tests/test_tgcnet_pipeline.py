"""TGC-Net training and prediction through nnU-Net's stock commands, with auxiliary notes (referring dataset).

Half of the training cases get an auxiliary note ``<CASE>.aux.txt`` (removed again after this module); stock
nnUNetv2_train trains TGCNetTrainer_2epochs; the note-aware predictor
gives the same probabilities for the same notes (also on nnU-Net's sequential path), other probabilities for the
cases whose auxiliary note was added, edited or deleted (and the same for the others), and other probabilities
with shuffled notes; the checkpoint's network weights hold TGC-Net's trainable modules only (no frozen encoder).
Stock nnUNetv2_predict's refusal of note models is the conditioner's (tests/test_notes_pipeline.py)."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REFERRING_ID, run_cmd
from nnunet_textguided.data.referring import auxiliary_note, generate_referring_case
from nnunet_textguided.evaluation.text_dependence import read_notes, shuffle_notes

pytestmark = pytest.mark.slow
TRAINER = "TGCNetTrainer_2epochs"
PREDICT = ("-d", REFERRING_ID, "-c", "2d_tiny", "-f", 0, "-tr", TRAINER, "-device", "cpu", "-npp", 1, "-nps", 1)
TOP_LEVEL = {"sse", "date", "text_proj", "vlcm", "class_embed", "decoder"}


def _aux_text(raw: Path, case: str) -> str:
    """The generator's auxiliary note for a case of the referring dataset (same target, other words)."""
    seed = json.loads((raw / "referring.json").read_text())["parameters"]["seed"]
    return auxiliary_note(generate_referring_case(int(case.rsplit("_", 1)[1]), seed=seed), seed)


def _cases(folder: Path) -> list[str]:
    return sorted(p.name[:-len("_0000.png")] for p in folder.glob("*_0000.png"))


@pytest.fixture(scope="module")
def training_aux_notes(referring_dataset):
    """Auxiliary notes for every other training case in the shared dataset's imagesTr, removed at teardown."""
    folder = referring_dataset / "imagesTr"
    assert not list(folder.glob("*.aux.txt")), "the shared referring dataset is expected without auxiliary notes"
    try:
        for case in _cases(folder)[::2]:
            (folder / f"{case}.aux.txt").write_text(_aux_text(referring_dataset, case) + "\n", encoding="utf-8")
        yield referring_dataset
    finally:
        for p in folder.glob("*.aux.txt"):
            p.unlink()


@pytest.fixture(scope="module")
def trained(training_aux_notes):
    raw = training_aux_notes
    run_cmd("nnUNetv2_train", REFERRING_ID, "2d_tiny", 0, "-tr", TRAINER, "-device", "cpu")
    folder = Path(os.environ["nnUNet_results"]) / raw.name / f"{TRAINER}__nnUNetPlans__2d_tiny"
    return raw, folder


@pytest.fixture(scope="module")
def notes_ts(trained):
    """The test cases' notes, and auxiliary notes for every other test case (the rest have none)."""
    raw, _ = trained
    cases = _cases(raw / "imagesTs")
    return cases, read_notes(raw / "imagesTs", cases), {c: _aux_text(raw, c) for c in cases[::2]}


#: the test cases whose auxiliary note the "aux changed" copies edit, delete and add (indices into the cases)
EDITED, DELETED, ADDED = 0, 2, 1


@pytest.fixture(scope="module")
def predictions(trained, notes_ts, tmp_path_factory):
    """Probabilities of nnUNetv2_predict_textguided on copies of imagesTs, {run: {case: probabilities}}:
    "parallel": the test cases with their notes (nnU-Net's worker path, -npp 1 -nps 1); "sequential" (nnU-Net's
    -npp 0 -nps 0 path): the same cases with the same notes, plus two renamed copies of every image: <case>_aux
    with only its auxiliary note added, edited or deleted (cases EDITED, DELETED, ADDED; the rest unchanged) and
    <case>_shuffled with another case's note (naming another position). The copies share one run: two
    nnU-Net starts instead of four."""
    raw, _ = trained
    cases, notes, aux = notes_ts
    edited, deleted, added = cases[EDITED], cases[DELETED], cases[ADDED]
    assert edited in aux and deleted in aux and added not in aux
    changed_aux = {**aux, edited: "Round well-defined density in the lower zone, left side.",
                   added: "Single circumscribed focus, upper zone, right side."}
    del changed_aux[deleted]
    assert changed_aux[edited] != aux[edited]
    shuffled = shuffle_notes(notes)
    root = tmp_path_factory.mktemp("tgcnet_predict")
    inputs = {"parallel": {c: (c, notes[c], aux.get(c)) for c in cases}}
    inputs["sequential"] = {**inputs["parallel"], **{f"{c}_aux": (c, notes[c], changed_aux.get(c)) for c in cases},
                            **{f"{c}_shuffled": (c, shuffled[c], aux.get(c)) for c in cases}}
    out = {}
    for run, items in inputs.items():
        folder, target = root / f"in_{run}", root / f"out_{run}"
        folder.mkdir()
        for name, (source, note, aux_note) in items.items():
            shutil.copy2(raw / "imagesTs" / f"{source}_0000.png", folder / f"{name}_0000.png")
            (folder / f"{name}.txt").write_text(note, encoding="utf-8")
            if aux_note is not None:
                (folder / f"{name}.aux.txt").write_text(aux_note, encoding="utf-8")
        workers = ("-npp", 0, "-nps", 0) if run == "sequential" else ()
        run_cmd("nnUNetv2_predict_textguided", "-i", folder, "-o", target, *PREDICT, *workers, "--save_probabilities")
        assert len(list(target.glob("*.png"))) == len(items)
        out[run] = {name: np.load(target / f"{name}.npz")["probabilities"] for name in items}
    return out


def test_checkpoint_holds_no_encoder_weights_and_validation_is_scored(trained):
    _, folder = trained
    ck = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert {k.split(".")[0] for k in ck["network_weights"]} == TOP_LEVEL
    assert not any("conditioner" in k or "encoder.model" in k for k in ck["network_weights"])
    assert "training_only_weights" not in ck and ck["inference_allowed_mirroring_axes"] is None
    settings = ck["init_args"]["plans"]["configurations"]["2d_tiny"]["textguided"]
    assert settings["aux_notes"] is True and settings["image_encoder"] == "tiny-clip"
    assert settings["variant"] == {"sse": "full", "text": "date", "alignment": "vlcm"}
    # exactly the trainable modules of a network built from the run's plans (what nnU-Net's predictor loads)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_textguided.training.tgcnet import TGCNetTrainer
    plans = PlansManager(str(folder / "plans.json"))
    net = TGCNetTrainer.build_network_architecture(plans, plans.get_configuration("2d_tiny"), 1, 2, False)
    net.load_state_dict(ck["network_weights"], strict=True)
    assert sum(t.numel() for t in ck["network_weights"].values()) == sum(t.numel() for t in net.state_dict().values())
    assert (folder / "fold_0" / "validation" / "summary.json").is_file()


def test_the_same_notes_give_the_same_probabilities_on_the_worker_and_the_sequential_path(notes_ts, predictions):
    cases, _, aux = notes_ts
    assert 0 < len(aux) < len(cases)  # cases with and without an auxiliary note
    for c in cases:
        np.testing.assert_array_equal(predictions["parallel"][c], predictions["sequential"][c])


def test_adding_editing_or_deleting_an_auxiliary_note_changes_that_case_only(notes_ts, predictions):
    cases = notes_ts[0]
    true, seq = predictions["parallel"], predictions["sequential"]
    changed = {cases[EDITED], cases[DELETED], cases[ADDED]}
    for c in cases:
        diff = np.abs(seq[f"{c}_aux"] - true[c]).max()
        if c in changed:
            assert diff > 1e-4, (c, diff)
        else:
            assert diff == 0, (c, diff)


def test_shuffled_notes_change_the_probabilities(notes_ts, predictions):
    true, seq = predictions["parallel"], predictions["sequential"]
    for c in notes_ts[0]:
        # another case's note (naming another position) changes what the network predicts for the same image
        assert np.abs(seq[f"{c}_shuffled"] - true[c]).max() > 1e-4, c
