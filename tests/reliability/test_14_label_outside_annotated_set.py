"""Catalog 14: a partially labelled case whose label map holds a label outside its dataset's declared (annotated)
set. ``nnunet-textguided merge`` reads every label map: it stops (exit 2) naming the label map, the values, the
dataset.json that declares the annotated set and the fix, and an earlier merged dataset stays byte-identical (the
merge is staged and only replaces it when complete). A label map edited after the merge (merged labelsTr,
preprocessed data) is caught when CDPDNet training starts: before the network is built or anything is written,
every preprocessed case's label values are checked against its task's annotated labels."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import UNIVERSAL_ID, run_cmd
from reliability_helpers import private_dataset, snapshot

SHAPE = (6, 12, 12)


def write(path: Path, arr: np.ndarray) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(img, str(path), True)


def make_source(raw: Path, dataset_id: int, name: str, labels: list[str], seed: int) -> Path:
    """A tiny nnU-Net raw dataset annotating ``labels`` (codes 1..n), two training cases."""
    rng = np.random.default_rng(seed)
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for i in range(2):
        write(folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz", rng.normal(0, 100, SHAPE).astype(np.int16))
        seg = np.zeros(SHAPE, np.uint8)
        for code in range(1, len(labels) + 1):
            seg[1:4, 3 * code - 2:3 * code, 2:10] = code
        write(folder / "labelsTr" / f"case_{i:03d}.nii.gz", seg)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, **{n: k + 1 for k, n in enumerate(labels)}},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    return folder


def test_a_label_outside_the_declared_set_stops_the_merge_and_keeps_the_earlier_merge(tmp_path):
    raw = tmp_path / "raw"
    make_source(raw, 941, "LiverSpleen", ["liver", "spleen"], seed=1)
    kidneys = make_source(raw, 942, "Kidneys", ["right kidney", "left kidney"], seed=2)
    merge = ("nnunet-textguided", "merge", "-d", 941, 942, "-o", 943, "--name", "Universal", "--raw", raw)
    run_cmd(*merge)
    merged = raw / "Dataset943_Universal"
    before = snapshot(merged)
    assert "labelsTr/D942_case_001.nii.gz" in before

    # a kidney case whose map also carries code 3: this source declares (annotates) only 1 and 2
    bad = kidneys / "labelsTr" / "case_001.nii.gz"
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(bad)))
    seg[4, 5:8, 5:8] = 3
    write(bad, seg)
    r = run_cmd(*merge, "--overwrite", check=False)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr
    assert f"nnunet-textguided merge: error: {bad} contains the values [3], " in err, err
    assert (f"which {kidneys / 'dataset.json'} does not declare (declared: [0, 1, 2]); fix the label map or the "
            "dataset.json") in err
    assert snapshot(merged) == before
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset941_LiverSpleen", "Dataset942_Kidneys",
                                                     "Dataset943_Universal"]  # no staging folder left behind


def test_a_label_outside_the_task_stops_cdpdnet_training_before_anything_is_written(universal_dataset, tmp_path,
                                                                                   monkeypatch):
    import blosc2

    from nnunet_textguided.conditioning.extract import build_trainer
    from nnunet_textguided.training.cdpdnet import PartialLabelError

    raw, pre = private_dataset(universal_dataset, tmp_path, monkeypatch)
    # a kidney case (task PhantomKidneys annotates right kidney = 3, left kidney = 4) edited after preprocessing:
    # code 1 (liver, annotated only by PhantomLiverSpleen) and 9 (no label at all)
    seg_file = pre / "nnUNetPlans_3d_fullres" / "D995_phantom_001_seg.b2nd"
    seg = blosc2.open(urlpath=str(seg_file), mode="a")
    seg[0, 2, 3:6, 3:6] = 1
    seg[0, 3, 3:6, 3:6] = 9
    del seg
    before = snapshot(pre)

    tr = build_trainer(str(UNIVERSAL_ID), "3d_tiny", "CDPDNetTrainer_2epochs", for_extraction=False)
    assert tr.preprocessed_dataset_folder == str(seg_file.parent)
    with pytest.raises(PartialLabelError) as e:
        tr.on_train_start()
    msg = str(e.value)
    assert msg.startswith(f"1 of 10 training cases of {raw.name} hold labels outside their task's annotated set")
    assert (f"{seg_file} (case D995_phantom_001, task 'PhantomKidneys') contains the values [1, 9] (1 = 'liver', "
            "9 = no label of dataset.json), which task 'PhantomKidneys' does not annotate (its labels: "
            "3 = 'right kidney', 4 = 'left kidney'; besides them only background 0 may occur)") in msg, msg
    assert f"preprocessed from {raw / 'labelsTr' / 'D995_phantom_001.nii.gz'}" in msg, msg
    source = tmp_path / "raw" / "Dataset995_PhantomKidneys"
    assert f"merged from {source / 'labelsTr' / 'phantom_001.nii.gz'}" in msg, msg
    assert msg.endswith("Fix: fix the label map and rerun `nnunet-textguided merge` and "
                        f"`nnUNetv2_plan_and_preprocess`, or declare the label in the source dataset.json "
                        f"({source / 'dataset.json'}).")
    assert not tr.was_initialized  # stopped before the network was built
    assert snapshot(pre) == before
    assert not list((tmp_path / "results").rglob("*.pth"))
    assert not list((tmp_path / "results").rglob("plans.json"))
