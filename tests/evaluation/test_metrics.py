"""Extended evaluation: hand-computed metrics, MONAI HD95 with anisotropic spacing, empty-mask conventions,
ignore label, and summary.json compatibility with nnU-Net's own evaluation."""
from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, load_summary_json
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_textguided.evaluation.evaluate import compute_metrics_on_folder_extended, main
from nnunet_textguided.evaluation.metrics import binary_metrics, case_metrics

EXTRA = {"HD95", "Precision", "Recall", "Accuracy", "IoU_fgbg"}
nan = float("nan")


def _assert_metrics(got: dict, expected: dict):
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, nan_ok=True), k


def test_hand_computed_2d():
    ref = np.zeros((4, 5), bool)
    pred = np.zeros((4, 5), bool)
    ref[0, :4] = True  # 4 voxels
    pred[0, 2:5] = True  # 3 voxels, 2 of them on ref -> TP 2, FP 1, FN 2, TN 15
    m = binary_metrics(ref, pred, (1.0, 1.0))
    assert (m["TP"], m["FP"], m["FN"], m["TN"], m["n_pred"], m["n_ref"]) == (2, 1, 2, 15, 3, 4)
    _assert_metrics(m, {"Dice": 4 / 7, "IoU": 2 / 5, "Precision": 2 / 3, "Recall": 2 / 4, "Accuracy": 17 / 20,
                        "IoU_fgbg": (2 / 5 + 15 / 18) / 2})


def test_hand_computed_3d_multilabel_case_metrics():
    ref = np.zeros((2, 3, 3), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 0, :] = 1  # label 1: 3 voxels
    ref[1, 2, 2] = 2  # label 2: 1 voxel
    pred[0, 0, :2] = 1  # label 1: TP 2, FN 1
    pred[1, 2, 2] = 1  # label 2 predicted as 1: FP for 1, FN for 2
    metrics, case = case_metrics(ref, pred, [1, 2], (2.0, 1.0, 1.0))
    _assert_metrics(metrics[1], {"TP": 2, "FP": 1, "FN": 1, "TN": 14, "Dice": 4 / 6, "IoU": 2 / 4,
                                 "Precision": 2 / 3, "Recall": 2 / 3, "Accuracy": 16 / 18,
                                 "IoU_fgbg": (2 / 4 + 14 / 16) / 2})
    _assert_metrics(metrics[2], {"TP": 0, "FP": 0, "FN": 1, "TN": 17, "Dice": 0, "IoU": 0, "Precision": nan,
                                 "Recall": 0, "Accuracy": 17 / 18, "IoU_fgbg": (0 + 17 / 18) / 2})
    # multi-class accuracy: wrong voxels are ref label 1 at (0,0,2) and ref label 2 at (1,2,2)
    _assert_metrics(case, {"Accuracy": 16 / 18, "mIoU": (2 / 4 + 0) / 2,
                           "mIoU_fgbg": ((2 / 4 + 14 / 16) / 2 + 17 / 36) / 2})
    # region-based label sets: mean of the per-region binary accuracies
    _, case_r = case_metrics(ref, pred, [(1, 2), (2,)], (2.0, 1.0, 1.0))
    assert case_r["Accuracy"] == pytest.approx((17 / 18 + 17 / 18) / 2)


@pytest.mark.parametrize("axis, spacing_along, k", [(0, 3.0, 3), (1, 0.5, 3), (2, 1.0, 2)])
def test_hd95_anisotropic_parallel_planes(axis, spacing_along, k):
    """Two one-voxel-thick planes k voxels apart: every surface distance is k * spacing along that axis."""
    spacing = (3.0, 0.5, 1.0)
    ref = np.zeros((10, 9, 8), bool)
    pred = ref.copy()
    ref[(slice(None),) * axis + (2,)] = True
    pred[(slice(None),) * axis + (2 + k,)] = True
    assert binary_metrics(ref, pred, spacing)["HD95"] == pytest.approx(k * spacing_along)
    assert binary_metrics(pred, ref, spacing)["HD95"] == pytest.approx(k * spacing_along)


def test_hd95_is_a_percentile_and_symmetric():
    """A single outlier voxel (1 of 21 surface voxels, < 5 %) does not move HD95, however far it is."""
    ref = np.zeros((20, 20), bool)
    ref[5, :] = True
    pred = ref.copy()
    pred[15, 0] = True
    assert binary_metrics(ref, pred, (2.0, 1.0))["HD95"] == pytest.approx(0.0)
    # a 3x3 square shifted by one voxel along the spacing-2 axis: directed distances 0 and 2 -> both 95th pct 2
    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[1:4, 1:4] = True
    b[2:5, 1:4] = True
    assert binary_metrics(a, b, (2.0, 1.0))["HD95"] == binary_metrics(b, a, (2.0, 1.0))["HD95"] == pytest.approx(2.0)


def test_hd95_ignores_singleton_axis():
    """nnU-Net reads a 2D image as (1, y, x) with a placeholder spacing on the dummy axis."""
    ref = np.zeros((1, 6, 8), bool)
    pred = ref.copy()
    ref[0, 1, :] = True
    pred[0, 4, :] = True
    m = binary_metrics(ref, pred, (999.0, 0.5, 1.0))
    assert m["HD95"] == pytest.approx(1.5)
    assert binary_metrics(ref, np.zeros_like(ref), (999.0, 0.5, 1.0))["HD95"] == pytest.approx(math.hypot(3, 8))


def test_empty_mask_conventions():
    shape, spacing = (4, 6, 8), (3.0, 0.5, 1.0)
    diagonal = math.sqrt(12 ** 2 + 3 ** 2 + 8 ** 2)
    empty = np.zeros(shape, bool)
    some = empty.copy()
    some[1, 2:4, 3:5] = True  # 4 voxels
    n = empty.size

    both = binary_metrics(empty, empty, spacing)
    _assert_metrics(both, {"Dice": nan, "IoU": nan, "Precision": nan, "Recall": nan, "HD95": nan,
                           "Accuracy": 1.0, "IoU_fgbg": 1.0})
    hallucinated = binary_metrics(empty, some, spacing)
    _assert_metrics(hallucinated, {"Dice": 0, "IoU": 0, "Precision": 0, "Recall": nan, "HD95": diagonal,
                                   "Accuracy": (n - 4) / n, "IoU_fgbg": (0 + (n - 4) / n) / 2})
    missed = binary_metrics(some, empty, spacing)
    _assert_metrics(missed, {"Dice": 0, "IoU": 0, "Precision": nan, "Recall": 0, "HD95": diagonal,
                             "Accuracy": (n - 4) / n, "IoU_fgbg": (0 + (n - 4) / n) / 2})


def test_ignore_label_excluded():
    ref = np.zeros((4, 4), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, :2] = 1
    ref[3, :] = 9  # ignore label, predicted as foreground: must not count as FP
    pred[0, :2] = 1
    pred[3, :] = 1
    metrics, case = case_metrics(ref, pred, [1], (1.0, 1.0), ignore_label=9)
    _assert_metrics(metrics[1], {"TP": 2, "FP": 0, "FN": 0, "TN": 10, "Dice": 1, "Precision": 1, "HD95": 0,
                                 "Accuracy": 1, "IoU_fgbg": 1})
    assert case["Accuracy"] == 1.0
    # a structure entirely under the ignore label counts as empty
    only_ignored = binary_metrics(ref == 9, pred == 1, (1.0, 1.0), ignore=ref == 9)
    _assert_metrics(only_ignored, {"Dice": 0, "TP": 0, "FP": 2, "n_ref": 0, "Recall": nan,
                                   "HD95": math.hypot(4, 4)})


def _write(arr, path, spacing=(0.8, 0.8, 2.5)):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    ref_dir, pred_dir = root / "gt", root / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        ref = np.zeros((6, 16, 16), np.uint8)
        ref[1:5, 3:11, 3:11] = 1
        ref[2:4, 6:9, 6:9] = 2
        pred = ref.copy()
        pred[rng.random(ref.shape) < 0.05] = rng.integers(0, 3)
        if i == 2:
            pred[pred == 2] = 0  # a missed label: HD95 gets the diagonal penalty
        _write(ref, ref_dir / f"case_{i}.nii.gz")
        _write(pred, pred_dir / f"case_{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz", "channel_names": {"0": "CT"},
         "numTraining": 3}))
    (root / "plans.json").write_text(json.dumps({"plans_name": "test", "label_manager": "LabelManager"}))
    return root


class _InProcessPool:
    """Stands in for the spawn pool: each spawned worker would spend seconds importing torch and monai."""

    def __init__(self, processes):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def starmap(self, func, iterable):
        return list(itertools.starmap(func, iterable))


@pytest.fixture
def in_process_pool(monkeypatch):
    """Both nnU-Net and we call ``multiprocessing.get_context("spawn").Pool``; records the start methods asked for."""
    methods = []

    def get_context(method):
        methods.append(method)
        return type("InProcessContext", (), {"Pool": _InProcessPool})

    monkeypatch.setattr(multiprocessing, "get_context", get_context)
    return methods


def test_folder_summary_extends_nnunet(folders, in_process_pool):
    ref_dir, pred_dir = str(folders / "gt"), str(folders / "pred")
    ours_file, theirs_file = str(folders / "ours.json"), str(folders / "theirs.json")
    compute_metrics_on_folder(ref_dir, pred_dir, theirs_file, SimpleITKIO(), ".nii.gz", [1, 2], num_processes=1)
    ours_in_pool = compute_metrics_on_folder_extended(ref_dir, pred_dir, None, SimpleITKIO(), ".nii.gz", [1, 2],
                                                      num_processes=2)
    compute_metrics_on_folder_extended(ref_dir, pred_dir, ours_file, SimpleITKIO(), ".nii.gz", [1, 2],
                                       num_processes=1)
    ours, theirs = load_summary_json(ours_file), load_summary_json(theirs_file)
    assert not [f for f in os.listdir(folders) if f.startswith(".")]  # no temporary file left behind

    for label in (1, 2):
        assert set(ours["mean"][label]) == set(theirs["mean"][label]) | EXTRA
        for k in ("Dice", "IoU"):
            assert ours["mean"][label][k] == theirs["mean"][label][k]
    assert ours["foreground_mean"]["Dice"] == theirs["foreground_mean"]["Dice"]
    assert set(ours["foreground_mean"]) == set(theirs["foreground_mean"]) | EXTRA
    for o, t in zip(ours["metric_per_case"], theirs["metric_per_case"]):
        assert o["prediction_file"] == t["prediction_file"]
        for label in (1, 2):
            assert set(o["metrics"][label]) == set(t["metrics"][label]) | EXTRA
            assert {k: o["metrics"][label][k] for k in t["metrics"][label]} == t["metrics"][label]
        assert set(o["case_metrics"]) == {"Accuracy", "mIoU", "mIoU_fgbg"}
    missed = ours["metric_per_case"][2]["metrics"][2]
    assert missed["Recall"] == 0 and math.isnan(missed["Precision"])
    assert missed["HD95"] == pytest.approx(math.sqrt((6 * 2.5) ** 2 + 2 * (16 * 0.8) ** 2), rel=1e-6)
    assert set(ours["case_mean"]) == {"Accuracy", "mIoU", "mIoU_fgbg"}
    assert {"HD95", "empty_masks", "mIoU", "mIoU_fgbg"} <= set(ours["metric_definitions"])
    # the pool path (num_processes > 1, a spawn pool like nnU-Net's) computes the same numbers
    assert in_process_pool == ["spawn", "spawn"]
    assert json.dumps(ours_in_pool["mean"], sort_keys=True) == json.dumps(
        compute_metrics_on_folder_extended(ref_dir, pred_dir, None, SimpleITKIO(), ".nii.gz", [1, 2],
                                           num_processes=1)["mean"], sort_keys=True)


def test_entry_point(folders, capsys, tmp_path):
    args = [str(folders / "gt"), str(folders / "pred"), "-djfile", str(folders / "dataset.json"),
            "-pfile", str(folders / "plans.json"), "-np", "1"]
    out = tmp_path / "summary.json"
    assert main([*args, "-o", str(out)]) == 0
    assert load_summary_json(str(out))["foreground_mean"]["Dice"] > 0
    printed = capsys.readouterr().out
    assert "HD95" in printed and "foreground" in printed

    # a prediction not on the reference grid: error naming the file, exit 2, the existing summary untouched
    bad = tmp_path / "bad_pred"
    bad.mkdir()
    _write(np.zeros((6, 16, 15), np.uint8), bad / "case_0.nii.gz")
    (bad / "summary.json").write_text("previous")
    assert main([str(folders / "gt"), str(bad), *args[2:], "--chill"]) == 2
    err = capsys.readouterr().err
    assert "case_0.nii.gz" in err and "reference grid" in err
    assert (bad / "summary.json").read_text() == "previous"
    assert sorted(p.name for p in bad.iterdir()) == ["case_0.nii.gz", "summary.json"]

    # a missing dataset.json: error naming it, exit 2, nothing written
    fresh = tmp_path / "fresh.json"
    assert main([*args[:3], str(tmp_path / "nope.json"), *args[4:], "-o", str(fresh)]) == 2
    assert "nope.json" in capsys.readouterr().err and not fresh.exists()
    # predictions missing without --chill
    assert main([str(folders / "gt"), str(bad), *args[2:], "-o", str(fresh)]) == 2
    assert "--chill" in capsys.readouterr().err and not fresh.exists()


def test_case_regions_score_partially_labelled_cases_on_their_labels_only(folders):
    ref_dir, pred_dir = str(folders / "gt"), str(folders / "pred")
    full = compute_metrics_on_folder_extended(ref_dir, pred_dir, None, SimpleITKIO(), ".nii.gz", [1, 2],
                                              num_processes=1)
    part = compute_metrics_on_folder_extended(ref_dir, pred_dir, None, SimpleITKIO(), ".nii.gz", [1, 2],
                                              num_processes=1, case_regions={"case_2.nii.gz": [1]})
    # case 2 (label 2 missed) is no longer scored on label 2: it leaves the label-2 mean, label 1 is unchanged
    assert all(math.isnan(v) for v in part["metric_per_case"][2]["metrics"][2].values())
    assert part["mean"][1] == full["mean"][1]
    dice2 = [c["metrics"][2]["Dice"] for c in full["metric_per_case"][:2]]
    assert part["mean"][2]["Dice"] == pytest.approx(float(np.mean(dice2)))
    assert part["mean"][2]["Dice"] > full["mean"][2]["Dice"]
    assert part["metric_per_case"][2]["case_metrics"]["mIoU"] == pytest.approx(
        full["metric_per_case"][2]["metrics"][1]["IoU"])
