"""Catalog 12: stock nnUNetv2_predict on a note-conditioned model stops and names the note-aware command."""
from conftest import REFERRING_ID, run_cmd
from reliability_helpers import (NOTE_CONFIG, NOTE_TRAINER, PREDICT_ARGS, build_model_folder, previous_predictions,
                                 private_dataset, snapshot)


def test_stock_predict_refuses_a_note_model_names_the_note_aware_command_and_keeps_earlier_predictions(
        referring_dataset, tmp_path, monkeypatch):
    raw, _ = private_dataset(referring_dataset, tmp_path, monkeypatch)
    model = build_model_folder(REFERRING_ID, NOTE_CONFIG, NOTE_TRAINER)
    out = tmp_path / "out"
    before = previous_predictions(out, model, raw / "labelsTs", ".png")
    r = run_cmd("nnUNetv2_predict", "-i", raw / "imagesTs", "-o", out, *PREDICT_ARGS, check=False, timeout=300)
    assert r.returncode != 0
    assert "NotesRequiredError" in r.stderr
    assert ("no note was given. Predict with nnUNetv2_predict_textguided (same flags as nnUNetv2_predict) and put "
            "each case's note as <CASE>.txt beside its images") in r.stderr
    # refused while nnU-Net builds the network, before it writes its run record into the output folder
    assert snapshot(out) == before
