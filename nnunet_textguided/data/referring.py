"""Synthetic 2D *referring* segmentation dataset: the note says which of several look-alike objects is the target.

Purpose: prove that a note-guided trainer really uses the text. Every image shows ``n_objects`` (K) bright
blobs that look alike; the per-case note names the grid cell of the one to segment and the label holds that
object only. Without the note nothing tells the target apart (it is drawn uniformly at random, independently
of every appearance parameter), so the best a vision-only model can do is about Dice 2/(K+1) by segmenting all
objects (0.5 for K=3); a model that reads the note can reach Dice ~1. Evaluating with the true notes and with
:func:`shuffled_notes` (every case gets a note naming a *different* cell) separates the two: a text-using model
must fail on every case with shuffled notes.

Image (uint8, ``size`` x ``size``, default 64): a smooth background (grey level ~60, low-frequency variation
sd ~8) plus K blobs in K distinct cells of a 3x3 grid, white Gaussian noise (sd 6) on top.

* Blobs are ellipses of the same area up to +-10 % (radius ``0.085 * size`` +-5 %, elongation 1-1.15, random
  orientation) and contrast 85-115 grey levels with an anti-aliased one-pixel edge, so neither size nor
  brightness identifies the target and the all-objects Dice stays within a few points of 2/(K+1).
* Each blob is jittered inside its cell but always stays at least ``_MARGIN`` pixels inside the cell borders:
  its position word is unambiguous and blobs in neighbouring cells never touch (gap >= 2 * ``_MARGIN``).

Position vocabulary (row 0 = top of the image, column 0 = left, as displayed by ``imshow``): rows
``upper | middle | lower`` (notes also say ``top`` / ``bottom``), columns ``left | centre | right``; a cell is
named "<row> <column>" ("upper left", "middle right", "lower centre"), except the central cell, which is just
"centre". A note names the target cell and nothing else (no other object's position, no object count), in
one of several phrasings ("Segment the lesion in the upper left.", "Target: the nodule at the middle right.",
"The finding to outline lies in the bottom centre region."); :func:`parse_cell` reads the cell back.

Layout (nnU-Net v2 raw dataset, 2D natural-image format read by nnU-Net's ``NaturalImage2DIO`` as (1, 1, H, W))::

    DatasetXXX_Name/
        dataset.json                         channel "gray" (z-score), labels background 0 / target 1, ".png"
        referring.json                       generator parameters and per-case split, cells, target cell, note
        imagesTr/referring_000_0000.png      uint8 image
        imagesTr/referring_000.txt           the note (UTF-8)
        imagesTr/referring_000.aux.txt       optional auxiliary note (``aux_fraction``; TGC-Net's DATE)
        labelsTr/referring_000.png           uint8, 1 = target object
        imagesTs/, labelsTs/                 test cases, same naming (numbering continues after training)
        labelsTs_allobjects/referring_040.png  uint8, 1 = every object: the vision-only reference prediction

nnU-Net ignores the extra files and folder (``--verify_dataset_integrity`` passes). The dataset is assembled
in a hidden staging folder and renamed into place, so it appears complete or not at all.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text, staged_dataset_folder

__all__ = ["ReferringCase", "generate_referring_case", "make_referring_dataset", "shuffled_notes", "shuffled_sources", "parse_cell",
           "cell_name", "all_objects_dice", "case_identifier", "auxiliary_note", "main"]

FILE_ENDING = ".png"
LABELS: dict[str, int] = {"background": 0, "target": 1}
GRID = 3
ROWS = ("upper", "middle", "lower")
COLS = ("left", "centre", "right")
_ROW_SYNONYMS = {"top": 0, "bottom": 2}
_MARGIN = 1.5  # pixels between a blob and its cell border
_OBJECTS = ("lesion", "nodule", "spot", "blob", "finding")
_TEMPLATES = (
    "Segment the {obj} in the {pos}.",
    "Target: the {obj} at the {pos}.",
    "The {obj} to outline lies in the {pos} region.",
    "Outline only the {obj} in the {pos} of the image.",
    "Please delineate the {obj} located in the {pos}.",
    "Only the {obj} in the {pos} is of interest.",
)


def case_identifier(index: int) -> str:
    """Case id of the ``index``-th case (training cases first, then test cases): ``referring_000``..."""
    return f"referring_{index:03d}"


@dataclass
class ReferringCase:
    """One case: ``image``, ``label`` (target only) and ``all_objects`` are uint8 (H, W); cells are (row, col)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    all_objects: np.ndarray
    note: str
    target_cell: tuple[int, int]
    cells: list[tuple[int, int]]


def cell_name(cell: tuple[int, int]) -> str:
    """Canonical position words of a grid cell: "upper left", ..., "centre" for (1, 1)."""
    row, col = cell
    return "centre" if (row, col) == (1, 1) else f"{ROWS[row]} {COLS[col]}"


def parse_cell(note: str) -> tuple[int, int]:
    """The (row, col) a note names; ValueError unless it names exactly one cell in the vocabulary above."""
    words = re.findall(r"[a-z]+", note.lower())
    rows = {ROWS.index(w) if w in ROWS else _ROW_SYNONYMS[w] for w in words if w in ROWS or w in _ROW_SYNONYMS}
    cols = {COLS.index(w) for w in words if w in COLS}
    if len(cols) == 1 and len(rows) <= 1 and (rows or cols == {1}):
        return (rows.pop() if rows else 1), cols.pop()
    raise ValueError(f"note does not name exactly one grid cell: {note!r}")


def _checked(size: int, n_objects: int) -> tuple[int, int]:
    size, n_objects = int(size), int(n_objects)
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels (blobs would be too small to segment), got {size}")
    if not 2 <= n_objects <= GRID * GRID:
        raise ValueError(f"n_objects must be in 2..{GRID * GRID} (with one object the note is useless), "
                         f"got {n_objects}")
    return size, n_objects


def generate_referring_case(index: int, seed: int = 0, size: int = 64, n_objects: int = 3) -> ReferringCase:
    """Case number ``index`` of series ``seed``; depends only on (seed, index, size, n_objects)."""
    size, n_objects = _checked(size, n_objects)
    rng = np.random.default_rng([int(seed), int(index), 0x2EF])
    flat = np.sort(rng.choice(GRID * GRID, size=n_objects, replace=False))
    cells = [(int(i) // GRID, int(i) % GRID) for i in flat]
    target = int(rng.integers(n_objects))

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    cell_w = size / GRID
    image = 60.0 + 8.0 * _unit_field(rng, size, sigma=size / 8)
    masks = []
    for row, col in cells:
        radius = 0.085 * size * rng.uniform(0.95, 1.05)
        elong, angle = rng.uniform(1.0, 1.15), rng.uniform(0.0, np.pi)
        semi = (radius * elong, radius / elong)  # same area as the disc of ``radius``
        jitter = cell_w / 2 - semi[0] - _MARGIN
        cy, cx = (np.array([row, col]) + 0.5) * cell_w + rng.uniform(-jitter, jitter, 2)
        du, dv = xx - cx, yy - cy
        u = np.cos(angle) * du + np.sin(angle) * dv
        v = -np.sin(angle) * du + np.cos(angle) * dv
        dist = np.hypot(u / semi[0], v / semi[1])  # < 1 inside
        image += rng.uniform(85.0, 115.0) * np.clip((1.0 - dist) * radius + 0.5, 0.0, 1.0)  # 1-pixel soft edge
        masks.append(dist < 1.0)
    image += rng.normal(0.0, 6.0, image.shape)

    note = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))].format(
        obj=_OBJECTS[int(rng.integers(len(_OBJECTS)))], pos=_spoken_name(rng, cells[target]))
    return ReferringCase(case_identifier(index), np.clip(np.rint(image), 0, 255).astype(np.uint8),
                         masks[target].astype(np.uint8), np.any(masks, axis=0).astype(np.uint8), note,
                         cells[target], cells)


_AUX_ROWS = ("upper zone", "mid zone", "lower zone")
_AUX_SIDES = ("left side", "midline", "right side")
_AUX_TEMPLATES = ("Solitary focal opacity, {where}.", "Round well-defined density in the {where}.",
                  "Single circumscribed focus, {where}.")


def auxiliary_note(case: ReferringCase, seed: int = 0) -> str:
    """A terse, report-style auxiliary note (TGC-Net's ``<CASE>.aux.txt``) about the same target, in other words
    than the note ("lower zone, right side"); its own random stream, so the images and notes do not change."""
    rng = np.random.default_rng([int(seed), int(case.case_id.rsplit("_", 1)[1]), 0xA0C])
    row, col = case.target_cell
    where = "central field" if (row, col) == (1, 1) else f"{_AUX_ROWS[row]}, {_AUX_SIDES[col]}"
    return _AUX_TEMPLATES[int(rng.integers(len(_AUX_TEMPLATES)))].format(where=where)


def _unit_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (f - f.mean()) / max(float(f.std()), 1e-6)


def _spoken_name(rng: np.random.Generator, cell: tuple[int, int]) -> str:
    """:func:`cell_name`, with "top"/"bottom" for half of the upper/lower rows (phrasing variety)."""
    name = cell_name(cell)
    if cell[0] != 1 and rng.random() < 0.5:
        name = name.replace(ROWS[cell[0]], "top" if cell[0] == 0 else "bottom")
    return name


def all_objects_dice(case: ReferringCase) -> float:
    """Dice of the vision-only strategy (segment every object) against the target: ~2/(K+1)."""
    return 2.0 * float(case.label.sum()) / float(case.label.sum() + case.all_objects.sum())


def shuffled_notes(notes: dict[str, str], seed: int = 0) -> dict[str, str]:
    """Give every case another case's note naming a different cell than its own (a derangement of the notes);
    :func:`shuffled_sources` says whose."""
    return {case: notes[source] for case, source in shuffled_sources(notes, seed).items()}


def shuffled_sources(notes: dict[str, str], seed: int = 0) -> dict[str, str]:
    """{case: the case whose note it gets} for :func:`shuffled_notes`.

    A text-using model evaluated with these notes must segment the wrong object (or nothing) on every case.
    Such a permutation exists iff no cell is named by more than half of the notes; then sorting the cases by
    cell and rotating by ``t`` with ``m <= t <= n - m`` (``m`` = largest group) never maps a case into its own
    group. Group order, order within groups and ``t`` are drawn from ``seed``.
    """
    if len(notes) < 2:
        raise ValueError(f"need at least 2 cases to shuffle notes, got {len(notes)}")
    groups: dict[tuple[int, int], list[str]] = {}
    for case_id in sorted(notes):
        groups.setdefault(parse_cell(notes[case_id]), []).append(case_id)
    n, m = len(notes), max(len(g) for g in groups.values())
    if 2 * m > n:
        raise ValueError(f"{m} of {n} notes name the same cell; no shuffle can give every case a note naming a "
                         "different cell")
    rng = np.random.default_rng([int(seed), 0x5F1])
    keys = sorted(groups)
    order = [str(c) for k in rng.permutation(len(keys)) for c in rng.permutation(groups[keys[k]])]
    shift = int(rng.integers(m, n - m + 1))
    return {order[k]: order[(k + shift) % n] for k in range(n)}


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------
def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    atomic_write_bytes(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))


def make_referring_dataset(raw_root, dataset_id: int = 992, name: str = "TextReferring2D", n_train: int = 40,
                           n_test: int = 10, size: int = 64, n_objects: int = 3, seed: int = 0,
                           overwrite: bool = False, aux_fraction: float = 0.0) -> Path:
    """Write the referring dataset as ``raw_root/DatasetXXX_Name`` (layout in the module docstring); return it.

    Training cases are ``referring_000`` .. ``referring_{n_train-1}``, test cases continue the numbering.
    ``aux_fraction``: share of the cases (every case for 1) that also get an auxiliary note ``<CASE>.aux.txt``
    (:func:`auxiliary_note`), for TGC-Net; the rest have none, like cases whose LLM summary is missing.
    """
    dataset_id = int(dataset_id)
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be in 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name or ""):
        raise ValueError(f"name must be letters, digits, '_' or '-' (no spaces or slashes), got {name!r}")
    n_train, n_test = int(n_train), int(n_test)
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    size, n_objects = _checked(size, n_objects)
    if not 0.0 <= float(aux_fraction) <= 1.0:
        raise ValueError(f"aux_fraction must be in [0, 1], got {aux_fraction}")
    raw_root = Path(raw_root).expanduser().resolve()
    dataset_name = f"Dataset{dataset_id:03d}_{name}"
    params = {"seed": int(seed), "n_objects": n_objects, "size": size, "n_train": n_train, "n_test": n_test,
              "grid": GRID, "expected_all_objects_dice": round(2.0 / (n_objects + 1), 4)}
    if aux_fraction:
        params["aux_fraction"] = float(aux_fraction)
    with_aux = set(np.random.default_rng([int(seed), 0xA0C]).permutation(n_train + n_test)
                   [:round(float(aux_fraction) * (n_train + n_test))].tolist())

    with staged_dataset_folder(raw_root, dataset_id, dataset_name, overwrite) as staging:
        cases = {}
        for i in range(n_train + n_test):
            split = "Tr" if i < n_train else "Ts"
            case = generate_referring_case(i, seed=seed, size=size, n_objects=n_objects)
            _write_png(staging / f"images{split}" / f"{case.case_id}_0000{FILE_ENDING}", case.image)
            _write_png(staging / f"labels{split}" / f"{case.case_id}{FILE_ENDING}", case.label)
            atomic_write_text(staging / f"images{split}" / f"{case.case_id}.txt", case.note + "\n")
            if i in with_aux:
                atomic_write_text(staging / f"images{split}" / f"{case.case_id}.aux.txt",
                                  auxiliary_note(case, seed) + "\n")
            if split == "Ts":
                _write_png(staging / "labelsTs_allobjects" / f"{case.case_id}{FILE_ENDING}", case.all_objects)
            cases[case.case_id] = {"split": "train" if split == "Tr" else "test", "note": case.note,
                                   "target_cell": list(case.target_cell), "cells": [list(c) for c in case.cells]}
            if i in with_aux:
                cases[case.case_id]["aux_note"] = auxiliary_note(case, seed)
        for sub in ("imagesTs", "labelsTs"):  # nnU-Net's layout has them even when there are no test cases
            (staging / sub).mkdir(exist_ok=True)
        atomic_write_json(staging / "referring.json", {"parameters": params, "cases": cases})
        atomic_write_json(staging / "dataset.json", {
            "channel_names": {"0": "gray"},  # not a scheme name: nnU-Net's default z-score normalisation
            "labels": dict(LABELS),
            "numTraining": n_train,
            "file_ending": FILE_ENDING,
            "overwrite_image_reader_writer": "NaturalImage2DIO",
            "name": dataset_name,
            "description": ("Synthetic 2D referring segmentation (nnunet_textguided.data.referring): "
                            f"{n_objects} look-alike blobs per image, the note <CASE>.txt in imagesTr|imagesTs "
                            "names the grid cell of the target, the label is that blob only. "
                            f"Parameters: {json.dumps(params, sort_keys=True)}."),
            "licence": "CC0 (synthetic data)",
            "converted_by": "nnunet_textguided.data.referring.make_referring_dataset",
        }, sort_keys=False)
    return raw_root / dataset_name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnunet_textguided.data.referring",
                                description="Write the synthetic 2D referring dataset (note names the target "
                                            "among look-alike objects) as an nnU-Net v2 raw dataset.")
    p.add_argument("raw_root", help="nnU-Net raw folder to write DatasetXXX_Name into")
    p.add_argument("--dataset-id", type=int, default=992)
    p.add_argument("--name", default="TextReferring2D")
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-test", type=int, default=10)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--objects", type=int, default=3, help="look-alike objects per image (2..9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aux-notes", type=float, default=0.0, metavar="FRACTION",
                   help="share of the cases that also get an auxiliary note <CASE>.aux.txt (TGC-Net), default 0")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    a = p.parse_args(argv)
    try:
        folder = make_referring_dataset(a.raw_root, a.dataset_id, a.name, a.n_train, a.n_test, a.size, a.objects,
                                        a.seed, a.overwrite, a.aux_notes)
    except (ValueError, FileExistsError) as e:
        p.error(str(e))
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
