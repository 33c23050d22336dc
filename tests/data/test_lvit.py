"""LViT-format converter: QaTa-style (grayscale, mask_ prefix) and MoNuSeg-style (RGB .tif, .png masks) sources,
notes from the xlsx, binary masks, resizing, split file where nnU-Net reads it, stock nnU-Net planning, errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from nnunet_textguided.data.lvit import LViTFormatError, convert_lvit, main, sanitise_case_id

BIN = Path(sys.executable).parent
H, W = 40, 48
SPLITS = {"Train_Folder": 6, "Val_Folder": 2, "Test_Folder": 2}
ODD_STEM = "sub-S09 ses.E1_0002"  # sanitised: sub-S09_ses_E1-0002


def _note(split: str, i: int) -> str:
    # messy whitespace on purpose: the note is the Description with whitespace collapsed
    return f"  {split} case {i}: unilateral pulmonary infection,\n one infected area,  lower left lung. "


def _normalised(text: str) -> str:
    return " ".join(text.split())


def make_lvit_source(root: Path, style: str = "qata", seed: int = 0) -> Path:
    """A tiny LViT task folder; QaTa-style: grayscale PNGs + mask_<name>.png; MoNuSeg-style: RGB .tif + .png."""
    rng = np.random.default_rng(seed)
    for folder, n in SPLITS.items():
        split_dir = root / folder
        (split_dir / "img").mkdir(parents=True)
        (split_dir / "labelcol").mkdir()
        rows = []
        for i in range(n):
            mask = np.zeros((H, W), np.uint8)
            y, x = rng.integers(2, 20), rng.integers(2, 26)
            mask[y:y + 12, x:x + 16] = 255
            mask[0, i] = 1  # a faint non-zero value: foreground too (> 0)
            if style == "qata":
                stem = ODD_STEM if (folder, i) == ("Train_Folder", 5) else f"covid_{folder[:2].lower()}{i}"
                image = rng.integers(0, 256, (H, W), dtype=np.uint8)
                if i == 1:  # an RGB file holding a grayscale image: becomes one channel
                    Image.fromarray(np.repeat(image[..., None], 3, 2)).save(split_dir / "img" / f"{stem}.png")
                else:
                    Image.fromarray(image).save(split_dir / "img" / f"{stem}.png")
                mask_name = f"mask_{stem}.png"
                Image.fromarray(mask).save(split_dir / "labelcol" / mask_name)
            else:
                stem = f"TCGA-{folder[:2].upper()}-A{i}-01Z-00-DX1"
                Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(split_dir / "img" / f"{stem}.tif")
                mask_name = f"{stem}.png"
                Image.fromarray(np.repeat(mask[..., None], 3, 2)).save(split_dir / "labelcol" / mask_name)  # RGB mask
            rows.append({"Image": mask_name, "Description": _note(folder, i)})
        pd.DataFrame(rows).to_excel(split_dir / f"{folder.split('_')[0]}_text.xlsx", index=False)
    return root


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _source_mask(src: Path, rel: str) -> np.ndarray:
    a = _read_png(src / rel)
    return (a.max(axis=2) if a.ndim == 3 else a) > 0


def _nothing_under(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def test_sanitise_case_id():
    assert sanitise_case_id("covid_1") == "covid_1"
    assert sanitise_case_id(ODD_STEM) == "sub-S09_ses_E1-0002"
    assert sanitise_case_id("img_0000") == "img-0000"  # never looks like a channel suffix
    assert sanitise_case_id("__ ..") == "case"
    assert sanitise_case_id("TCGA-2Z-A9J9-01A-01-TS1") == "TCGA-2Z-A9J9-01A-01-TS1"


def test_qata_style_fold_split(tmp_path):
    src = make_lvit_source(tmp_path / "QaTa", "qata")
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    folder = convert_lvit(src, 980, "LViTQaTa", raw_root=raw, preprocessed_root=pre, log=lambda *a: None)
    assert folder == raw / "Dataset980_LViTQaTa" and [p.name for p in raw.iterdir()] == [folder.name]
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr",
                                                         "labelsTs", "lvit_source.json", "splits_final.json"]
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "gray"} and dj["labels"] == {"background": 0, "lesion": 1}
    assert dj["numTraining"] == 8 and dj["file_ending"] == ".png"
    assert dj["overwrite_image_reader_writer"] == "NaturalImage2DIO" and dj["name"] == "Dataset980_LViTQaTa"
    assert dj["licence"] == "see the source dataset's licence" and "lvit" in dj["converted_by"]

    meta = json.loads((folder / "lvit_source.json").read_text())
    cases = meta["cases"]
    assert len(cases) == 10 and "sub-S09_ses_E1-0002" in cases
    assert meta["settings"]["counts"] == {"train": 6, "val": 2, "test": 2} and meta["settings"]["size"] is None
    splits = json.loads((folder / "splits_final.json").read_text())
    assert splits == [{"train": sorted(c for c, e in cases.items() if e["split"] == "train"),
                       "val": sorted(c for c, e in cases.items() if e["split"] == "val")}]
    assert len(splits[0]["train"]) == 6 and len(splits[0]["val"]) == 2
    assert not (pre / folder.name).exists()  # nnU-Net's planner copies it from the raw folder (see the e2e test)

    xlsx_notes = {}
    for split_folder in SPLITS:
        df = pd.read_excel(src / split_folder / f"{split_folder.split('_')[0]}_text.xlsx")
        xlsx_notes.update({(split_folder, k): _normalised(v) for k, v in zip(df.Image, df.Description)})
    for case, e in cases.items():
        tag = "Ts" if e["split"] == "test" else "Tr"
        split_folder, _, mask_name = e["mask"].partition("/labelcol/")
        assert e["image"] == f"{split_folder}/img/{mask_name[len('mask_'):]}"
        note = (folder / f"images{tag}" / f"{case}.txt").read_text(encoding="utf-8")
        assert note == xlsx_notes[(split_folder, mask_name)] + "\n" == e["note"] + "\n"
        assert "  " not in note and note.count("\n") == 1
        image = _read_png(folder / f"images{tag}" / f"{case}_0000.png")
        source = _read_png(src / e["image"])
        assert image.dtype == np.uint8 and image.shape == (H, W)  # RGB-looking grayscale -> one channel
        assert np.array_equal(image, source if source.ndim == 2 else source[..., 0])
        mask = _read_png(folder / f"labels{tag}" / f"{case}.png")
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        assert np.array_equal(mask == 1, _source_mask(src, e["mask"]))
    assert len(list((folder / "imagesTs").glob("*_0000.png"))) == 2 == len(list((folder / "labelsTs").iterdir()))

    with pytest.raises(FileExistsError, match="already exists"):
        convert_lvit(src, 980, "LViTQaTa", raw_root=raw, preprocessed_root=pre)


def test_resize_merge_and_stale_split_file(tmp_path):
    src = make_lvit_source(tmp_path / "QaTa", "qata", seed=1)
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    name = "Dataset982_LViTMerge"
    # a split file of an earlier conversion with other cases: refused without --overwrite, nothing written
    (pre / name).mkdir(parents=True)
    stale = [{"train": ["old_a"], "val": ["old_b"]}]
    (pre / name / "splits_final.json").write_text(json.dumps(stale))
    with pytest.raises(FileExistsError, match="splits_final.json"):
        convert_lvit(src, 982, "LViTMerge", raw_root=raw, preprocessed_root=pre)
    assert _nothing_under(raw)
    # fold + --overwrite: replaced by LViT's split
    folder = convert_lvit(src, 982, "LViTMerge", raw_root=raw, preprocessed_root=pre, overwrite=True,
                          log=lambda *a: None)
    assert json.loads((pre / name / "splits_final.json").read_text()) == \
        json.loads((folder / "splits_final.json").read_text())
    # merge + --size 24 + --overwrite: everything in imagesTr, no split file here nor in the preprocessed folder
    folder = convert_lvit(src, 982, "LViTMerge", raw_root=raw, preprocessed_root=pre, overwrite=True,
                          val_split="merge", size=24, label_name="infection", log=lambda *a: None)
    assert not (folder / "splits_final.json").exists() and not (pre / name / "splits_final.json").exists()
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["numTraining"] == 8 and dj["labels"] == {"background": 0, "infection": 1}
    assert len(list((folder / "imagesTr").glob("*_0000.png"))) == 8 == len(list((folder / "imagesTr").glob("*.txt")))
    for f in [*(folder / "imagesTr").glob("*.png"), *(folder / "imagesTs").glob("*.png")]:
        assert _read_png(f).shape == (24, 24)
    for f in [*(folder / "labelsTr").iterdir(), *(folder / "labelsTs").iterdir()]:
        m = _read_png(f)
        assert m.shape == (24, 24) and set(np.unique(m)) == {0, 1}  # nearest: still binary
    assert not [p for p in raw.iterdir() if p.name.startswith(".")]  # no staging leftovers


@pytest.mark.slow  # one stock nnU-Net planning run (~15 s)
def test_monuseg_rgb_via_cli_and_stock_nnunet_plans_it(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    src = make_lvit_source(tmp_path / "MoNuSeg", "monuseg", seed=2)
    roots = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}}
    env.pop("nnUNet_n_proc_DA", None)
    r = subprocess.run([str(BIN / "nnunet-textguided"), "convert-lvit", str(src), "-d", "981", "--name",
                        "LViTMoNuSeg"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    folder = roots["nnUNet_raw"] / "Dataset981_LViTMoNuSeg"
    assert str(folder) in r.stdout and "rgb" in r.stdout
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "R", "1": "G", "2": "B"} and dj["numTraining"] == 8
    cases = json.loads((folder / "lvit_source.json").read_text())["cases"]
    io = NaturalImage2DIO()
    for case, e in cases.items():
        tag = "Ts" if e["split"] == "test" else "Tr"
        assert e["image"].endswith(".tif") and e["mask"] == e["image"].replace("/img/", "/labelcol/")[:-4] + ".png"
        assert sorted(p.name for p in (folder / f"images{tag}").glob(f"{case}*")) == [f"{case}.txt", f"{case}_0000.png"]
        img, _ = io.read_images([str(folder / f"images{tag}" / f"{case}_0000.png")])
        seg, _ = io.read_seg(str(folder / f"labels{tag}" / f"{case}.png"))
        assert img.shape == (3, 1, H, W) and seg.shape == (1, 1, H, W)  # one RGB PNG = three channels
        assert np.array_equal(img[:, 0].transpose(1, 2, 0), _read_png(src / e["image"]))
        assert np.array_equal(seg[0, 0] == 1, _source_mask(src, e["mask"])) and set(np.unique(seg)) == {0, 1}
        assert (folder / f"images{tag}" / f"{case}.txt").read_text() == e["note"] + "\n"

    r = subprocess.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "981", "-c", "2d",
                        "--verify_dataset_integrity", "-np", "1", "-npfp", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pre = roots["nnUNet_preprocessed"] / folder.name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert "2d" in plans["configurations"]
    assert len(list((pre / plans["configurations"]["2d"]["data_identifier"]).glob("*.pkl"))) == 8
    # the split file ends where nnU-Net's trainer reads it (nnUNet_preprocessed/<Dataset>/splits_final.json)
    assert json.loads((pre / "splits_final.json").read_text()) == json.loads((folder / "splits_final.json").read_text())


def _drop_mask(src: Path):
    (src / "Train_Folder" / "labelcol" / "mask_covid_tr2.png").unlink()
    return ["img/covid_tr2.png", "labelcol/mask_covid_tr2.*", "without a mask", "Add the masks"]


def _orphan_mask(src: Path):
    (src / "Test_Folder" / "img" / "covid_te1.png").unlink()
    return ["Test_Folder", "labelcol/mask_covid_te1.png", "without an image", "Add the images"]


def _row_without_image(src: Path):
    xlsx = src / "Val_Folder" / "Val_text.xlsx"
    df = pd.read_excel(xlsx)
    pd.concat([df, pd.DataFrame([{"Image": "mask_ghost.png", "Description": "no such image"}])]).to_excel(
        xlsx, index=False)
    return ["Val_text.xlsx", "row 4", "mask_ghost.png", "Correct the Image name"]


def _image_without_note(src: Path):
    xlsx = src / "Train_Folder" / "Train_text.xlsx"
    df = pd.read_excel(xlsx)
    df[df.Image != "mask_covid_tr3.png"].to_excel(xlsx, index=False)
    return ["covid_tr3.png", "without a note", "Every case needs its note", "add a row to Train_text.xlsx"]


def _ambiguous_xlsx(src: Path):
    shutil.copy(src / "Test_Folder" / "Test_text.xlsx", src / "Test_Folder" / "Other_text.xlsx")
    return ["Test_Folder", "ambiguous", "Other_text.xlsx", "Test_text.xlsx", "Keep one"]


@pytest.mark.parametrize("break_it", [_drop_mask, _orphan_mask, _row_without_image, _image_without_note,
                                      _ambiguous_xlsx])
def test_broken_sources_exit_2_and_write_nothing(tmp_path, capsys, break_it):
    src = make_lvit_source(tmp_path / "QaTa", "qata")
    expected = break_it(src)
    raw = tmp_path / "raw"
    assert main([str(src), "-d", "983", "--name", "Broken", "--raw-root", str(raw)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnunet-textguided convert-lvit: error:") and "1 problem(s)" in err
    for text in expected:
        assert text in err, (text, err)
    assert _nothing_under(raw)
    with pytest.raises(LViTFormatError):
        convert_lvit(src, 983, "Broken", raw_root=raw)


def test_cli_exit_code_and_missing_val_folder(tmp_path):
    src = make_lvit_source(tmp_path / "QaTa", "qata")
    shutil.rmtree(src / "Val_Folder")
    raw = tmp_path / "raw"
    r = subprocess.run([sys.executable, "-m", "nnunet_textguided.data.lvit", str(src), "-d", "984", "--name", "NoVal",
                        "--raw-root", str(raw)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Val_Folder" in r.stderr and "--val-split merge" in r.stderr
    assert _nothing_under(raw)
    assert main([str(src), "-d", "984", "--name", "NoVal", "--raw-root", str(raw), "--val-split", "merge"]) == 0
    assert json.loads((raw / "Dataset984_NoVal" / "dataset.json").read_text())["numTraining"] == 6
