"""`nnunet-textguided text-dependence`: does a model use the note? Dice with true vs shuffled notes.

A note-guided model that reads its note must lose accuracy when every case gets another case's note; a
vision-only model (nnU-Net's nnUNetTrainer) scores the same either way. On the synthetic *referring* dataset
(``data.referring``: several similar objects, the note names the target) the vision-only model is also bounded
well below a perfect referring model: it cannot know which object is meant. The command reports, per trained
model, the mean foreground Dice with the true notes and with shuffled notes, plus two references when the
dataset has ``labelsTs_allobjects/``: *segment every object* (what vision alone can aim for, ~2/(K+1)) and a
perfect referring model (1.0 with true notes).

Predictions go through ``nnUNetv2_predict_textguided`` (nnU-Net's predict; note-guided trainers read the
sidecar notes through it), so the only difference between the two runs is the ``<CASE>.txt`` beside each
image. Models that do not read notes (nnU-Net's trainers, BiCLIP) must give identical predictions: that is the
vision-only baseline. Shuffling gives every case another case's note (a derangement); on referring notes
(every note names a position) each case gets one naming a different position. Auxiliary notes
(``<CASE>.aux.txt``, TGC-Net) travel with their note: a case that receives another case's note receives that
case's auxiliary note too (or none).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..conditioning.notes import AUX_SUFFIX, NOTE_SUFFIX
from ..io import atomic_write_json
from .evaluate import compute_metrics_on_folder2_extended



def read_notes(images_folder: Path, cases: list[str]) -> dict[str, str]:
    missing = [c for c in cases if not (images_folder / f"{c}{NOTE_SUFFIX}").is_file()]
    if missing:
        raise FileNotFoundError(f"{images_folder}: no note for {missing[:5]} (expected <CASE>{NOTE_SUFFIX} beside "
                                "the images); the text-dependence check needs a note per case")
    return {c: (images_folder / f"{c}{NOTE_SUFFIX}").read_text(encoding="utf-8") for c in cases}


def read_aux_notes(images_folder: Path, cases: list[str]) -> dict[str, str]:
    """{case: auxiliary note} of the cases that have one."""
    return {c: (images_folder / f"{c}{AUX_SUFFIX}").read_text(encoding="utf-8") for c in cases
            if (images_folder / f"{c}{AUX_SUFFIX}").is_file()}


def shuffle_sources(notes: dict[str, str], seed: int = 0) -> dict[str, str]:
    """{case: the other case whose note it gets}: on referring notes one naming a different position, else any
    other case (a derangement)."""
    from ..data.referring import parse_cell, shuffled_sources
    try:
        [parse_cell(n) for n in notes.values()]
    except ValueError:  # not referring notes: any other case's note
        pass
    else:
        return shuffled_sources(notes, seed)  # raises if no position-changing shuffle exists
    if len(notes) < 2:
        raise ValueError(f"need at least 2 cases to shuffle notes, got {len(notes)}")
    order = [str(c) for c in np.random.default_rng(seed).permutation(sorted(notes))]
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}


def shuffle_notes(notes: dict[str, str], seed: int = 0) -> dict[str, str]:
    """Every case gets another case's note (``shuffle_sources``)."""
    return {case: notes[source] for case, source in shuffle_sources(notes, seed).items()}


def note_variants(notes: dict[str, str], aux: dict[str, str], seed: int = 0) -> dict[str, tuple[dict, dict]]:
    """{"true": (notes, auxiliary notes), "shuffled": (...)}: a case's auxiliary note (or none) travels with its
    note to the case that receives it."""
    sources = shuffle_sources(notes, seed)
    return {"true": (notes, aux),
            "shuffled": ({c: notes[s] for c, s in sources.items()}, {c: aux[s] for c, s in sources.items() if s in aux})}


def image_cases(images_folder: Path, file_ending: str) -> dict[str, list[Path]]:
    """{case: its channel files} of an nnU-Net input folder (``<CASE>_XXXX<ending>``)."""
    out: dict[str, list[Path]] = {}
    for f in sorted(images_folder.iterdir()):
        if f.name.endswith(file_ending) and len(f.name) > len(file_ending) + 5:
            out.setdefault(f.name[:-len(file_ending) - 5], []).append(f)
    if not out:
        raise FileNotFoundError(f"no images <CASE>_0000{file_ending} in {images_folder}")
    return out


def write_input_folder(folder: Path, cases: dict[str, list[Path]], notes: dict[str, str],
                       aux: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for case, files in cases.items():
        for f in files:
            shutil.copy2(f, folder / f.name)
        (folder / f"{case}{NOTE_SUFFIX}").write_text(notes[case], encoding="utf-8")
        if aux and case in aux:
            (folder / f"{case}{AUX_SUFFIX}").write_text(aux[case], encoding="utf-8")
    return folder


def predict(input_folder: Path, output_folder: Path, dataset: str, configuration: str, trainer: str, fold: str,
            plans: str, device: str, checkpoint: str) -> None:
    cmd = [sys.executable, "-c", "from nnunet_textguided.inference.predict import main; main()",
           "-i", str(input_folder), "-o", str(output_folder), "-d", dataset, "-c", configuration, "-tr", trainer,
           "-f", fold, "-p", plans, "-device", device, "-chk", checkpoint, "-npp", "1", "-nps", "1",
           "--disable_progress_bar"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"prediction with {trainer} failed (exit {r.returncode}):\n{r.stdout[-2000:]}"
                           f"\n{r.stderr[-3000:]}")


def run(dataset: str, configuration: str, trainers: list[str], output: Path, fold: str = "0",
        plans: str = "nnUNetPlans", images: Path | None = None, references: Path | None = None, seed: int = 0,
        device: str = "cpu", checkpoint: str = "checkpoint_final.pth") -> dict:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from ..data.names import dataset_name
    name = dataset_name(dataset)
    raw = Path(nnUNet_raw) / name
    images, references = Path(images or raw / "imagesTs"), Path(references or raw / "labelsTs")
    dataset_json = Path(nnUNet_preprocessed) / name / "dataset.json"
    plans_file = Path(nnUNet_preprocessed) / name / f"{plans}.json"
    ending = json.loads(dataset_json.read_text())["file_ending"]
    cases = image_cases(images, ending)
    notes = read_notes(images, sorted(cases))
    aux = read_aux_notes(images, sorted(cases))
    variants = note_variants(notes, aux, seed)
    if output.is_dir() and any(output.iterdir()):
        raise FileExistsError(f"{output} is not empty: choose a new -o folder (old inputs and predictions would mix "
                              "with this run's)")
    inputs = {v: write_input_folder(output / f"input_{v}_notes", cases, n, a) for v, (n, a) in variants.items()}

    def dice(pred_folder: Path, summary_file: Path) -> float:
        summary = compute_metrics_on_folder2_extended(str(references), str(pred_folder), str(dataset_json),
                                                      str(plans_file), str(summary_file), num_processes=1,
                                                      chill=False)
        return float(summary["foreground_mean"]["Dice"])

    rows = {}
    for tr in trainers:
        rows[tr] = {}
        for v, folder in inputs.items():
            pred = output / tr / f"{v}_notes"
            predict(folder, pred, dataset, configuration, tr, fold, plans, device, checkpoint)
            rows[tr][v] = dice(pred, pred / "summary.json")
    all_objects = references.parent / f"{references.name}_allobjects"
    if all_objects.is_dir():
        every = dice(all_objects, output / "all_objects_summary.json")  # never write into the raw data
        rows["segment every object (vision-only reference)"] = {"true": every, "shuffled": every}
        # shuffled referring notes always name another position: a perfect referring model outlines another
        # object (or nothing) on every case
        rows["perfect referring model"] = {"true": 1.0, "shuffled": 0.0}
    result = {"dataset": name, "configuration": configuration, "fold": fold, "seed": seed,
              "cases": len(cases), "dice": rows}
    atomic_write_json(output / "text_dependence.json", result)
    return result


def format_table(result: dict) -> str:
    lines = [f"{result['dataset']} ({result['configuration']}, fold {result['fold']}, {result['cases']} cases): "
             "mean foreground Dice", "", "| model | true notes | shuffled notes | drop |", "|---|---:|---:|---:|"]
    for name, d in result["dice"].items():
        lines.append(f"| {name} | {d['true']:.3f} | {d['shuffled']:.3f} | {d['true'] - d['shuffled']:+.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nnunet-textguided text-dependence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", required=True, help="configuration, e.g. 2d_tiny")
    p.add_argument("-tr", nargs="+", required=True, help="trained trainers to compare, e.g. nnUNetTrainer_5epochs")
    p.add_argument("-o", required=True, help="output folder (inputs with true/shuffled notes, predictions, "
                                             "text_dependence.json)")
    p.add_argument("-f", default="0", help="fold (default 0)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-i", help="input images with <CASE>.txt notes (default: nnUNet_raw/<dataset>/imagesTs)")
    p.add_argument("-r", help="reference segmentations (default: nnUNet_raw/<dataset>/labelsTs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the note shuffle")
    p.add_argument("-device", "--device", dest="device", default="cpu", help="cpu or cuda")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    a = p.parse_args(argv)
    out = Path(a.o)
    try:
        result = run(a.d, a.c, a.tr, out, a.f, a.p, a.i and Path(a.i), a.r and Path(a.r), a.seed, a.device, a.chk)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"nnunet-textguided text-dependence: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"\nwritten: {os.path.join(a.o, 'text_dependence.json')}")
    return 0
