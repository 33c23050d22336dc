"""Catalog 10: NaN / inf / constant image volumes at prediction.

A case whose preprocessed image holds NaN or inf is not predicted: the other cases are, then the run stops (exit 2)
naming the image file and the fix, and an earlier prediction of that case stays byte-identical. A constant image is
predicted with a warning naming its file. Inf voxels of a CT image are clipped to the CT intensity window by
nnU-Net's normalisation, so such an image is predicted (z-score normalisation turns inf into NaN: refused). (Training data: nnUNetv2_plan_and_preprocess --verify_dataset_integrity refuses NaN
images; the BiCLIP offline extraction refuses non-finite slice tables, see test_06.) SimpleITK reads NaN/inf voxels
of NIfTI files as finite numbers, so the model here reads its images with nnU-Net's NibabelIO, which keeps them, as
do .npy/.b2nd/.tif readers.
"""
import json
import shutil

import numpy as np
import SimpleITK as sitk

from conftest import PHANTOM_ID, run_cmd
from reliability_helpers import build_model_folder, previous_predictions, private_dataset, snapshot

TRAINER = "BiCLIPTrainer_Net1_2epochs"


def poison(path, fn) -> None:
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    out = sitk.GetImageFromArray(fn(arr))
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path))


def test_nan_and_inf_cases_are_refused_by_name_and_a_constant_image_is_warned_about(phantom_dataset, tmp_path,
                                                                                    monkeypatch):
    raw, _ = private_dataset(phantom_dataset, tmp_path, monkeypatch)
    model = build_model_folder(PHANTOM_ID, "3d_tiny", TRAINER)
    plans = json.loads((model / "plans.json").read_text())
    (model / "plans.json").write_text(json.dumps({**plans, "image_reader_writer": "NibabelIO"}))
    inputs, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(raw / "imagesTs", inputs)
    images = sorted(inputs.glob("*_0000.nii.gz"))
    assert len(images) == 2
    # a third case: a copy of the first with one inf voxel
    inf_image = inputs / "phantom_inf_0000.nii.gz"
    shutil.copy2(images[0], inf_image)
    for sidecar in inputs.glob(images[0].name[:-12] + ".*txt"):
        shutil.copy2(sidecar, inputs / sidecar.name.replace(images[0].name[:-12], "phantom_inf"))
    labels = tmp_path / "earlier"
    shutil.copytree(raw / "labelsTs", labels)
    shutil.copy2(labels / f"{images[0].name[:-12]}.nii.gz", labels / "phantom_inf.nii.gz")
    before = previous_predictions(out, model, labels, ".nii.gz")

    nan_image, constant_image = images
    poison(nan_image, lambda a: np.where(np.arange(a.size).reshape(a.shape) % 97 == 0, np.nan, a))
    poison(inf_image, lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, np.inf, a))
    poison(constant_image, lambda a: np.full_like(a, -1000))
    r = run_cmd("nnUNetv2_predict_textguided", "-i", inputs, "-o", out, "-d", PHANTOM_ID, "-c", "3d_tiny", "-f", 0,
                "-tr", TRAINER, "-device", "cpu", "-npp", 1, "-nps", 1, "--disable_tta", check=False, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr
    assert "nnUNetv2_predict_textguided: error: 1 case(s) were not predicted because their image holds NaN or " \
           f"infinite values: {nan_image}. " in err, err[-3000:]
    assert "Replace those voxels (e.g. by the background intensity) and predict these cases again" in err
    assert f"nnUNetv2_predict_textguided: warning: {constant_image} is constant" in err
    after = snapshot(out)
    assert after[f"{nan_image.name[:-12]}.nii.gz"] == before[f"{nan_image.name[:-12]}.nii.gz"]  # not overwritten
    for case in (constant_image.name[:-12], "phantom_inf"):  # predicted
        assert after[f"{case}.nii.gz"] != before[f"{case}.nii.gz"]

    # nnU-Net's sequential path (-npp 0 -nps 0) stops at the case, naming its file
    only_nan = tmp_path / "in_nan"
    only_nan.mkdir()
    shutil.copy2(nan_image, only_nan / nan_image.name)
    for sidecar in inputs.glob(nan_image.name[:-12] + ".*txt"):
        shutil.copy2(sidecar, only_nan / sidecar.name)
    r = run_cmd("nnUNetv2_predict_textguided", "-i", only_nan, "-o", out, "-d", PHANTOM_ID, "-c", "3d_tiny", "-f", 0,
                "-tr", TRAINER, "-device", "cpu", "-npp", 0, "-nps", 0, "--disable_tta", check=False, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"nnUNetv2_predict_textguided: error: {only_nan / nan_image.name} holds NaN or infinite values" in r.stderr
    assert snapshot(out)[f"{nan_image.name[:-12]}.nii.gz"] == before[f"{nan_image.name[:-12]}.nii.gz"]
