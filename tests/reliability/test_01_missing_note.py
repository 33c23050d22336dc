"""Catalog 1: a note-guided model's case without <CASE>.txt, at training extraction and at prediction."""
from reliability_helpers import check_bad_note


def test_a_case_without_a_note_stops_extraction_and_prediction_and_keeps_what_exists(referring_dataset, tmp_path,
                                                                                    monkeypatch, capsys):
    check_bad_note(referring_dataset, tmp_path, monkeypatch, capsys, spoil=lambda note: note.unlink(),
                   expected=["does not exist", "write it as <CASE>.txt (UTF-8) beside the case's image files"])
