"""Catalog 13: a checkpoint trained with another encoder than the one configured.

Resuming (``nnUNetv2_train --c``) under another text encoder and predicting after the weights behind the recorded
encoder spec changed both stop with a message naming the encoder and the fix; the checkpoint and an output folder of
earlier predictions stay byte-identical.
"""
import json

from conftest import REFERRING_ID, run_cmd
from reliability_helpers import (NOTE_CONFIG, NOTE_TRAINER, PREDICT_ARGS, assert_unchanged, build_model_folder,
                                 configure, previous_predictions, private_dataset, snapshot)


def test_resuming_with_another_text_encoder_stops_and_names_the_checkpoint(referring_dataset, tmp_path, monkeypatch):
    private_dataset(referring_dataset, tmp_path, monkeypatch)
    model = build_model_folder(REFERRING_ID, NOTE_CONFIG, NOTE_TRAINER)  # trained with the bundled MiniLM
    before = snapshot(model)
    configure(REFERRING_ID, NOTE_CONFIG, "reclmis", text_encoder="tiny-bert")  # the configuration changed since
    r = run_cmd("nnUNetv2_train", REFERRING_ID, NOTE_CONFIG, 0, "-tr", NOTE_TRAINER, "--c", "-device", "cpu",
                check=False, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    assert f"{checkpoint} was trained with encoders minilm" in out, out[-3000:]
    assert "but this run uses tiny-bert" in out and "Use the same encoder settings" in out
    after = assert_unchanged(before, model)
    assert all(k.startswith("fold_0/training_log_") for k in set(after) - set(before))  # only nnU-Net's new log


def test_prediction_refuses_other_weights_behind_the_recorded_encoder_spec(referring_dataset, tmp_path, monkeypatch):
    from nnunet_textguided.encoders import save_tiny_encoder
    raw, _ = private_dataset(referring_dataset, tmp_path, monkeypatch)
    spec = save_tiny_encoder("tiny-bert", tmp_path / "bert")  # hf:<dir>, a local text encoder
    configure(REFERRING_ID, NOTE_CONFIG, "reclmis", text_encoder=spec)
    model = build_model_folder(REFERRING_ID, NOTE_CONFIG, NOTE_TRAINER)
    recorded = json.loads((model / "plans.json").read_text())["configurations"][NOTE_CONFIG]["textguided"]
    assert recorded["text_encoder"] == spec and recorded["encoders"][spec]["weight_hash"]
    model_before = snapshot(model)
    assert save_tiny_encoder("tiny-bert?seed=1", tmp_path / "bert") == spec  # same spec, other weights
    out = tmp_path / "out"
    before = previous_predictions(out, model, raw / "labelsTs", ".png")
    r = run_cmd("nnUNetv2_predict_textguided", "-i", raw / "imagesTs", "-o", out, *PREDICT_ARGS, check=False,
                timeout=300)
    assert r.returncode != 0
    assert f"encoder '{spec}' (read from {tmp_path / 'bert'}) has weights sha256 " in r.stderr, r.stderr[-3000:]
    assert f"but the model was trained with {recorded['encoders'][spec]['weight_hash']}" in r.stderr
    assert "another file sits behind the same name. Put the training weights there" in r.stderr
    assert snapshot(out) == before  # stopped while loading the model: nothing written
    assert_unchanged(model_before, model)


def test_prediction_refuses_a_checkpoint_copied_from_a_model_trained_with_another_encoder(referring_dataset, tmp_path,
                                                                                         monkeypatch):
    import shutil
    raw, _ = private_dataset(referring_dataset, tmp_path, monkeypatch)
    configure(REFERRING_ID, NOTE_CONFIG, "reclmis", text_encoder="tiny-bert")
    other = tmp_path / "other_model"
    shutil.copytree(build_model_folder(REFERRING_ID, NOTE_CONFIG, NOTE_TRAINER), other)  # trained with tiny-bert
    configure(REFERRING_ID, NOTE_CONFIG, "reclmis", text_encoder="minilm")
    model = build_model_folder(REFERRING_ID, NOTE_CONFIG, NOTE_TRAINER)  # the same folder, now with MiniLM
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    shutil.copy2(other / "fold_0" / "checkpoint_final.pth", checkpoint)  # a user copies the wrong file in
    model_before = snapshot(model)
    out = tmp_path / "out"
    before = previous_predictions(out, model, raw / "labelsTs", ".png")
    r = run_cmd("nnUNetv2_predict_textguided", "-i", raw / "imagesTs", "-o", out, *PREDICT_ARGS, check=False,
                timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"nnUNetv2_predict_textguided: error: {checkpoint} was trained with encoders tiny-bert (" in r.stderr
    assert f"but {model / 'plans.json'} of its model folder records minilm (" in r.stderr
    assert "the checkpoint belongs to another model folder. Put the checkpoint back" in r.stderr
    assert snapshot(out) == before
    assert snapshot(model) == model_before
