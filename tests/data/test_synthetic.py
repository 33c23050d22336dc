"""Synthetic CT phantom dataset: layout, nnU-Net compatibility, HU realism, notes, determinism, safety."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_textguided.data.synthetic import (LABEL_DESCRIPTIONS, LABELS, generate_phantom_case,
                                              make_ct_phantom_dataset)

N_TRAIN, N_TEST = 6, 2
HU_RANGES = {1: (85.0, 115.0), 2: (105.0, 150.0), 3: (150.0, 205.0)}  # liver ~100, spleen ~130, kidneys ~180


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nnUNet_raw")
    return make_ct_phantom_dataset(root, dataset_id=990, name="TextGuidedPhantom", n_train=N_TRAIN,
                                   n_test=N_TEST, seed=0)


def _read(path):
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def test_layout_is_exactly_nnunet_raw(dataset: Path):
    assert dataset.name == "Dataset990_TextGuidedPhantom"
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr",
                                                         "labelsTs"]
    train = [f"phantom_{i:03d}" for i in range(N_TRAIN)]
    test = [f"phantom_{i:03d}" for i in range(N_TRAIN, N_TRAIN + N_TEST)]
    for split, ids in (("Tr", train), ("Ts", test)):
        expected_images = {f"{c}{ext}" for c in ids for ext in ("_0000.nii.gz", ".txt", ".aux.txt")}
        assert {p.name for p in (dataset / f"images{split}").iterdir()} == expected_images
        assert {p.name for p in (dataset / f"labels{split}").iterdir()} == {f"{c}.nii.gz" for c in ids}
    # nothing left over from the atomic writes / staging
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")]


def test_dataset_json(dataset: Path):
    dj = json.loads((dataset / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3} == LABELS
    assert dj["numTraining"] == N_TRAIN
    assert dj["file_ending"] == ".nii.gz"
    assert dj["label_descriptions"] == {"1": "liver", "2": "spleen", "3": "left and right kidneys"}
    assert dj["label_descriptions"] == LABEL_DESCRIPTIONS


def test_nnunet_verify_dataset_integrity_accepts_it(dataset: Path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(dataset), num_processes=1)  # raises on any problem


def test_images_labels_geometry_and_content(dataset: Path):
    for split in ("Tr", "Ts"):
        for lab_file in sorted((dataset / f"labels{split}").glob("*.nii.gz")):
            case = lab_file.name[: -len(".nii.gz")]
            img, sp, org, dirn = _read(dataset / f"images{split}" / f"{case}_0000.nii.gz")
            seg, sp_s, org_s, dirn_s = _read(lab_file)
            assert img.shape == seg.shape == (32, 64, 64)
            assert img.dtype == np.int16 and seg.dtype == np.uint8
            assert np.allclose(sp, (1.25, 1.25, 2.5)) and np.allclose(sp, sp_s)  # SimpleITK order x, y, z
            assert np.allclose(org, org_s) and np.allclose(dirn, dirn_s)
            assert set(np.unique(seg)) <= {0, 1, 2, 3}
            assert -1024 <= img.min() and img.max() < 3072
            assert (img < -900).mean() > 0.1  # air around the body
            assert (img > 500).any()  # bone (spine)
            fg_slices = (seg > 0).any(axis=(1, 2))
            assert fg_slices.sum() >= 12 and not fg_slices[:2].any() and not fg_slices[-2:].any()


def test_labels_present_and_hu_realistic(dataset: Path):
    for c in sorted((dataset / "labelsTr").glob("*.nii.gz")):
        case = c.name[: -len(".nii.gz")]
        img = _read(dataset / "imagesTr" / f"{case}_0000.nii.gz")[0].astype(np.float64)
        seg = _read(c)[0]
        note = (dataset / "imagesTr" / f"{case}.txt").read_text(encoding="utf-8")
        assert (seg == 1).sum() > 2000, case  # liver: the big one
        assert (seg == 3).sum() > 300, case  # both kidneys
        if (seg == 2).any():
            assert "not visualized" not in note
        else:
            assert "spleen not visualized" in note.lower(), (case, note)
        for lab, (lo, hi) in HU_RANGES.items():
            if (seg == lab).any():
                assert lo <= img[seg == lab].mean() <= hi, (case, lab, img[seg == lab].mean())
        # kidneys are on both sides of the midline, liver on the image left, spleen on the image right
        kx = np.nonzero(seg == 3)[2]
        assert kx.min() < 32 < kx.max()
        assert np.nonzero(seg == 1)[2].mean() < 32
        if (seg == 2).any():
            assert np.nonzero(seg == 2)[2].mean() > 32
        # the noise is CT-like: interior of the liver has an sd of roughly 15-25 HU (+ texture)
        from scipy.ndimage import binary_erosion

        core = binary_erosion(seg == 1, iterations=2)
        assert 8.0 < img[core].std() < 35.0


def test_notes(dataset: Path):
    notes, aux = [], []
    for split in ("Tr", "Ts"):
        for f in sorted((dataset / f"images{split}").glob("*_0000.nii.gz")):
            case = f.name[: -len("_0000.nii.gz")]
            n = (f.parent / f"{case}.txt").read_text(encoding="utf-8").strip()
            a = (f.parent / f"{case}.aux.txt").read_text(encoding="utf-8").strip()
            assert 20 < len(n) < 300 and 20 < len(a) < 400
            assert "liver" in n.lower() and "kidney" in n.lower()
            assert "liver" in a.lower() and "kidneys" in a.lower()
            notes.append(n)
            aux.append(a)
    assert len(set(notes)) >= len(notes) // 2, notes  # the notes follow each case's findings


def test_notes_follow_findings():
    seen = set()
    for i in range(40):
        c = generate_phantom_case(i, seed=0)
        f, n = c.findings, c.note.lower()
        seen.add((f["liver_enlarged"], f["spleen_state"], f["left_kidney_small"]))
        assert ("enlarged liver" in n) == f["liver_enlarged"]
        assert {"normal": "spleen normal", "enlarged": "enlarged spleen", "small": "small spleen",
                "absent": "spleen not visualized"}[f["spleen_state"]] in n
        assert ("small left kidney" in n) == f["left_kidney_small"]
        assert ((c.label == 2).sum() == 0) == (f["spleen_state"] == "absent")
        if f["liver_reaches_right_kidney_lower_pole"]:
            assert "lower pole of the right kidney" in n
    assert len(seen) >= 5  # the findings really vary
    vols = [generate_phantom_case(i).findings["volumes_ml"] for i in range(12)]
    big = [v["liver"] for v, i in zip(vols, range(12)) if generate_phantom_case(i).findings["liver_enlarged"]]
    normal = [v["liver"] for v, i in zip(vols, range(12)) if not generate_phantom_case(i).findings["liver_enlarged"]]
    if big and normal:
        assert min(big) > np.median(normal)


def test_deterministic_and_seed_dependent(tmp_path: Path, dataset: Path):
    again = make_ct_phantom_dataset(tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=0)
    for rel in ("imagesTr/phantom_000_0000.nii.gz", "labelsTr/phantom_003.nii.gz",
                "imagesTs/phantom_007_0000.nii.gz", "labelsTs/phantom_006.nii.gz"):
        assert np.array_equal(_read(dataset / rel)[0], _read(again / rel)[0]), rel
    for rel in ("imagesTr/phantom_001.txt", "imagesTr/phantom_001.aux.txt"):
        assert (dataset / rel).read_text() == (again / rel).read_text()
    # a case does not depend on how many cases are generated
    assert np.array_equal(generate_phantom_case(3, seed=0).image, _read(dataset / "imagesTr/phantom_003_0000.nii.gz")[0])
    assert not np.array_equal(generate_phantom_case(0, seed=1).label, generate_phantom_case(0, seed=0).label)


def test_refuses_overwrite_unless_asked(tmp_path: Path):
    p = make_ct_phantom_dataset(tmp_path, dataset_id=991, name="Tiny", n_train=1, n_test=0, shape=(16, 32, 32))
    marker = p / "imagesTr" / "phantom_000.txt"
    before = marker.read_text()
    with pytest.raises(FileExistsError, match=r"Dataset991_Tiny.*overwrite"):
        make_ct_phantom_dataset(tmp_path, dataset_id=991, name="Tiny", n_train=1, n_test=0, shape=(16, 32, 32))
    assert marker.read_text() == before
    (p / "stale.txt").write_text("x")
    p2 = make_ct_phantom_dataset(tmp_path, dataset_id=991, name="Tiny", n_train=2, n_test=1, shape=(16, 32, 32),
                                 overwrite=True)
    assert p2 == p and not (p / "stale.txt").exists()
    assert json.loads((p / "dataset.json").read_text())["numTraining"] == 2
    assert _read(p / "imagesTr" / "phantom_000_0000.nii.gz")[0].shape == (16, 32, 32)
    # another folder with the same id would make the id ambiguous for nnU-Net
    with pytest.raises(FileExistsError, match="Dataset991_Tiny"):
        make_ct_phantom_dataset(tmp_path, dataset_id=991, name="Other", n_train=1, n_test=0, shape=(16, 32, 32))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["Dataset991_Tiny"]


def test_rejects_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError):
        make_ct_phantom_dataset(tmp_path, dataset_id=1000)
    with pytest.raises(ValueError):
        make_ct_phantom_dataset(tmp_path, name="has space")
    with pytest.raises(ValueError):
        make_ct_phantom_dataset(tmp_path, n_train=0)
    assert not list(tmp_path.iterdir())


def test_cli(tmp_path: Path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_synthetic_dataset.py"
    env = dict(os.environ, nnUNet_raw=str(tmp_path))
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "--overwrite" in out.stdout and "nnUNet_raw" in out.stdout
    args = [sys.executable, str(script), "--id", "992", "--name", "Cli", "--n-train", "2", "--n-test", "1",
            "--shape", "16", "32", "32", "--seed", "3"]
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert str(tmp_path / "Dataset992_Cli") in out.stdout
    assert (tmp_path / "Dataset992_Cli" / "imagesTs" / "phantom_002_0000.nii.gz").is_file()
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "--overwrite" in out.stderr
    out = subprocess.run(args + ["--overwrite"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
