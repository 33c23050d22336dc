"""Synthetic 2D referring dataset: objects, notes, note shuffling, vision-only Dice, on-disk nnU-Net compatibility."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from nnunet_textguided.data.referring import (all_objects_dice, cell_name, generate_referring_case, main,
                                              make_referring_dataset, parse_cell, shuffled_notes)

N_TRAIN, N_TEST, DATASET_ID = 6, 3, 992
BIN = Path(sys.executable).parent
POSITION_WORDS = {"upper", "middle", "lower", "left", "centre", "right"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_referring_dataset(tmp_path_factory.mktemp("nnUNet_raw"), dataset_id=DATASET_ID, n_train=N_TRAIN,
                                  n_test=N_TEST, seed=3)


def test_deterministic_per_seed_and_seeds_differ():
    a, b, c = (generate_referring_case(4, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) and a.note == b.note
    assert a.cells == b.cells and a.target_cell == b.target_cell
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("n_objects", [2, 3, 5, 9])
def test_label_is_exactly_one_of_k_separate_objects(n_objects):
    for i in range(25):
        case = generate_referring_case(i, seed=7, n_objects=n_objects)
        assert case.image.shape == case.label.shape == case.all_objects.shape == (64, 64)
        assert case.image.dtype == case.label.dtype == case.all_objects.dtype == np.uint8
        assert len(set(case.cells)) == n_objects and case.target_cell in case.cells
        # 8-connectivity after one dilation: objects are at least 2 pixels apart
        objects, n = ndimage.label(ndimage.binary_dilation(case.all_objects), structure=np.ones((3, 3)))
        assert n == n_objects
        target_ids = set(np.unique(objects[case.label == 1]))
        assert len(target_ids) == 1 and 0 not in target_ids
        assert np.array_equal(case.label == 1, (objects == target_ids.pop()) & (case.all_objects == 1))
        # every object lies inside its own grid cell; the target inside the named one
        cell = 64 / 3
        cells_of = lambda mask: {(int(y // cell), int(x // cell)) for y, x in zip(*np.nonzero(mask))}  # noqa: E731
        assert all(len(cells_of(objects == k)) == 1 for k in range(1, n + 1))
        assert cells_of(case.all_objects) == set(case.cells) and cells_of(case.label) == {case.target_cell}


def test_objects_look_alike_inside_and_brighter_than_background():
    case = generate_referring_case(0, seed=0)
    objects, n = ndimage.label(case.all_objects)
    inner = [ndimage.binary_erosion(objects == k, iterations=2) for k in range(1, n + 1)]
    means = [case.image[m].mean() for m in inner]
    background = case.image[~ndimage.binary_dilation(case.all_objects, iterations=2)].mean()
    assert min(means) > background + 60 and max(means) - min(means) < 40


def test_note_names_the_target_cell_and_nothing_else():
    phrasings = set()
    for i in range(60):
        case = generate_referring_case(i, seed=2)
        assert parse_cell(case.note) == case.target_cell, case.note
        # its position words are exactly the target's (parse_cell also rejects a second row or column word)
        words = set(re.findall(r"[a-z]+", case.note.lower().replace("top", "upper").replace("bottom", "lower")))
        assert words & POSITION_WORDS == set(cell_name(case.target_cell).split())
        phrasings.add(case.note.split(" the ")[0])
    assert len(phrasings) >= 4  # phrasing variety
    assert parse_cell("Segment the nodule in the centre.") == (1, 1)
    assert parse_cell("Target: the spot at the bottom right.") == (2, 2)
    for bad in ("Segment the nodule.", "upper left and lower right", "the upper lower left"):
        with pytest.raises(ValueError):
            parse_cell(bad)


def test_shuffled_notes_give_every_case_another_cell():
    notes = {f"c{i}": generate_referring_case(i, seed=5).note for i in range(30)}
    shuffled = shuffled_notes(notes, seed=1)
    assert shuffled.keys() == notes.keys() and sorted(shuffled.values()) == sorted(notes.values())
    for case_id, note in shuffled.items():
        assert parse_cell(note) != parse_cell(notes[case_id])
    assert shuffled_notes(notes, seed=1) == shuffled and shuffled_notes(notes, seed=2) != shuffled
    # tight case: half the notes share a cell
    tight = {"a": "Segment the spot in the centre.", "b": "Segment the spot in the centre.",
             "c": "Segment the spot in the upper left.", "d": "Segment the spot in the lower right."}
    assert all(parse_cell(v) != parse_cell(tight[k]) for k, v in shuffled_notes(tight).items())


@pytest.mark.parametrize("notes", [
    {"a": "Segment the spot in the centre."},
    {"a": "Segment the spot in the centre.", "b": "Target: the blob at the centre."},
    {"a": "Segment the spot in the centre.", "b": "Target: the blob at the centre.", "c": "The upper left."},
])
def test_shuffled_notes_impossible(notes):
    with pytest.raises(ValueError):
        shuffled_notes(notes)


@pytest.mark.parametrize("n_objects", [2, 3, 5])
def test_all_objects_dice_is_about_two_over_k_plus_one(n_objects):
    dice = np.array([all_objects_dice(generate_referring_case(i, seed=0, n_objects=n_objects)) for i in range(100)])
    expected = 2 / (n_objects + 1)
    assert abs(dice.mean() - expected) < 0.01
    assert np.abs(dice - expected).max() < 0.07  # per case too: object sizes vary by only ~10 % in area


def test_dataset_on_disk_reads_back_with_nnunet(dataset: Path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    assert dataset.name == f"Dataset{DATASET_ID}_TextReferring2D"
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr",
                                                         "labelsTs", "labelsTs_allobjects", "referring.json"]
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers
    dj = json.loads((dataset / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "gray"} and dj["labels"] == {"background": 0, "target": 1}
    assert dj["numTraining"] == N_TRAIN and dj["file_ending"] == ".png"
    meta = json.loads((dataset / "referring.json").read_text())
    assert meta["parameters"]["seed"] == 3 and meta["parameters"]["n_objects"] == 3
    assert meta["parameters"]["size"] == 64 and len(meta["cases"]) == N_TRAIN + N_TEST

    io = NaturalImage2DIO()
    for i in range(N_TRAIN + N_TEST):
        split = "Tr" if i < N_TRAIN else "Ts"
        case = generate_referring_case(i, seed=3)
        img, props = io.read_images([str(dataset / f"images{split}" / f"{case.case_id}_0000.png")])
        seg, _ = io.read_seg(str(dataset / f"labels{split}" / f"{case.case_id}.png"))
        assert img.shape == seg.shape == (1, 1, 64, 64)
        assert np.array_equal(img[0, 0], case.image) and np.array_equal(seg[0, 0], case.label)
        assert set(np.unique(seg)) == {0, 1}
        assert (dataset / f"images{split}" / f"{case.case_id}.txt").read_text() == case.note + "\n"
        entry = meta["cases"][case.case_id]
        assert entry["note"] == case.note and tuple(entry["target_cell"]) == case.target_cell
        assert [tuple(c) for c in entry["cells"]] == case.cells
        assert entry["split"] == ("train" if split == "Tr" else "test")
        if split == "Ts":
            allobj, _ = io.read_seg(str(dataset / "labelsTs_allobjects" / f"{case.case_id}.png"))
            assert np.array_equal(allobj[0, 0], case.all_objects)


def test_overwrite_false_refuses_and_keeps_the_folder(dataset: Path):
    before = sorted(str(p.relative_to(dataset)) for p in dataset.rglob("*"))
    with pytest.raises(FileExistsError, match=str(dataset)):
        make_referring_dataset(dataset.parent, dataset_id=DATASET_ID, n_train=2, n_test=0, seed=9)
    assert sorted(str(p.relative_to(dataset)) for p in dataset.rglob("*")) == before
    with pytest.raises(FileExistsError, match="dataset id"):
        make_referring_dataset(dataset.parent, dataset_id=DATASET_ID, name="Other", n_train=2, n_test=0)


def test_overwrite_true_and_cli(tmp_path, capsys):
    assert main([str(tmp_path), "--n-train", "3", "--n-test", "1", "--objects", "4", "--seed", "2"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder == tmp_path / "Dataset992_TextReferring2D"
    assert len(list((folder / "labelsTr").iterdir())) == 3
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--n-train", "2"])
    assert "already exists" in capsys.readouterr().err
    main([str(tmp_path), "--n-train", "2", "--n-test", "0", "--overwrite"])
    assert len(list((folder / "labelsTr").iterdir())) == 2 and not list((folder / "imagesTs").iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # stock nnU-Net planning/preprocessing (shared session fixture)
def test_nnunet_plan_and_preprocess_2d_accepts_it(referring_dataset):
    """--verify_dataset_integrity passes with the notes, referring.json and labelsTs_allobjects/ present."""
    out = Path(os.environ["nnUNet_preprocessed"]) / referring_dataset.name
    plans = json.loads((out / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["2d"]["patch_size"] == [64, 64]
    assert len(list((out / "nnUNetPlans_2d").glob("*.b2nd"))) >= 16


def test_auxiliary_notes_are_added_without_changing_images_or_notes(tmp_path):
    plain = make_referring_dataset(tmp_path / "a", dataset_id=DATASET_ID, n_train=6, n_test=2, seed=4)
    aux = make_referring_dataset(tmp_path / "b", dataset_id=DATASET_ID, n_train=6, n_test=2, seed=4, aux_fraction=0.5)
    files = sorted(p.relative_to(plain) for p in plain.rglob("*") if p.is_file() and p.name != "referring.json")
    for f in files:
        if f.name != "dataset.json":
            assert (plain / f).read_bytes() == (aux / f).read_bytes(), f
    extra = sorted(p for p in aux.rglob("*.aux.txt"))
    assert len(extra) == 4 and not list(plain.rglob("*.aux.txt"))
    meta = json.loads((aux / "referring.json").read_text())
    for p in extra:
        case = p.name[:-len(".aux.txt")]
        text = p.read_text(encoding="utf-8").strip()
        assert meta["cases"][case]["aux_note"] == text
        row, col = meta["cases"][case]["target_cell"]
        # the same target in other words: "<upper|mid|lower> zone, <left side|midline|right side>", or the centre
        if (row, col) == (1, 1):
            assert "central field" in text
        else:
            assert ("upper zone", "mid zone", "lower zone")[row] in text
            assert ("left side", "midline", "right side")[col] in text
    with pytest.raises(ValueError, match="aux_fraction"):
        make_referring_dataset(tmp_path / "c", dataset_id=DATASET_ID, n_train=2, n_test=0, aux_fraction=1.5)
