"""MPTPN's two stages through the user's commands on the synthetic referring dataset: `nnunet-textguided
pretrain-ppe` on the dataset's own imagesTr (nnU-Net's <CASE>_0000.png images with <CASE>.txt notes as the
captions), add-config with the setting ppe_weights pointing at the result, stock nnUNetv2_train, and note-aware prediction:
the run's log shows the stage-1 initialisation, the checkpoint holds the network only, and a case's prediction
depends on its note."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REFERRING_ID, run_cmd
from nnunet_textguided.evaluation.text_dependence import read_notes, shuffle_notes

pytestmark = pytest.mark.slow
TRAINER = "MPTPNTrainer_2epochs"
CONFIG = "2d_tiny_mptpn"  # 2d_tiny with the stage-1 checkpoint as a setting
PREDICT = ("-d", REFERRING_ID, "-c", CONFIG, "-f", 0, "-tr", TRAINER, "-device", "cpu", "-npp", 0, "-nps", 0)


def _cases(folder: Path) -> list[str]:
    return sorted(p.name[:-len("_0000.png")] for p in folder.glob("*_0000.png"))


@pytest.fixture(scope="module")
def trained(referring_dataset, tmp_path_factory):
    raw = referring_dataset
    ppe = tmp_path_factory.mktemp("mptpn_pipeline") / "ppe.pth"
    out = run_cmd("nnunet-textguided", "pretrain-ppe", raw / "imagesTr", "-o", ppe, "--size", 64, "--base-channels", 8,
                  "--text-encoder", "minilm", "--epochs", 1, "--batch-size", 8, "--device", "cpu", "--num-workers", 0,
                  "--no-progress")
    assert ppe.is_file(), out.stdout + out.stderr
    run_cmd("nnunet-textguided", "add-config", "-d", REFERRING_ID, "2d_tiny", "--name", CONFIG, "--method", "mptpn",
            "--set", f"ppe_weights={ppe}")
    run_cmd("nnUNetv2_train", REFERRING_ID, CONFIG, 0, "-tr", TRAINER, "-device", "cpu")
    folder = Path(os.environ["nnUNet_results"]) / raw.name / f"{TRAINER}__nnUNetPlans__{CONFIG}"
    return raw, folder, ppe


def test_stage1_initialised_the_run_and_the_checkpoint_holds_the_network_only(trained):
    _, folder, ppe = trained
    log = "".join(p.read_text() for p in (folder / "fold_0").glob("training_log_*.txt"))
    assert f"stage 1: PPE initialised from {ppe}" in log and "3 -> 1 input channels" in log
    ck = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert {k.split(".")[0] for k in ck["network_weights"]} == {"ppe", "msff", "up", "head"}
    settings = ck["init_args"]["plans"]["configurations"][CONFIG]["textguided"]
    assert settings["stage1"]["path"] == str(ppe) and settings["max_tokens"] == 10
    assert (folder / "fold_0" / "validation" / "summary.json").is_file()


def test_note_aware_prediction_depends_on_the_note(trained, tmp_path):
    raw = trained[0]
    cases = _cases(raw / "imagesTs")
    notes = read_notes(raw / "imagesTs", cases)
    shuffled = shuffle_notes(notes)
    folder, target = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for c in cases:
        for name, note in ((c, notes[c]), (f"{c}_shuffled", shuffled[c])):
            shutil.copy2(raw / "imagesTs" / f"{c}_0000.png", folder / f"{name}_0000.png")
            (folder / f"{name}.txt").write_text(note, encoding="utf-8")
    # the stage-1 file is not needed to predict: the run's checkpoint holds every weight
    moved = trained[2].with_suffix(".away")
    shutil.move(trained[2], moved)
    try:
        run_cmd("nnUNetv2_predict_textguided", "-i", folder, "-o", target, *PREDICT, "--save_probabilities")
    finally:
        shutil.move(moved, trained[2])
    probs = {p.name[:-len(".npz")]: np.load(p)["probabilities"] for p in target.glob("*.npz")}
    assert len(probs) == 2 * len(cases)
    for c in cases:
        assert np.abs(probs[f"{c}_shuffled"] - probs[c]).max() > 1e-4, c
