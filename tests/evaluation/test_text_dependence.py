"""Text-dependence harness: true vs shuffled notes, with a vision-only nnU-Net baseline on the referring data."""
from __future__ import annotations

import json
import os

import pytest

from conftest import REFERRING_ID, run_cmd
from nnunet_textguided.evaluation.text_dependence import note_variants, shuffle_notes


def test_generic_notes_are_deranged():
    notes = {f"c{i}": f"note {i}" for i in range(7)}
    out = shuffle_notes(notes, seed=1)
    assert sorted(out.values()) == sorted(notes.values())
    assert all(out[c] != notes[c] for c in notes)
    assert shuffle_notes(notes, seed=1) == out
    with pytest.raises(ValueError):
        shuffle_notes({"a": "x"})


def test_referring_notes_name_another_position():
    from nnunet_textguided.data.referring import generate_referring_case, parse_cell
    notes = {f"c{i}": generate_referring_case(i, seed=5).note for i in range(12)}
    out = shuffle_notes(notes)
    assert all(parse_cell(out[c]) != parse_cell(notes[c]) for c in notes)


def test_auxiliary_notes_travel_with_their_note():
    """Identical notes (common in QaTa) must not mix up auxiliary notes: each goes with its own case's note."""
    notes = {"a": "same", "b": "same", "c": "other", "d": "fourth"}
    aux = {"b": "aux of b", "c": "aux of c"}
    variants = note_variants(notes, aux, seed=3)
    assert variants["true"] == (notes, aux)
    shuffled, shuffled_aux = variants["shuffled"]
    sources = {c: next(s for s in notes if notes[s] == shuffled[c] and (aux.get(s) == shuffled_aux.get(c)))
               for c in notes}
    assert sorted(sources.values()) == sorted(notes)  # one consistent source case per receiver
    assert all(shuffled_aux.get(c) == aux.get(s) for c, s in sources.items())


@pytest.mark.slow
def test_vision_only_baseline_is_text_blind_and_below_a_referring_model(referring_dataset, tmp_path):
    run_cmd("nnUNetv2_train", REFERRING_ID, "2d_tiny", "0", "-tr", "nnUNetTrainer_2epochs", "-device", "cpu")
    r = run_cmd("nnunet-textguided", "text-dependence", "-d", REFERRING_ID, "-c", "2d_tiny",
                "-tr", "nnUNetTrainer_2epochs", "-o", tmp_path)
    assert "| nnUNetTrainer_2epochs |" in r.stdout
    result = json.loads((tmp_path / "text_dependence.json").read_text())
    dice = result["dice"]
    vision = dice["nnUNetTrainer_2epochs"]
    # nnU-Net never reads the note: shuffled notes change nothing, bit for bit
    assert vision["true"] == vision["shuffled"]
    for case in os.listdir(tmp_path / "nnUNetTrainer_2epochs" / "true_notes"):
        if case.endswith(".png"):
            a = (tmp_path / "nnUNetTrainer_2epochs" / "true_notes" / case).read_bytes()
            assert a == (tmp_path / "nnUNetTrainer_2epochs" / "shuffled_notes" / case).read_bytes()
    # the inputs differ only in their notes, and every note moved
    for case in result_cases(tmp_path):
        true = (tmp_path / "input_true_notes" / f"{case}.txt").read_text()
        assert true != (tmp_path / "input_shuffled_notes" / f"{case}.txt").read_text()
    # vision alone cannot know which of the 3 objects is meant: segmenting all of them gives ~2/(K+1)
    assert abs(dice["segment every object (vision-only reference)"]["true"] - 0.5) < 0.05
    assert dice["perfect referring model"] == {"true": 1.0, "shuffled": 0.0}
    assert vision["true"] < 0.75
    # bad input: a trainer that was never trained
    bad = run_cmd("nnunet-textguided", "text-dependence", "-d", REFERRING_ID, "-c", "2d_tiny", "-tr",
                  "nnUNetTrainer_5epochs", "-o", tmp_path / "bad", check=False)
    assert bad.returncode == 2 and "nnUNetTrainer_5epochs" in bad.stderr


def result_cases(folder):
    return sorted(f[:-9] for f in os.listdir(folder / "input_true_notes") if f.endswith("_0000.png"))
