"""Note-guided training and prediction through nnU-Net's stock commands (RecLMIS on the referring dataset).

Stock nnUNetv2_train trains RecLMISTrainer_2epochs; stock nnUNetv2_predict refuses the model; the note-aware
predictor reads each case's <CASE>.txt, refuses a folder with a case without a note before predicting
anything, and its output changes with the notes (the model reads them)."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REFERRING_ID, run_cmd
from nnunet_textguided.evaluation.text_dependence import read_notes, shuffle_notes

pytestmark = pytest.mark.slow
TRAINER = "RecLMISTrainer_2epochs"
#: the tiny preset under a name of our own, seeded (a setting like any other: add-config --set seed=1)
CONFIG = "2d_tiny_seed1"
PREDICT = ("-d", REFERRING_ID, "-c", CONFIG, "-f", 0, "-tr", TRAINER, "-device", "cpu", "-npp", 1, "-nps", 1)


@pytest.fixture(scope="module")
def trained(referring_dataset):
    run_cmd("nnunet-textguided", "add-config", "-d", REFERRING_ID, "2d_tiny", "--name", CONFIG, "--method", "reclmis",
            "--set", "seed=1")
    run_cmd("nnUNetv2_train", REFERRING_ID, CONFIG, 0, "-tr", TRAINER, "-device", "cpu")
    folder = Path(os.environ["nnUNet_results"]) / referring_dataset.name / f"{TRAINER}__nnUNetPlans__{CONFIG}"
    return referring_dataset, folder


def test_checkpoint_keeps_training_only_modules_apart_and_validation_is_scored(trained):
    _, folder = trained
    ck = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    parts = ("cvr", "clr", "interest", "reconstructor")
    assert ck["training_only_weights"] and not any(p in k for k in ck["network_weights"] for p in parts)
    assert {k.split(".")[0] for k in ck["network_weights"]} == {"encoder", "text_proj", "interaction", "decoder"}
    assert ck["inference_allowed_mirroring_axes"] is None
    assert (folder / "fold_0" / "validation" / "summary.json").is_file()


def test_stock_predict_refuses_and_names_the_note_aware_command(trained, tmp_path):
    raw, _ = trained
    r = run_cmd("nnUNetv2_predict", "-i", raw / "imagesTs", "-o", tmp_path, *PREDICT, check=False)
    assert r.returncode != 0 and "nnUNetv2_predict_textguided" in r.stdout + r.stderr
    assert not list(tmp_path.glob("*.png"))


def test_a_case_without_a_note_stops_the_run_before_anything_is_predicted(trained, tmp_path):
    raw, _ = trained
    inputs = tmp_path / "in"
    shutil.copytree(raw / "imagesTs", inputs)
    victim = sorted(inputs.glob("*.txt"))[1]
    victim.unlink()
    r = run_cmd("nnUNetv2_predict_textguided", "-i", inputs, "-o", tmp_path / "out", *PREDICT, check=False)
    assert r.returncode == 2 and victim.name in r.stderr and "<CASE>.txt" in r.stderr
    assert not list((tmp_path / "out").glob("*.png"))


def test_predictions_follow_the_notes(trained, tmp_path):
    raw, _ = trained
    cases = sorted(p.name[:-9] for p in (raw / "imagesTs").glob("*_0000.png"))
    notes = read_notes(raw / "imagesTs", cases)
    probabilities = {}
    for name, variant in (("true", notes), ("again", notes), ("shuffled", shuffle_notes(notes))):
        inputs = tmp_path / f"in_{name}"
        inputs.mkdir()
        for c in cases:
            shutil.copy2(raw / "imagesTs" / f"{c}_0000.png", inputs)
            (inputs / f"{c}.txt").write_text(variant[c], encoding="utf-8")
        out = tmp_path / f"out_{name}"
        # "again": nnU-Net's sequential path (-npp 0 -nps 0) must give the same notes to the same cases
        workers = ("-npp", 0, "-nps", 0) if name == "again" else ()
        run_cmd("nnUNetv2_predict_textguided", "-i", inputs, "-o", out, *PREDICT, *workers, "--save_probabilities")
        assert len(list(out.glob("*.png"))) == len(cases)
        probabilities[name] = {c: np.load(out / f"{c}.npz")["probabilities"] for c in cases}
    for c in cases:
        np.testing.assert_array_equal(probabilities["true"][c], probabilities["again"][c])
        # another case's note (naming another position) changes what the network predicts for the same image. CPU
        # prediction is deterministic (the "again" run is bitwise equal), so any change above float rounding is the
        # note's: a 2-epoch model's dependence on it can be small (9e-5 seen for one case)
        assert np.abs(probabilities["true"][c] - probabilities["shuffled"][c]).max() > 1e-6
