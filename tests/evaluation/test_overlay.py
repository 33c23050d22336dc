"""Overlay PNG: written atomically, valid, non-blank, with and without a reference, 3D and 2D, with a note;
preview_folder / `nnunet-textguided preview` on 3D CT and 2D PNG prediction folders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from nnunet_textguided.data.synthetic import generate_phantom_case
from nnunet_textguided.evaluation import overlay
from nnunet_textguided.evaluation.overlay import label_color, main, preview_folder, save_overlay_png, select_slices

NAMES = {1: "liver", 2: "spleen", 3: "kidneys"}


def _write(arr, path, spacing=(1.25, 1.25, 2.5)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing[: arr.ndim])
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("overlay")
    c = generate_phantom_case(0, seed=0)
    pred = c.label.copy()
    pred[pred == 2] = 0  # a "prediction" that misses the spleen
    return (_write(c.image, d / "img_0000.nii.gz"), _write(c.label, d / "ref.nii.gz"),
            _write(pred, d / "pred.nii.gz"), c)


def _has_colour(png, rgb, tol=0.2):
    diff = np.abs(png[..., :3] - np.asarray(rgb)[None, None, :]).max(-1)
    return (diff < tol).any()


def test_overlay_png_with_reference(tmp_path: Path, case_files):
    img, ref, pred, _ = case_files
    out = save_overlay_png(img, pred, tmp_path / "sub" / "ov.png", NAMES, reference_file=ref, n_slices=3)
    assert out == tmp_path / "sub" / "ov.png" and out.is_file()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["ov.png"]  # no temporary left behind
    png = imread(out)
    assert png.ndim == 3 and png.shape[0] >= 300 and png.shape[1] >= 600
    assert png[..., :3].std() > 0.1  # not blank
    dark = (png[..., :3].max(-1) < 0.05).mean()  # the air around the body
    assert 0.05 < dark < 0.9
    # the fill colours of the labels appear (blended, so compare loosely against the pure colour + grey)
    for lab in (1, 3):
        col = np.asarray(label_color(lab))
        assert _has_colour(png, col, tol=0.35), lab


def test_overlay_png_without_reference_is_smaller(tmp_path: Path, case_files):
    img, ref, _, _ = case_files
    one = imread(save_overlay_png(img, ref, tmp_path / "one.png", NAMES))
    two = imread(save_overlay_png(img, ref, tmp_path / "two.png", NAMES, reference_file=ref))
    assert one.shape[0] < two.shape[0] and one.shape[1] == two.shape[1]


def test_select_slices_prefers_foreground():
    seg = np.zeros((20, 8, 8), np.uint8)
    seg[5, :4] = 1
    seg[6, :6] = 1
    seg[15, :5] = 2
    assert select_slices(seg, 2) == [6, 15]  # 5 is next to 6: spread out
    assert select_slices(seg, 3) == [5, 6, 15]
    assert len(select_slices(np.zeros((10, 4, 4)), 3)) == 3  # empty segmentation: still some slices


def test_overlay_2d_and_shape_mismatch(tmp_path: Path, case_files):
    _, _, _, c = case_files
    z = int(np.argmax((c.label > 0).sum((1, 2))))
    img2d = _write(c.image[z], tmp_path / "img2d.nii.gz", (1.25, 1.25))
    seg2d = _write(c.label[z], tmp_path / "seg2d.nii.gz", (1.25, 1.25))
    png = imread(save_overlay_png(img2d, seg2d, tmp_path / "2d.png", NAMES, reference_file=seg2d))
    assert png.shape[0] >= 200 and png[..., :3].std() > 0.1
    bad = _write(np.zeros((4, 8, 8), np.uint8), tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match="shape"):
        save_overlay_png(case_files[0], bad, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_overlay_note_band(tmp_path: Path, case_files):
    img, ref, _, c = case_files
    plain = imread(save_overlay_png(img, ref, tmp_path / "plain.png", NAMES))
    noted = imread(save_overlay_png(img, ref, tmp_path / "noted.png", NAMES, note=c.note + "\n" + c.aux_note))
    assert noted.shape[0] > plain.shape[0] and noted.shape[1] == plain.shape[1]
    band = noted[plain.shape[0]:, :, :3]
    assert (band.max(-1) < 0.5).any()  # dark text in the band below the panels
    long_ = imread(save_overlay_png(img, ref, tmp_path / "long.png", NAMES, note="very long note, " * 2000))
    capped = imread(save_overlay_png(img, ref, tmp_path / "cap.png", NAMES, note="word " * 140))  # 7 lines
    assert long_.shape == capped.shape  # both cut to 6 lines
    assert long_.shape[0] - plain.shape[0] <= 0.16 * 6 * 100 + 21
    with pytest.raises(ValueError, match="window"):
        save_overlay_png(img, ref, tmp_path / "w.png", window="ct")


def _dataset_json(folder: Path, channel: str, ending: str) -> Path:
    labels = {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3, "both": [1, 3]}  # a region: not a name
    f = folder / "dataset.json"
    f.write_text(json.dumps({"channel_names": {"0": channel}, "labels": labels, "file_ending": ending}))
    return f


@pytest.fixture(scope="module")
def folder3d(tmp_path_factory):
    d = tmp_path_factory.mktemp("preview3d")
    for sub in ("images", "pred", "ref"):
        (d / sub).mkdir()
    for i in range(5):
        c = generate_phantom_case(i, seed=1, shape=(12, 40, 40))
        _write(c.image, d / "images" / f"{c.case_id}_0000.nii.gz")
        _write(c.label, d / "ref" / f"{c.case_id}.nii.gz")
        _write(np.where(c.label == 2, 0, c.label).astype(np.uint8), d / "pred" / f"{c.case_id}.nii.gz")
        if i % 2 == 0:
            (d / "images" / f"{c.case_id}.txt").write_text(c.note + " \u00e9", encoding="utf-8")
            (d / "images" / f"{c.case_id}.aux.txt").write_text(c.aux_note, encoding="utf-8")
    for extra in ("summary.json", "plans.json", "phantom_000.npz", "phantom_000.pkl"):  # what nnU-Net leaves there
        (d / "pred" / extra).write_text("{}")
    return d


def test_preview_folder_3d(tmp_path: Path, folder3d, monkeypatch):
    d, calls = folder3d, []
    real = overlay.save_overlay_png
    monkeypatch.setattr(overlay, "save_overlay_png", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    dj = _dataset_json(tmp_path, "CT", ".nii.gz")
    out = preview_folder(d / "pred", d / "images", tmp_path / "out", d / "ref", dj, n_cases=3, n_slices=2)
    assert [p.name for p in out] == ["phantom_000.png", "phantom_002.png", "phantom_004.png"]  # spread, sorted
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in out]
    for p in out:
        png = imread(p)
        assert png.shape[0] > 200 and png[..., :3].std() > 0.1
    (image, pred, _, names), kw = calls[0]
    assert image.name == "phantom_000_0000.nii.gz" and pred.name == "phantom_000.nii.gz"
    assert names == {1: "liver", 2: "spleen", 3: "kidneys"}
    assert kw["window"] == overlay.WINDOW_ABDOMEN and kw["reference_file"].parent == d / "ref"
    note = kw["note"]
    assert note.endswith("\u00e9\naux: " + (d / "images" / "phantom_000.aux.txt").read_text())
    # deterministic; explicit cases; no dataset.json: ending from the files present, percentile window, no note
    assert preview_folder(d / "pred", d / "images", tmp_path / "out", d / "ref", dj, n_cases=3) == out
    calls.clear()
    again = preview_folder(d / "pred", d / "images", tmp_path / "o2", cases=["phantom_003"], n_slices=1)
    assert again == [tmp_path / "o2" / "phantom_003.png"]
    assert calls[0][1]["window"] == "auto" and calls[0][1]["note"] is None and calls[0][0][3] == {}
    with pytest.raises(FileNotFoundError, match="phantom_042"):
        preview_folder(d / "pred", d / "images", tmp_path / "o3", cases=["phantom_042"])


def test_preview_folder_2d_png(tmp_path: Path):
    rng = np.random.default_rng(0)
    for sub in ("imagesTs", "pred", "labelsTs"):
        (tmp_path / sub).mkdir()
    for i in range(3):
        xx = np.mgrid[:64, :80][1]
        img = (10 + 30 * (xx > 40) + rng.integers(0, 5, (64, 80))).astype(np.uint8)  # low contrast, X-ray-like
        lab = np.zeros((64, 80), np.uint8)
        lab[5:15, 5:20] = 1
        if i == 1:  # an RGB png: shown as grey values of channel 0
            sitk.WriteImage(sitk.GetImageFromArray(np.stack([img] * 3, -1), isVector=True),
                            str(tmp_path / "imagesTs" / f"x{i}_0000.png"))
        else:
            sitk.WriteImage(sitk.GetImageFromArray(img), str(tmp_path / "imagesTs" / f"x{i}_0000.png"))
        for sub in ("pred", "labelsTs"):
            sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / sub / f"x{i}.png"))
    _dataset_json(tmp_path / "pred", "X-ray", ".png")  # picked up from the prediction folder
    out = preview_folder(tmp_path / "pred", tmp_path / "imagesTs", tmp_path / "pred" / "previews",
                         tmp_path / "labelsTs", n_cases=3)
    assert [p.name for p in out] == ["x0.png", "x1.png", "x2.png"]
    for p in out:
        png = imread(p)[..., :3]
        grey = (np.ptp(png, -1) < 0.01) & (png.max(-1) < 0.98)  # image pixels: grey, not the white background
        assert png[grey].std() > 0.2  # the percentile window spreads 10..45 over black..white
        assert (png.max(-1) < 0.1).mean() > 0.05  # HU window W400/L50 would show it all mid-grey
    with pytest.raises(ValueError, match="overwrite"):
        preview_folder(tmp_path / "pred", tmp_path / "imagesTs", tmp_path / "pred", n_cases=1)


def test_preview_missing_image_and_main(tmp_path: Path, folder3d, capsys):
    d = folder3d
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(FileNotFoundError, match=r"phantom_000_0000\.nii\.gz.*_0000\.nii\.gz"):
        preview_folder(d / "pred", images, tmp_path / "out", n_cases=1)
    assert not (tmp_path / "out").exists()
    assert main(["-i", str(tmp_path / "nope"), "-p", str(d / "pred")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["-i", str(d / "images"), "-p", str(d / "pred"), "-o", str(tmp_path / "prev"),
                 "--cases", "phantom_001", "phantom_004"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "prev" / "phantom_001.png"), str(tmp_path / "prev" / "phantom_004.png")]
    assert all(Path(f).is_file() for f in printed)
