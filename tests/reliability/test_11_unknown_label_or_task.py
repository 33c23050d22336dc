"""Catalog 11: an unknown label phrase in --labels and an unknown --task stop nnUNetv2_predict_textguided (exit 2)
with the labels / tasks the model knows, before anything is written: an output folder of earlier predictions stays
byte-identical (its nnU-Net run record included)."""
import os
from pathlib import Path

import pytest

from conftest import UNIVERSAL_ID, run_cmd
from reliability_helpers import build_model_folder, previous_predictions, snapshot

TRAINER = "CDPDNetTrainer"
LABELS = ["liver", "spleen", "right kidney", "left kidney"]


@pytest.fixture(scope="module")
def universal_model(universal_dataset, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_results", str(results))
        model = build_model_folder(UNIVERSAL_ID, "3d_tiny", TRAINER)
    return universal_dataset, model, results


def predict(universal_model, out: Path, *extra):
    raw, _, results = universal_model
    return run_cmd("nnUNetv2_predict_textguided", "-i", raw / "imagesTs", "-o", out, "-d", UNIVERSAL_ID, "-c",
                   "3d_tiny", "-f", 0, "-tr", TRAINER, "-device", "cpu", "-npp", 1, "-nps", 1, "--disable_tta",
                   *extra, check=False, timeout=300, env={"nnUNet_results": str(results)})


def test_an_unknown_label_phrase_stops_with_the_known_labels(universal_model, tmp_path):
    raw, model, _ = universal_model
    out = tmp_path / "out"
    before = previous_predictions(out, model, raw / "labelsTs", ".nii.gz")
    r = predict(universal_model, out, "--labels", "left kidney, pizza", "--save_label_masks")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "nnUNetv2_predict_textguided: error: no clear label of this model for 'pizza'" in r.stderr
    assert f"Known labels: {', '.join(LABELS)}. Use one of them" in r.stderr
    assert snapshot(out) == before


def test_an_unknown_task_stops_with_the_known_tasks(universal_model, tmp_path):
    raw, model, _ = universal_model
    out = tmp_path / "out"
    before = previous_predictions(out, model, raw / "labelsTs", ".nii.gz")
    r = predict(universal_model, out, "--task", "PhantomLungs")
    assert r.returncode == 2, r.stderr[-3000:]
    assert ("nnUNetv2_predict_textguided: error: --task 'PhantomLungs' is not a task of this model; tasks: "
            "PhantomLiverSpleen, PhantomKidneys") in r.stderr
    assert snapshot(out) == before
    assert not os.path.exists(out / "textguided_selection.json")
