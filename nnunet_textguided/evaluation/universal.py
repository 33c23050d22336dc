"""`nnunet-textguided evaluate-universal`: a universal (merged, partial-label) model on its source datasets' own
test sets, the layout of CDPDNet's Table 1.

For every source dataset of the model (or those named): its ``imagesTs`` are predicted with the model, every label
the source annotates under the source's own tasks (the fewest covering its labels; the routing is printed); the
prediction is written back in the source's own label codes (an organ's region first, its parts over it, as the
source's maps hold them) and scored against the source's ``labelsTs`` by nnU-Net's evaluation with the package's
extra metrics: ``OUT/<source>/summary.json``, one nnU-Net summary per source dataset. ``OUT/table.md`` (and
``table.json``) holds the mean Dice of each label (rows) on each source dataset (columns); a source that does not
annotate a label leaves its cell empty.

  nnunet-textguided evaluate-universal -d 200 -c 3d_cdpdnet_paper -tr CDPDNetTrainer -f 0 -o eval_universal
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from ..io import atomic_write_json, atomic_write_text


def _model_folder(dataset: str, configuration: str, trainer: str, plans: str) -> Path:
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from ..data.names import dataset_name
    if nnUNet_results is None:
        raise ValueError("nnUNet_results is not set: export it (the folder nnUNetv2_train wrote the model to)")
    name = dataset_name(dataset, ("nnUNet_results",), "train a model on it first")
    return Path(get_output_folder(name, trainer, plans, configuration))


def source_routing(universal, routing: list[int], source: str) -> tuple[list[str], list[int]]:
    """(the labels ``source`` annotates, per output channel the task that predicts it): the source's labels under
    its own tasks, the others as ``routing``."""
    from ..data.merge import route_labels
    own = [t for t, s in enumerate(universal.sources) if s == source]
    if not own:
        raise ValueError(f"{source} is not a source dataset of this model (sources: {sorted(set(universal.sources))})")
    labels = [label for label in universal.labels if any(label in universal.tasks[t][1] for t in own)]
    within = route_labels([universal.tasks[t][1] for t in own], universal.labels, labels)
    return labels, [own[within[k]] if label in labels else routing[k] for k, label in enumerate(universal.labels)]


def to_source_codes(seg: np.ndarray, dataset_labels: dict, codes: dict[int, str], part_of: dict[str, str]) -> np.ndarray:
    """A universal label map -> the source's codes: each source label's region (an organ includes its parts),
    parents first, so parts are written over their organ as in the source's maps."""
    def depth(label):
        d = 0
        while label in part_of:
            label, d = part_of[label], d + 1
        return d
    out = np.zeros_like(seg)
    for code, label in sorted(codes.items(), key=lambda kv: depth(kv[1])):
        region = dataset_labels[label]
        out[np.isin(seg, region if isinstance(region, list) else [region])] = code
    return out


def evaluate_universal(dataset: str, configuration: str, trainer: str, fold: str, output: str,
                       sources: list[str] | None = None, plans: str = "nnUNetPlans", checkpoint: str =
                       "checkpoint_final.pth", device: str = "cuda", use_mirroring: bool = True,
                       num_processes: int = 1) -> dict:
    import torch
    from nnunetv2.paths import nnUNet_raw

    from ..data.merge import load_universal, source_label_codes
    from ..inference.predict import TextGuidedPredictor
    from .evaluate import compute_metrics_on_folder_extended

    folder = _model_folder(dataset, configuration, trainer, plans)
    if not folder.is_dir():
        raise FileNotFoundError(f"no trained model at {folder}: train it with nnUNetv2_train {dataset} "
                                f"{configuration} {fold} -tr {trainer}")
    import json
    dataset_json = json.loads((folder / "dataset.json").read_text())
    u = load_universal(dataset_json)
    chosen = sources or list(dict.fromkeys(s for s in u.sources if s))
    raw = Path(nnUNet_raw or "")
    inputs = {}
    for s in chosen:  # every folder checked before anything is predicted
        if s not in u.sources:
            raise ValueError(f"{s} is not a source dataset of this model (sources: {sorted(set(u.sources))})")
        images, labels = raw / s / "imagesTs", raw / s / "labelsTs"
        for f in (images, labels):
            if not f.is_dir():
                raise FileNotFoundError(f"{f} not found: evaluate-universal reads each source dataset's own test set "
                                        f"from $nnUNet_raw/{s}/imagesTs and labelsTs")
        inputs[s] = (images, labels)

    predictor = TextGuidedPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                    device=torch.device(device), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), (fold if fold == "all" else int(fold),), checkpoint)
    net = getattr(predictor.network, "_orig_mod", predictor.network)
    routing = list(predictor.configuration_manager.configuration["textguided"]["label_tasks"])
    rw = predictor.plans_manager.image_reader_writer_class()
    fe = dataset_json["file_ending"]
    out = Path(output)
    table: dict[str, dict[str, float]] = {}
    for s, (images, labels) in inputs.items():
        own, assignment = source_routing(u, routing, s)
        print(f"evaluate-universal: {s}: " + "; ".join(
            f"task '{u.tasks[t][0]}' predicts " + ", ".join(l for l in own if assignment[u.labels.index(l)] == t)
            for t in sorted({assignment[u.labels.index(l)] for l in own})))
        net.set_label_tasks(assignment)
        universal_dir, source_dir = out / s / "universal_labels", out / s
        predictor.predict_from_files(str(images), str(universal_dir), save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=num_processes,
                                     num_processes_segmentation_export=num_processes)
        codes = source_label_codes(raw, s, dataset_json)
        for f in sorted(universal_dir.glob(f"*{fe}")):
            seg, props = rw.read_seg(str(f))
            rw.write_seg(to_source_codes(seg[0], dataset_json["labels"], codes, u.part_of), str(source_dir / f.name),
                         props)
        source_labels = sorted(codes)
        summary = compute_metrics_on_folder_extended(
            str(labels), str(source_dir), str(source_dir / "summary.json"), rw, fe, source_labels, chill=False,
            num_processes=num_processes, model={"trainer": trainer, "configuration": configuration,
                                                "routing": {l: u.tasks[assignment[u.labels.index(l)]][0] for l in own}})
        for code in source_labels:
            mean = summary["mean"].get(code, summary["mean"].get(str(code)))
            table.setdefault(codes[code], {})[s] = float(mean["Dice"])
    net.set_label_tasks(routing)
    rows = [label for label in u.labels if label in table]
    lines = ["| label | " + " | ".join(inputs) + " |", "|---|" + "---:|" * len(inputs)]
    lines += [f"| {label} | " + " | ".join(f"{table[label][s]:.4f}" if s in table[label] else "" for s in inputs)
              + " |" for label in rows]
    atomic_write_text(out / "table.md", "Mean Dice per label (rows) on each source dataset's test set (columns)\n\n"
                      + "\n".join(lines) + "\n")
    atomic_write_json(out / "table.json", {"dice": table}, sort_keys=False)
    print("\n".join(lines))
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nnunet-textguided evaluate-universal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="the universal (merged) dataset the model was trained on")
    p.add_argument("-c", required=True, help="configuration")
    p.add_argument("-tr", required=True, help="trainer (CDPDNetTrainer or one of its variants)")
    p.add_argument("-f", default="0", help="fold (a number or 'all')")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-o", required=True, help="output folder: one folder per source dataset, table.md, table.json")
    p.add_argument("--sources", nargs="+", help="source datasets to evaluate (default: every source of the model)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    p.add_argument("-device", "--device", dest="device", default="cuda", choices=("cuda", "cpu", "mps"))
    p.add_argument("--disable_tta", action="store_true", help="no test-time mirroring")
    p.add_argument("-np", type=int, default=1, help="processes for preprocessing, export and evaluation")
    a = p.parse_args(argv)
    try:
        evaluate_universal(a.d, a.c, a.tr, a.f, a.o, a.sources, a.p, a.chk, a.device, not a.disable_tta, a.np)
    except (ValueError, FileNotFoundError) as e:
        print(f"nnunet-textguided evaluate-universal: error: {e}", file=sys.stderr)
        return 2
    return 0
