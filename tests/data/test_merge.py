"""`nnunet-textguided merge`: unified vocabulary, part-of regions, remapped label maps, metadata, errors."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_textguided.cli import main as cli_main
from nnunet_textguided.data.merge import (DEFAULT_ORGAN_PROMPT, METADATA_KEY, load_universal, main,
                                          merge_datasets, normalise_label_name)

SHAPE = (8, 16, 16)
SPACING_XYZ = (1.5, 1.5, 3.0)
ORIGIN = (10.0, -5.0, 2.0)


def _write_image(path: Path, arr: np.ndarray) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin(ORIGIN)
    sitk.WriteImage(img, str(path), True)


def _read(path: Path):
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin()


def _label_map(rng, codes) -> np.ndarray:
    """Blocks of each code (plus background), different per case."""
    seg = np.zeros(SHAPE, np.uint8)
    for i, c in enumerate(codes):
        z0 = int(rng.integers(0, 3))
        seg[z0:z0 + 4, 2 + 4 * i:5 + 4 * i, 3:12] = c
    return seg


def make_source(root: Path, dataset_id: int, name: str, labels: dict, label_descriptions: dict | None = None,
                n_train: int = 2, n_test: int = 1, channels: dict | None = None, seed: int = 0) -> dict:
    """A tiny nnU-Net raw dataset; returns {split: {case: label array}}."""
    rng = np.random.default_rng(seed)
    folder = root / f"Dataset{dataset_id:03d}_{name}"
    channels = channels or {"0": "CT"}
    codes = sorted({c for k, v in labels.items() if k != "background" for c in (v if isinstance(v, list) else [v])})
    written = {"Tr": {}, "Ts": {}}
    for split, n in (("Tr", n_train), ("Ts", n_test)):
        (folder / f"images{split}").mkdir(parents=True)
        (folder / f"labels{split}").mkdir(parents=True)
        for i in range(n):
            case = f"case_{i:03d}" if split == "Tr" else f"test_{i:03d}"
            for ch in range(len(channels)):
                _write_image(folder / f"images{split}" / f"{case}_{ch:04d}.nii.gz",
                             rng.normal(0, 100, SHAPE).astype(np.int16))
            seg = _label_map(rng, codes)
            _write_image(folder / f"labels{split}" / f"{case}.nii.gz", seg)
            (folder / f"images{split}" / f"{case}.txt").write_text(f"note of {name} {case}\n")
            (folder / f"images{split}" / f"{case}.aux.txt").write_text(f"aux of {name} {case}\n")
            written[split][case] = seg
    dj = {"channel_names": channels, "labels": labels, "numTraining": n_train, "file_ending": ".nii.gz",
          "name": folder.name}
    if label_descriptions:
        dj["label_descriptions"] = label_descriptions
    (folder / "dataset.json").write_text(json.dumps(dj, indent=2))
    return written


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    lits = make_source(root, 21, "LiTSLike", {"background": 0, "liver": 1, "liver tumour": 2}, seed=1)
    abd = make_source(root, 22, "Abdomen", {"background": 0, "Spleen": 1, "kidney_left": 2},
                      label_descriptions={"1": "Spleen", "2": "Kidney-L"}, seed=2)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        folder = merge_datasets([21, "Dataset022_Abdomen"], 300, "Universal", raw_root=root)
    return root, folder, {21: lits, 22: abd}, out.getvalue()


def test_normalisation():
    assert normalise_label_name("  Liver_Tumour ") == "liver tumor"
    assert normalise_label_name("Kidney-L") == "kidney l"
    assert normalise_label_name("right   adrenal__gland") == "right adrenal gland"


def test_vocabulary_codes_regions(merged):
    root, folder, _, stdout = merged
    assert folder == root / "Dataset300_Universal"
    dj = json.loads((folder / "dataset.json").read_text())
    meta = dj[METADATA_KEY]
    # non-part labels in order of first appearance, then the parts
    assert meta["labels"] == ["liver", "spleen", "left kidney", "liver tumor"]
    assert meta["codes"] == {"liver": 1, "spleen": 2, "left kidney": 3, "liver tumor": 4}
    assert meta["part_of"] == {"liver tumor": "liver"}
    assert dj["labels"] == {"background": 0, "liver": [1, 4], "spleen": [2, 2], "left kidney": [3, 3],
                            "liver tumor": [4, 4]}
    assert list(dj["labels"]) == ["background", "liver", "spleen", "left kidney", "liver tumor"]  # channel order
    assert dj["regions_class_order"] == [1, 2, 3, 4]
    assert dj["numTraining"] == 4 and dj["file_ending"] == ".nii.gz" and dj["channel_names"] == {"0": "CT"}
    assert "[c, c]" in dj["description"]
    assert meta["tasks"] == [
        {"name": "LiTSLike", "source": "Dataset021_LiTSLike", "labels": ["liver", "liver tumor"]},
        {"name": "Abdomen", "source": "Dataset022_Abdomen", "labels": ["spleen", "left kidney"]}]
    assert meta["default_task"] == "auto" and meta["organ_prompt"] == DEFAULT_ORGAN_PROMPT
    assert "{labels}" in meta["task_prompt"] and meta["version"] == 1
    # the mapping is printed
    assert "liver tumour -> liver tumor (4)" in stdout
    assert "kidney_left ['Kidney-L'] -> left kidney (3)" in stdout


def test_files_labels_and_case_metadata(merged):
    root, folder, sources, _ = merged
    meta = json.loads((folder / "dataset.json").read_text())[METADATA_KEY]
    luts = {21: {0: 0, 1: 1, 2: 4}, 22: {0: 0, 1: 2, 2: 3}}
    expected_cases = {}
    for sid, splits in sources.items():
        src = next(root.glob(f"Dataset{sid:03d}_*"))
        for split, cases in splits.items():
            for case, seg in cases.items():
                new = f"D{sid:03d}_{case}"
                expected_cases[new] = {"source": src.name, "tasks": [src.name.split("_", 1)[1]], "source_case": case,
                                       "split": split}
                got, sp, org = _read(folder / f"labels{split}" / f"{new}.nii.gz")
                want = np.vectorize(luts[sid].get)(seg)
                assert got.dtype == np.uint8 and np.array_equal(got, want), new
                assert np.allclose(sp, SPACING_XYZ) and np.allclose(org, ORIGIN)
                img_src = src / f"images{split}" / f"{case}_0000.nii.gz"
                img_new = folder / f"images{split}" / f"{new}_0000.nii.gz"
                assert os.stat(img_src).st_ino == os.stat(img_new).st_ino  # hard link, same file system
                for suffix in (".txt", ".aux.txt"):
                    assert (folder / f"images{split}" / f"{new}{suffix}").read_text() == \
                        (src / f"images{split}" / f"{case}{suffix}").read_text()
    assert meta["cases"] == expected_cases
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr",
                                                        "labelsTs"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging left over


def test_nnunet_label_manager_and_integrity(merged):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    _, folder, _, _ = merged
    dj = json.loads((folder / "dataset.json").read_text())
    lm = LabelManager(dj["labels"], dj["regions_class_order"])
    assert lm.has_regions and lm.all_labels == [0, 1, 2, 3, 4]
    assert lm.foreground_regions == [(1, 4), (2, 2), (3, 3), (4, 4)]
    assert lm.num_segmentation_heads == 4
    # export: a tumour channel is written over its organ
    probs = np.zeros((4, 1, 1, 3), np.float32)
    probs[0, ..., :2] = 0.9  # liver at x 0, 1
    probs[3, ..., 1] = 0.9  # tumour at x 1
    probs[1, ..., 2] = 0.9  # spleen at x 2
    assert lm.convert_probabilities_to_segmentation(probs).ravel().tolist() == [1, 4, 2]
    verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem


def test_load_universal_helpers(merged):
    _, folder, _, _ = merged
    u = load_universal(json.loads((folder / "dataset.json").read_text()))
    assert load_universal(folder / "dataset.json") == u
    assert u.organ_prompts() == [f"A computerized tomography of a {x}." for x in
                                 ("liver", "spleen", "left kidney", "liver tumor")]
    assert u.task_prompts() == ["A task of segmenting liver, liver tumor in computerized tomography.",
                                "A task of segmenting spleen, left kidney in computerized tomography."]
    assert u.task_index("Abdomen") == 1 and u.task_names == ["LiTSLike", "Abdomen"]
    assert u.task_of("D021_case_001") == 0 and u.task_of("D022_test_000") == 1
    assert u.annotated_mask("D021_case_000") == [True, False, False, True]
    assert u.annotated_mask("D022_case_000") == [False, True, True, False]
    with pytest.raises(KeyError, match="merge"):
        u.task_of("nope")
    with pytest.raises(ValueError, match="LiTSLike"):
        u.task_index("nope")
    with pytest.raises(ValueError, match="nnunet-textguided merge"):
        load_universal({"labels": {"background": 0}})


def test_synonyms_scoped_aliases_part_of_and_prompts(tmp_path):
    make_source(tmp_path, 31, "Liver", {"background": 0, "liver": 1, "tumor": 2}, n_test=0)
    make_source(tmp_path, 32, "Kidney", {"background": 0, "Kidney": 1, "tumor": 2, "Cyst": 3}, n_test=0)
    make_source(tmp_path, 33, "Other", {"background": 0, "Milz": 1, "IVC": 2}, n_test=0)
    syn = {"liver tumor": ["Dataset031_Liver:tumor"], "kidney tumor": ["32:tumor"], "kidney cyst": ["Kidney:cyst"],
           "spleen": ["milz"], "__part_of__": {"kidney cyst": None, "postcava": "spleen"}}
    (tmp_path / "syn.json").write_text(json.dumps(syn))
    rc = main(["-d", "31", "32", "33", "-o", "301", "--name", "Syn", "--raw", str(tmp_path), "--synonyms",
               str(tmp_path / "syn.json"), "--organ-prompt", "CT of {label}", "--task-prompt", "Find {labels}",
               "--default-task", "Kidney"])
    assert rc == 0
    dj = json.loads((tmp_path / "Dataset301_Syn" / "dataset.json").read_text())
    meta = dj[METADATA_KEY]
    # kidney tumor is part of kidney (automatic), kidney cyst is not (null), postcava part of spleen (user)
    assert meta["part_of"] == {"liver tumor": "liver", "kidney tumor": "kidney", "postcava": "spleen"}
    assert meta["labels"] == ["liver", "kidney", "kidney cyst", "spleen", "liver tumor", "kidney tumor", "postcava"]
    assert dj["labels"]["kidney"] == [2, 6] and dj["labels"]["kidney cyst"] == [3, 3]
    assert dj["labels"]["spleen"] == [4, 7]
    u = load_universal(dj)
    assert u.default_task == "Kidney" and u.organ_prompts()[0] == "CT of liver"
    assert u.task_prompts()[1] == "Find kidney, kidney cyst, kidney tumor"


def test_conflicting_labels_are_an_error(tmp_path, capsys):
    make_source(tmp_path, 41, "Twice", {"background": 0, "kidney_left": 1, "Left Kidney": 2}, n_test=0)
    make_source(tmp_path, 42, "Fine", {"background": 0, "liver": 1}, n_test=0)
    rc = main(["-d", "41", "42", "-o", "400", "--name", "Bad", "--raw", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("nnunet-textguided merge: error:")
    assert str(tmp_path / "Dataset041_Twice" / "dataset.json") in err and "--synonyms" in err
    assert "left kidney" in err
    assert not (tmp_path / "Dataset400_Bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_mismatched_channels_and_regions_are_refused(tmp_path):
    make_source(tmp_path, 51, "OneChannel", {"background": 0, "liver": 1}, n_test=0)
    make_source(tmp_path, 52, "TwoChannels", {"background": 0, "spleen": 1}, n_test=0,
                channels={"0": "T1", "1": "T2"})
    with pytest.raises(ValueError) as e:
        merge_datasets([51, 52], 500, "Bad", raw_root=tmp_path, verbose=False)
    msg = str(e.value)
    assert "Dataset051_OneChannel/dataset.json" in msg and "Dataset052_TwoChannels/dataset.json" in msg
    assert "channels" in msg
    make_source(tmp_path, 54, "SwappedChannels", {"background": 0, "spleen": 1}, n_test=0,
                channels={"0": "T2", "1": "T1"})
    with pytest.raises(ValueError, match="channel i of every source"):  # same count, other order
        merge_datasets([52, 54], 500, "Bad", raw_root=tmp_path, verbose=False)
    make_source(tmp_path, 53, "Regions", {"background": 0, "whole": [1, 2], "core": 2}, n_test=0)
    with pytest.raises(ValueError, match="regions"):
        merge_datasets([51, 53], 500, "Bad", raw_root=tmp_path, verbose=False)
    with pytest.raises(ValueError, match=r"\{label\}"):
        merge_datasets([51], 500, "Bad", raw_root=tmp_path, organ_prompt="no placeholder", verbose=False)
    with pytest.raises(FileNotFoundError, match="Dataset051_OneChannel"):
        merge_datasets([51, 59], 500, "Bad", raw_root=tmp_path, verbose=False)
    assert not (tmp_path / "Dataset500_Bad").exists()


def test_existing_output_refused_unless_overwrite_and_unknown_default_task(tmp_path, capsys):
    make_source(tmp_path, 61, "A", {"background": 0, "liver": 1}, n_test=0)
    make_source(tmp_path, 62, "B", {"background": 0, "spleen": 1}, n_test=0)
    folder = merge_datasets([61, 62], 600, "M", raw_root=tmp_path, verbose=False)
    before = (folder / "dataset.json").read_text()
    (folder / "marker").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        merge_datasets([61, 62], 600, "M", raw_root=tmp_path, verbose=False)
    assert (folder / "dataset.json").read_text() == before and (folder / "marker").exists()
    rc = cli_main(["merge", "-d", "61", "62", "-o", "600", "--name", "M", "--raw", str(tmp_path)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (folder / "marker").exists()
    merge_datasets([62], 600, "M", raw_root=tmp_path, overwrite=True, verbose=False)
    assert not (folder / "marker").exists()
    assert load_universal(folder / "dataset.json").labels == ["spleen"]
    with pytest.raises(ValueError, match=r"'Nope'.*\['A', 'B'\]"):
        merge_datasets([61, 62], 601, "N", raw_root=tmp_path, default_task="Nope", verbose=False)
    assert not (tmp_path / "Dataset601_N").exists()


def test_a_task_file_gives_a_source_several_tasks(merged, tmp_path, capsys):
    """--tasks: an MSD-style source with an organ task and a tumour task; its cases' own tasks are both, the other
    source keeps its one task; routing a case's labels stays within its own tasks."""
    root, _, _, _ = merged
    spec = tmp_path / "tasks.yaml"
    spec.write_text("Dataset021_LiTSLike:\n  Liver: [liver]\n  LiverTumour: [liver tumour]\n")
    from nnunet_textguided.data.merge import main
    assert main(["-d", "21", "22", "-o", "301", "--name", "TwoTasks", "--raw", str(root), "--tasks", str(spec)]) == 0
    assert "tasks Liver: liver; LiverTumour: liver tumor" in capsys.readouterr().out
    u = load_universal(root / "Dataset301_TwoTasks" / "dataset.json")
    assert u.tasks == [("Liver", ["liver"]), ("LiverTumour", ["liver tumor"]), ("Abdomen", ["spleen", "left kidney"])]
    assert u.sources == ["Dataset021_LiTSLike", "Dataset021_LiTSLike", "Dataset022_Abdomen"]
    assert u.tasks_of("D021_case_000") == [0, 1] and u.tasks_of("D022_case_000") == [2]
    assert u.source_of("D021_case_000") == "Dataset021_LiTSLike"
    assert u.labels_of("D021_case_000") == ["liver", "liver tumor"]
    assert u.annotated_mask("D021_case_000") == [True, False, False, True]
    assert u.annotated_mask("D021_case_000", task=1) == [False, False, False, True]
    # labels: liver, spleen, left kidney, liver tumor; the model's own routing for cases of unknown origin: 2
    assert u.case_label_tasks("D021_case_000", [2, 2, 2, 2]) == [0, 2, 2, 1]
    assert u.case_label_tasks("D022_case_000", [0, 2, 2, 1]) == [0, 2, 2, 1]
    assert u.task_prompts()[1] == "A task of segmenting liver tumor in computerized tomography."


@pytest.mark.parametrize("spec, match", [
    ({"Dataset021_LiTSLike": {"Liver": ["liver"]}}, "are in none of its tasks"),
    ({"21": {"Liver": ["liver", "spleen"]}}, "does not annotate"),
    ({"Dataset099_Nope": {"Liver": ["liver"]}}, "not merged here"),
    ({"LiTSLike": {"Abdomen": ["liver", "liver tumor"]}}, "task names must be unique"),
    ({"LiTSLike": {"Liver": []}}, "non-empty list"),
])
def test_bad_task_files_write_nothing(merged, spec, match):
    root, _, _, _ = merged
    with pytest.raises(ValueError, match=match):
        merge_datasets([21, 22], 302, "Bad", raw_root=root, tasks=spec, verbose=False)
    assert not list(root.glob("Dataset302_*"))
