"""Overlay PNG: written atomically, valid, non-blank, with and without a reference, 3D and 2D."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from nnunet_textguided.data.synthetic import generate_phantom_case
from nnunet_textguided.evaluation.overlay import label_color, save_overlay_png, select_slices

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
