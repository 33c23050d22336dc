"""Per-case notes: reading, encoding into the store format, and the conditioner that hands them to networks."""
import pytest
import torch

from nnunet_textguided.conditioning.notes import (NoteConditioner, NoteError, NotesRequiredError, encode_notes,
                                                  note_path, pack_note, read_note, unpack_note)


def test_read_note_normalises_whitespace_and_names_the_file_when_missing_or_empty(tmp_path):
    (tmp_path / "case_1.txt").write_text("  Bilateral pulmonary infection,\n two infected areas.\n", encoding="utf-8")
    assert read_note(note_path(tmp_path, "case_1")) == "Bilateral pulmonary infection, two infected areas."
    with pytest.raises(NoteError, match=r"case_2\.txt does not exist.*<CASE>\.txt"):
        read_note(note_path(tmp_path, "case_2"))
    (tmp_path / "case_3.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(NoteError, match="case_3.txt is empty"):
        read_note(note_path(tmp_path, "case_3"))
    (tmp_path / "case_4.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(NoteError, match="not UTF-8"):
        read_note(note_path(tmp_path, "case_4"))


def test_encode_notes_pads_to_max_tokens_and_round_trips_through_the_store_format():
    states, mask = encode_notes("minilm", ["Segment the lesion in the upper left.", "Centre."], 18)
    assert states.shape == (2, 18, 384) and mask.shape == (2, 18) and mask.dtype == torch.bool
    assert mask[0].sum() > mask[1].sum() >= 2  # [CLS] ... [SEP]
    assert torch.all(states[~mask] == 0)
    s, m = unpack_note(pack_note(states[0], mask[0]))
    assert torch.equal(s, states[0]) and torch.equal(m, mask[0])
    # batching changes at most the last bits (the store and the predictor both encode one note at a time)
    again, _ = encode_notes("minilm", ["Segment the lesion in the upper left."], 18)
    assert torch.allclose(again[0], states[0], atol=1e-5)


def test_note_conditioner_broadcasts_one_case_note_and_refuses_to_run_without_notes():
    cond = NoteConditioner("minilm", 18, 384)
    x = torch.zeros(3, 1, 8, 8)
    with pytest.raises(NotesRequiredError, match="nnUNetv2_predict_textguided"):
        cond(x)
    tokens, mask = torch.randn(1, 18, 384), torch.ones(1, 18, dtype=torch.bool)
    cond.set_notes(tokens, mask)
    _, c = cond(x)
    assert c["tokens"].shape == (3, 18, 384) and torch.equal(c["tokens"][2], tokens[0])
    cond.set_notes(torch.randn(2, 18, 384), torch.ones(2, 18, dtype=torch.bool))
    with pytest.raises(ValueError, match="2 notes set for a batch of 3"):
        cond(x)
    with pytest.raises(ValueError, match="mask"):
        cond.set_notes(torch.randn(2, 18, 384))


def test_auxiliary_notes_are_optional_keyed_with_the_note_and_stacked_after_it(tmp_path):
    from nnunet_textguided.conditioning.notes import note_sha256, read_case_notes
    for case, note in (("a", "Segment the lesion in the upper left."), ("b", "Only the centre.")):
        (tmp_path / f"{case}.txt").write_text(note, encoding="utf-8")
    (tmp_path / "a.aux.txt").write_text("Solitary focal opacity,\nupper zone, left side.", encoding="utf-8")
    paths = {c: note_path(tmp_path, c) for c in ("a", "b")}
    notes = read_case_notes(paths, aux=True)
    assert notes == {"a": ("Segment the lesion in the upper left.", "Solitary focal opacity, upper zone, left side."),
                     "b": ("Only the centre.", None)}
    assert read_case_notes(paths) == {c: n for c, (n, _) in notes.items()}  # models without aux notes
    # the store key covers both texts; a pair without auxiliary note keys like the note alone
    assert note_sha256(notes["b"]) == note_sha256("Only the centre.")
    assert note_sha256(notes["a"]) != note_sha256(notes["a"][0])
    (tmp_path / "b.aux.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(NoteError, match=r"b\.aux\.txt is empty.*optional: fill such a file or delete it"):
        read_case_notes(paths, aux=True)

    cond = NoteConditioner("minilm", 12, 384, aux=True)
    tokens, mask = cond.encode([notes["a"]])
    assert tokens.shape == (1, 24, 384) and mask.shape == (1, 24)
    main, main_mask = encode_notes("minilm", [notes["a"][0]], 12)
    extra, extra_mask = encode_notes("minilm", [notes["a"][1]], 12)
    assert torch.equal(tokens[:, :12], main) and torch.equal(tokens[:, 12:], extra)
    assert torch.equal(mask, torch.cat((main_mask, extra_mask), 1))
    none, none_mask = cond.encode([notes["b"]])
    assert torch.equal(none[:, 12:], torch.zeros(1, 12, 384)) and not none_mask[:, 12:].any()
    cond.set_notes(tokens, mask)
    _, out = cond(torch.zeros(2, 1, 8, 8))
    assert torch.equal(out["aux_tokens"], extra.expand(2, -1, -1)) and torch.equal(out["mask"], main_mask.expand(2, -1))
    cond.set_notes(main, main_mask)  # notes without their auxiliary half
    with pytest.raises(ValueError, match="2 x 12 tokens"):
        cond(torch.zeros(1, 1, 8, 8))
