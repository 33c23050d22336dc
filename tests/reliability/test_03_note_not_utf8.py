"""Catalog 3: a note that is not valid UTF-8 (Latin-1 bytes), at training extraction and at prediction."""
from reliability_helpers import check_bad_note


def test_a_note_that_is_not_utf8_stops_extraction_and_prediction_and_keeps_what_exists(referring_dataset, tmp_path,
                                                                                      monkeypatch, capsys):
    check_bad_note(referring_dataset, tmp_path, monkeypatch, capsys,
                   spoil=lambda note: note.write_bytes("Lésion du poumon gauche".encode("latin-1")),
                   expected=["is not UTF-8 text", "save the note as UTF-8"])
