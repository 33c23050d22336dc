"""nnUNetv2_evaluate_folder with the metrics our five papers report: HD95, precision, recall, accuracy, mIoU.

nnU-Net's evaluation gives Dice and IoU only. The functions here mirror
``nnunetv2.evaluation.evaluate_predictions`` (same file matching, same ``chill`` semantics, same means) and
write the same summary.json structure with more keys, so nnU-Net's tooling (``load_summary_json``,
``foreground_mean['Dice']`` in nnUNetv2_find_best_configuration) reads it unchanged:

* every per-label dict (``metric_per_case[i]['metrics'][label]``, ``mean[label]``, ``foreground_mean``) gains
  ``HD95``, ``Precision``, ``Recall``, ``Accuracy`` and ``IoU_fgbg`` (see :mod:`.metrics`);
* every case gains ``case_metrics`` (multi-class ``Accuracy``, ``mIoU``, ``mIoU_fgbg``), averaged over cases
  in the top-level ``case_mean``;
* ``metric_definitions`` records the HD95 definition and the empty-mask conventions, so a summary.json can be
  compared with a paper's numbers without this code at hand.

HD95 needs the voxel spacing, which nnU-Net's readers return in array axis order (``props['spacing']``); the
reference's spacing is used. summary.json is written atomically: a failed run never leaves a partial file nor
destroys the previous one.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys

from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, subfiles
from nnunetv2.configuration import default_num_processes
from nnunetv2.evaluation.evaluate_predictions import save_summary_json
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from ..io import atomic_path
from .metrics import case_metrics, nanmean

__all__ = ["compute_metrics_extended", "compute_metrics_on_folder_extended", "compute_metrics_on_folder2_extended",
           "evaluate_folder_entry_point", "main", "METRIC_DEFINITIONS"]

PROG = "nnUNetv2_evaluate_folder_textguided"

METRIC_DEFINITIONS = {
    "HD95": "MONAI compute_hausdorff_distance(percentile=95): the larger of the two directed 95th-percentile "
            "surface distances, in the units of the image spacing (mm); MedPy's hd95 takes the 95th percentile "
            "of the pooled distances instead. Single-voxel axes (nnU-Net's dummy 2D axis) are dropped.",
    "empty_masks": "Empty = no voxel outside the ignore label. Both empty: Dice, IoU, Precision, Recall, HD95 = "
                   "NaN (left out of means). Reference empty, prediction not: Dice = IoU = Precision = 0, "
                   "Recall = NaN. Reference not, prediction empty: Dice = IoU = Recall = 0, Precision = NaN. "
                   "One of them empty: HD95 = image diagonal sqrt(sum((shape_i * spacing_i)^2)).",
    "Accuracy": "Per label: binary pixel accuracy (TP+TN)/(TP+FP+FN+TN) over non-ignored voxels. case_mean: "
                "multi-class pixel accuracy (mean of per-region accuracies for region-based label sets).",
    "mIoU": "Per-class mean IoU: foreground_mean.IoU (mean over foreground labels of the case-averaged IoU) and "
            "case_mean.mIoU (case average of the nanmean over foreground labels).",
    "mIoU_fgbg": "MPTPN's mIoU, (IoU of the mask + IoU of its complement) / 2, the undefined one left out: "
                 "foreground_mean.IoU_fgbg and case_mean.mIoU_fgbg, averaged like mIoU.",
}


def compute_metrics_extended(reference_file: str, prediction_file: str, image_reader_writer: BaseReaderWriter,
                             labels_or_regions, ignore_label: int | None = None) -> dict:
    """nnU-Net's ``compute_metrics`` result with the extra per-label metrics and a ``case_metrics`` dict."""
    seg_ref, props = image_reader_writer.read_seg(reference_file)
    seg_pred, _ = image_reader_writer.read_seg(prediction_file)
    if seg_ref.shape != seg_pred.shape:
        raise ValueError(f"reference {reference_file} has shape {seg_ref.shape[1:]} but prediction "
                         f"{prediction_file} has shape {seg_pred.shape[1:]}: the prediction must be on the "
                         "reference grid (export it at the reference's original shape and spacing, as "
                         "nnUNetv2_predict does)")
    metrics, case_level = case_metrics(seg_ref[0], seg_pred[0], labels_or_regions, props["spacing"], ignore_label)
    return {"reference_file": reference_file, "prediction_file": prediction_file, "metrics": metrics,
            "case_metrics": case_level}


def _require_folder(folder: str, what: str) -> None:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} folder not found: {folder}; check the path")


def compute_metrics_on_folder_extended(folder_ref: str, folder_pred: str, output_file: str | None,
                                       image_reader_writer: BaseReaderWriter, file_ending: str, regions_or_labels,
                                       ignore_label: int | None = None,
                                       num_processes: int = default_num_processes, chill: bool = True,
                                       case_regions: dict[str, list] | None = None, model: dict | None = None
                                       ) -> dict:
    """nnU-Net's ``compute_metrics_on_folder`` plus the extra metrics; ``output_file`` (.json) may be None.
    ``model`` (the model's method, encoders and its untrained ones) is recorded under ``textguided_model``.

    ``num_processes <= 1`` computes in this process, otherwise in a spawn pool like nnU-Net.
    ``case_regions`` ({file name: labels/regions}) scores those cases on a subset only (partially labelled
    references): the other labels' metrics are NaN for that case and left out of the means.
    """
    if output_file is not None and not output_file.endswith(".json"):
        raise ValueError(f"output file must end with .json: {output_file}")
    _require_folder(folder_ref, "reference")
    _require_folder(folder_pred, "prediction")
    files_pred = subfiles(folder_pred, suffix=file_ending, join=False)
    files_ref = subfiles(folder_ref, suffix=file_ending, join=False)
    if not files_pred:
        raise FileNotFoundError(f"no predictions ending in {file_ending} in {folder_pred}")
    missing = sorted(set(files_ref) - set(files_pred))
    if missing and not chill:
        raise FileNotFoundError(f"{len(missing)} reference case(s) have no prediction in {folder_pred} (first: "
                                f"{missing[0]}); predict them or pass --chill to evaluate the predicted ones only")
    unmatched = sorted(set(files_pred) - set(files_ref))
    if unmatched:
        raise FileNotFoundError(f"prediction {join(folder_pred, unmatched[0])} has no reference "
                                f"{join(folder_ref, unmatched[0])}; remove it or add the reference")
    jobs = [(join(folder_ref, f), join(folder_pred, f), image_reader_writer, regions_or_labels, ignore_label)
            for f in files_pred]
    if num_processes <= 1:
        results = [compute_metrics_extended(*job) for job in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            results = pool.starmap(compute_metrics_extended, jobs)

    metric_list = list(results[0]["metrics"][regions_or_labels[0]].keys())
    for c in results:
        keep = (case_regions or {}).get(os.path.basename(c["prediction_file"]))
        if keep is not None:
            keep = {tuple(r) if isinstance(r, (list, tuple)) else r for r in keep}
            for r in regions_or_labels:
                if (tuple(r) if isinstance(r, (list, tuple)) else r) not in keep:
                    c["metrics"][r] = {m: float("nan") for m in metric_list}
            kept = [c["metrics"][r] for r in regions_or_labels if r != 0]
            c["case_metrics"].update(mIoU=nanmean([k["IoU"] for k in kept]),
                                     mIoU_fgbg=nanmean([k["IoU_fgbg"] for k in kept]))
            if all(isinstance(r, (list, tuple)) for r in regions_or_labels):  # regions: mean of binary accuracies
                c["case_metrics"]["Accuracy"] = nanmean([k["Accuracy"] for k in kept])
    means = {r: {m: nanmean([c["metrics"][r][m] for c in results]) for m in metric_list}
             for r in regions_or_labels}
    # nanmean: a label without any scored case (partial labels) is left out, as nnU-Net leaves out NaN cases
    foreground_mean = {m: nanmean([means[r][m] for r in means if r != 0 and r != "0"]) for m in metric_list}
    case_mean = {m: nanmean([c["case_metrics"][m] for c in results]) for m in results[0]["case_metrics"]}
    for d in (*results, means, foreground_mean):
        recursive_fix_for_json_export(d)
    result = {"metric_per_case": results, "mean": means, "foreground_mean": foreground_mean,
              "case_mean": case_mean, "metric_definitions": dict(METRIC_DEFINITIONS)}
    if model is not None:
        result["textguided_model"] = model
    if output_file is not None:
        with atomic_path(output_file, suffix=".json") as tmp:
            save_summary_json(result, tmp)
    return result


def compute_metrics_on_folder2_extended(folder_ref: str, folder_pred: str, dataset_json_file: str, plans_file: str,
                                        output_file: str | None = None, num_processes: int = default_num_processes,
                                        chill: bool = False) -> dict:
    """nnU-Net's ``compute_metrics_on_folder2``: reader from dataset.json, labels/regions from the plans.

    ``output_file`` defaults to ``folder_pred/summary.json``.
    """
    for file, what in ((dataset_json_file, "dataset.json"), (plans_file, "plans file")):
        if not isfile(file):
            raise FileNotFoundError(f"{what} not found: {file}; pass the dataset's {what} (usually in "
                                    "nnUNet_preprocessed/DatasetXXX_Name/)")
    _require_folder(folder_ref, "reference")
    dataset_json = load_json(dataset_json_file)
    file_ending = dataset_json["file_ending"]
    examples = subfiles(folder_ref, suffix=file_ending, join=True)
    if not examples:
        raise FileNotFoundError(f"no reference files ending in {file_ending} (dataset.json's file_ending) in "
                                f"{folder_ref}")
    rw = determine_reader_writer_from_dataset_json(dataset_json, examples[0])()
    lm = PlansManager(plans_file).get_label_manager(dataset_json)
    case_regions = None
    if "textguided_universal" in dataset_json:  # merged partial-label data: score each case on its own labels
        from ..data.merge import load_universal
        case_regions = load_universal(dataset_json).scored_regions(lm.foreground_regions, file_ending)
    return compute_metrics_on_folder_extended(
        folder_ref, folder_pred, output_file or join(folder_pred, "summary.json"), rw, file_ending,
        lm.foreground_regions if lm.has_regions else lm.foreground_labels, lm.ignore_label, num_processes,
        chill=chill, case_regions=case_regions, model=model_record(join(folder_pred, "plans.json")))


def model_record(plans_file: str) -> dict | None:
    """The model's record (method, configuration, encoders, untrained ones) from the plans.json nnU-Net's predictor
    copies into its output folder; None when that is not a nnunet-textguided model's."""
    if not isfile(plans_file):
        return None
    trained = [(name, c["textguided"]) for name, c in load_json(plans_file).get("configurations", {}).items()
               if isinstance(c.get("textguided"), dict) and "method" in c["textguided"]]
    if len(trained) != 1:
        return None
    return block_record(*trained[0])


def block_record(configuration: str, block: dict) -> dict:
    """Method, configuration, encoder identities and the untrained ones of a resolved ``textguided`` block."""
    encoders = {spec: {k: rec.get(k) for k in ("weight_hash", "embed_dim", "untrained")}
                for spec, rec in block.get("encoders", {}).items()}
    return {"method": block["method"], "configuration": configuration, "encoders": encoders,
            "untrained_encoders": sorted(s for s, r in encoders.items() if r.get("untrained"))}


def _table(result: dict) -> str:
    columns = ("Dice", "IoU", "HD95", "Precision", "Recall")
    rows = [("label", *columns)]
    rows += [(str(r), *(f"{m[c]:.4f}" for c in columns)) for r, m in result["mean"].items()]
    rows.append(("foreground", *(f"{result['foreground_mean'][c]:.4f}" for c in columns)))
    return "\n".join(f"{row[0]:<12}" + "".join(f"{v:>11}" for v in row[1:]) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="nnUNetv2_evaluate_folder plus HD95, precision, recall, accuracy and both mIoU "
                               "forms (per-class mean and MPTPN's foreground/background mean), in nnU-Net's "
                               "summary.json structure.")
    parser.add_argument("gt_folder", type=str, help="folder with gt segmentations")
    parser.add_argument("pred_folder", type=str, help="folder with predicted segmentations")
    parser.add_argument("-djfile", type=str, required=True, help="dataset.json file")
    parser.add_argument("-pfile", type=str, required=True, help="plans.json file")
    parser.add_argument("-o", type=str, required=False, default=None,
                        help="Output file. Optional. Default: pred_folder/summary.json")
    parser.add_argument("-np", type=int, required=False, default=default_num_processes,
                        help=f"number of processes used. Optional. Default: {default_num_processes}")
    parser.add_argument("--chill", action="store_true",
                        help="dont crash if folder_pred does not have all files that are present in folder_gt")
    args = parser.parse_args(argv)
    output_file = args.o or join(args.pred_folder, "summary.json")
    try:
        result = compute_metrics_on_folder2_extended(args.gt_folder, args.pred_folder, args.djfile, args.pfile,
                                                     output_file, args.np, chill=args.chill)
    except (FileNotFoundError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(_table(result))
    print(f"written to {output_file}")
    return 0


def evaluate_folder_entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
