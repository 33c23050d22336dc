"""Partially labelled phantom datasets (universal training): labels, full test truth, merge, command."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_textguided.cli import main as cli_main
from nnunet_textguided.data.merge import load_universal, merge_datasets
from nnunet_textguided.data.synthetic import (PARTIAL_PHANTOM_DATASETS, SPLIT_KIDNEY_LABELS, generate_phantom_case,
                                              make_partial_phantom_datasets, partial_phantom_seed)

SHAPE = (16, 32, 32)
N_TRAIN, N_TEST = 2, 1


def _arr(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return root, make_partial_phantom_datasets(root, n_train=N_TRAIN, n_test=N_TEST, shape=SHAPE, seed=0)


def test_split_kidneys_option():
    a = generate_phantom_case(2, seed=0, shape=SHAPE)
    b = generate_phantom_case(2, seed=0, shape=SHAPE, split_kidneys=True)
    assert np.array_equal(a.image, b.image) and a.note == b.note and a.findings == b.findings
    assert np.array_equal(a.label == 3, np.isin(b.label, [3, 4]))
    assert np.array_equal(np.where(a.label < 3, a.label, 0), np.where(b.label < 3, b.label, 0))
    mid = SHAPE[2] / 2  # patient's right on the image left
    assert np.nonzero(b.label == 3)[2].mean() < mid < np.nonzero(b.label == 4)[2].mean()


def test_each_dataset_labels_only_its_organs(partial):
    root, paths = partial
    assert [p.name for p in paths] == ["Dataset011_PhantomLiverSpleen", "Dataset012_PhantomKidneys"]
    for position, (path, (dataset_id, (name, organs))) in enumerate(zip(paths, PARTIAL_PHANTOM_DATASETS.items())):
        dj = json.loads((path / "dataset.json").read_text())
        assert dj["labels"] == {"background": 0, **{o: i + 1 for i, o in enumerate(organs)}}
        assert dj["label_descriptions"] == {str(i + 1): o for i, o in enumerate(organs)}
        assert dj["numTraining"] == N_TRAIN
        assert json.loads((path / "labelsTs_full.json").read_text()) == {"labels": SPLIT_KIDNEY_LABELS}
        series = partial_phantom_seed(0, position)
        for i in range(N_TRAIN + N_TEST):
            split = "Tr" if i < N_TRAIN else "Ts"
            full = generate_phantom_case(i, seed=series, shape=SHAPE, split_kidneys=True)
            want = np.zeros_like(full.label)
            for code, organ in enumerate(organs, start=1):
                want[full.label == SPLIT_KIDNEY_LABELS[organ]] = code
            got = _arr(path / f"labels{split}" / f"phantom_{i:03d}.nii.gz")
            assert got.dtype == np.uint8 and np.array_equal(got, want), (path.name, i)
            assert np.array_equal(_arr(path / f"images{split}" / f"phantom_{i:03d}_0000.nii.gz"), full.image)
            assert (path / f"images{split}" / f"phantom_{i:03d}.txt").read_text().strip() == full.note
            assert (path / f"images{split}" / f"phantom_{i:03d}.aux.txt").is_file()
            if split == "Ts":
                assert np.array_equal(_arr(path / "labelsTs_full" / f"phantom_{i:03d}.nii.gz"), full.label)
    # the two datasets hold different phantoms
    a = _arr(paths[0] / "imagesTr" / "phantom_000_0000.nii.gz")
    b = _arr(paths[1] / "imagesTr" / "phantom_000_0000.nii.gz")
    assert not np.array_equal(a, b)


def test_merging_the_two_gives_four_labels_and_two_tasks(partial):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    root, _ = partial
    with contextlib.redirect_stdout(io.StringIO()):
        folder = merge_datasets([11, 12], 210, "PhantomUniversal", raw_root=root)
    dj = json.loads((folder / "dataset.json").read_text())
    u = load_universal(dj)
    assert u.labels == ["liver", "spleen", "right kidney", "left kidney"] and u.part_of == {}
    assert u.tasks == [("PhantomLiverSpleen", ["liver", "spleen"]), ("PhantomKidneys", ["right kidney", "left kidney"])]
    assert dj["labels"] == {"background": 0, "liver": [1, 1], "spleen": [2, 2], "right kidney": [3, 3],
                            "left kidney": [4, 4]}
    assert u.annotated_mask("D012_phantom_000") == [False, False, True, True]
    assert len(u.cases) == 2 * (N_TRAIN + N_TEST) and dj["numTraining"] == 2 * N_TRAIN
    k = _arr(folder / "labelsTr" / "D012_phantom_001.nii.gz")
    assert set(np.unique(k)) <= {0, 3, 4} and {3, 4} <= set(np.unique(k))
    verify_dataset_integrity(str(folder), num_processes=1)


def test_command(tmp_path, capsys):
    args = ["partial-phantoms", "--raw", str(tmp_path), "--n-train", "1", "--n-test", "0", "--shape", "8", "16", "16"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "Dataset011_PhantomLiverSpleen"), str(tmp_path / "Dataset012_PhantomKidneys")]
    marker = tmp_path / "Dataset011_PhantomLiverSpleen" / "imagesTr" / "phantom_000.txt"
    before = marker.read_text()
    assert cli_main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert marker.read_text() == before
    assert cli_main(args + ["--overwrite"]) == 0
    with pytest.raises(ValueError, match="organs"):
        make_partial_phantom_datasets(tmp_path, datasets={20: ("Bad", ["kidneys"])})
