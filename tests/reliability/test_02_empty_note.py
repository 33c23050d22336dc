"""Catalog 2: an empty or whitespace-only note, at training extraction and at prediction."""
from reliability_helpers import check_bad_note


def test_a_whitespace_only_note_stops_extraction_and_prediction_and_keeps_what_exists(referring_dataset, tmp_path,
                                                                                     monkeypatch, capsys):
    check_bad_note(referring_dataset, tmp_path, monkeypatch, capsys,
                   spoil=lambda note: note.write_text(" \n\t \r\n", encoding="utf-8"),
                   expected=["is empty; write the case's clinical note into it"])
