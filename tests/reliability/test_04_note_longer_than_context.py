"""Catalog 4: a note longer than the tokens the model reads (RecLMIS: max_tokens 18, within MiniLM's context of 256).

Documented rule (README, "When something goes wrong"): a note keeps its first L = min(max_tokens, encoder context)
tokens, ending with its end token; the rest is never seen. Extraction and prediction both go on (exit 0) and print
one warning naming the case, its file and its token count. The other store entries stay byte-identical.
"""
import shutil

import numpy as np

from conftest import REFERRING_ID, run_cmd
from reliability_helpers import (EXTRACT_ARGS, NOTE_CONFIG, NOTE_TRAINER, PREDICT_ARGS, build_model_folder, extract,
                                 private_dataset, snapshot, store_root)

TAIL = (" The remaining description continues at length about prior studies, comparison images, technique, "
        "patient positioning and the radiologist's recommendations for follow-up imaging in six months.")


def test_a_long_note_is_truncated_by_the_documented_rule_with_a_warning_naming_the_case(referring_dataset, tmp_path,
                                                                                       monkeypatch, capsys):
    raw, pre = private_dataset(referring_dataset, tmp_path, monkeypatch)
    rc, err = extract(EXTRACT_ARGS, capsys)
    assert rc == 0 and "warning" not in err, err  # the dataset's own notes fit
    store = store_root(pre)
    before = snapshot(store)

    note = raw / "imagesTr" / "referring_005.txt"
    note.write_text(note.read_text().strip() + TAIL)
    rc, err = extract(EXTRACT_ARGS, capsys)
    assert rc == 0, err
    assert "warning: 1 of 1 notes are longer than the 18 tokens this model reads (max_tokens 18, encoder 'minilm')" \
        in err, err
    assert f"referring_005 ({note}, " in err and "Shorten these notes" in err
    after = snapshot(store)
    changed = sorted(k for k in before if after[k] != before[k])
    assert [k.rsplit("/", 1)[1] for k in changed] == ["referring_005.json", "referring_005.npy"]
    entry = next(store.rglob("referring_005.npy"))
    kept = np.load(entry)
    assert kept[:, -1].sum() == 18  # every one of the 18 positions holds a token of the note

    # the rule: what lies past the window is not seen, so a longer tail gives the same tokens
    note.write_text(note.read_text() + " And a further sentence nobody reads.")
    rc, err = extract(EXTRACT_ARGS, capsys)
    assert rc == 0 and "referring_005" in err
    assert np.array_equal(np.load(entry), kept)

    # every training start says it in the training log, also when the store is complete (nothing extracted, so no
    # extraction warning), with the max_tokens that reads every note
    from nnunet_textguided.conditioning.extract import build_trainer
    trainer = build_trainer(str(REFERRING_ID), NOTE_CONFIG, NOTE_TRAINER, device="cpu")
    trainer.log_file = tmp_path / "training_log.txt"
    trainer._register_notes()
    log = trainer.log_file.read_text()
    from nnunet_textguided.conditioning.slices import get_encoder
    longest = get_encoder("minilm").token_count(note.read_text())
    assert longest > 18 and "WARNING: 1 of" in log and "training notes are longer than the 18 tokens" in log, log
    assert f"--set max_tokens={longest} reads every note" in log, log

    # prediction reads new notes the same way and names the case too
    model = build_model_folder(REFERRING_ID, NOTE_CONFIG, NOTE_TRAINER)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((raw / "imagesTs").iterdir())[:2]:  # one case: image + note
        shutil.copy2(f, inputs / f.name)
    long_note = next(inputs.glob("*.txt"))
    long_note.write_text(long_note.read_text().strip() + TAIL)
    assert model.is_dir()
    r = run_cmd("nnUNetv2_predict_textguided", "-i", inputs, "-o", tmp_path / "out", *PREDICT_ARGS, timeout=300)
    assert "nnUNetv2_predict_textguided: warning: 1 of 1 notes are longer than the 18 tokens" in r.stderr, r.stderr
    assert f"{long_note.name[:-4]} ({long_note}, " in r.stderr
    assert (tmp_path / "out" / f"{long_note.name[:-4]}.png").is_file()
