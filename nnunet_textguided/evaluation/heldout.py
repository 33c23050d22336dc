"""Partial labels against full labels: does universal training on partially labelled datasets reach the model
trained on the fully labelled data, at the same budget, on the same held-out cases?

One fully labelled CT phantom dataset (liver, spleen, right and left kidney) is split into two partially labelled
halves of its training cases — the right-side structures (liver, right kidney) annotated in the first half, the
left-side ones (spleen, left kidney) in the second, every other organ background — merged into one universal
dataset, and trained with a CDPDNet trainer; the same trainer, settings and model seed train on the fully labelled
cases (merged alone, so both models are universal models of one architecture). Both predict the same held-out
cases through the stock ``nnUNetv2_predict``; each organ's Dice is pooled over the held-out cases (twice the
summed overlap over the summed sizes), because a phantom's spleen may be absent (post-splenectomy) and with a
handful of cases nnU-Net's per-case mean turns one stray voxel in such a case into a Dice of 0.

Every step is a stock command in a subprocess (``nnunet-textguided merge`` / ``add-config``,
``nnUNetv2_plan_and_preprocess`` / ``_train`` / ``_predict``) with nnU-Net's folders inside ``workdir``.
``scripts/heldout_universal`` prints the table; the slow test ``tests/test_universal_heldout.py`` asserts the
issue-21 criterion (halves >= 0.8 x full).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import atomic_write_json, staged_dataset_folder

FULL_ID, RIGHT_ID, LEFT_ID, FULL_MERGED_ID, HALVES_MERGED_ID = 980, 981, 982, 983, 984
ORGANS = ("liver", "spleen", "right kidney", "left kidney")
SIDES = {"right": ("liver", "right kidney"), "left": ("spleen", "left kidney")}
ARMS = {"FullLabels": FULL_MERGED_ID, "Halves": HALVES_MERGED_ID}


def _run(*cmd, env: dict, log: Path | None = None) -> None:
    exe = shutil.which(str(cmd[0]), path=str(Path(sys.executable).parent)) or str(cmd[0])
    r = subprocess.run([exe, *map(str, cmd[1:])], capture_output=True, text=True, env=env)
    if log is not None:
        log.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def write_partial_copy(raw: Path, full: Path, dataset_id: int, name: str, organs: Sequence[str],
                       cases: Sequence[str]) -> Path:
    """A raw dataset holding ``cases`` of the fully labelled ``full`` (images and notes copied) whose label maps keep
    only ``organs`` (codes 1.. in that order; every other organ becomes background)."""
    import SimpleITK as sitk
    dj = json.loads((full / "dataset.json").read_text())
    codes = {o: i + 1 for i, o in enumerate(organs)}
    ending = dj["file_ending"]
    with staged_dataset_folder(raw, dataset_id, f"Dataset{dataset_id}_{name}", overwrite=False) as out:
        for sub in ("imagesTr", "labelsTr"):
            (out / sub).mkdir()
        for case in cases:
            for f in (full / "imagesTr").glob(f"{case}[_.]*"):
                shutil.copy(f, out / "imagesTr" / f.name)
            label = sitk.ReadImage(str(full / "labelsTr" / f"{case}{ending}"))
            arr = sitk.GetArrayFromImage(label)
            part = np.zeros_like(arr)
            for o in organs:
                part[arr == dj["labels"][o]] = codes[o]
            img = sitk.GetImageFromArray(part)
            img.CopyInformation(label)
            sitk.WriteImage(img, str(out / "labelsTr" / f"{case}{ending}"), True)
        atomic_write_json(out / "dataset.json", {
            **dj, "name": name, "labels": {"background": 0, **codes}, "numTraining": len(cases),
            "label_descriptions": {str(c): o for o, c in codes.items()},
            "description": f"{', '.join(organs)} of {len(cases)} cases of {full.name} (the other organs unlabelled)"},
            sort_keys=False)
    return raw / f"Dataset{dataset_id}_{name}"


def pooled_dice(prediction: Path, dataset_json: Path, truth: Path, truth_labels: dict) -> dict[str, float]:
    """Per organ: 2 |P ∩ R| / (|P| + |R|) summed over the cases of ``truth`` (nan where the organ is in neither)."""
    import SimpleITK as sitk
    labels = json.loads(dataset_json.read_text())["labels"]
    overlap, size = dict.fromkeys(ORGANS, 0), dict.fromkeys(ORGANS, 0)
    for f in sorted(truth.glob("*.nii.gz")):
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction / f.name)))
        for o in ORGANS:
            region = labels[o] if isinstance(labels[o], list) else [labels[o]]
            p, r = np.isin(seg, region), ref == truth_labels[o]
            overlap[o] += int((p & r).sum())
            size[o] += int(p.sum() + r.sum())
    return {o: 2 * overlap[o] / size[o] if size[o] else float("nan") for o in ORGANS}


def prepare(workdir: Path, n_train: int = 16, n_test: int = 6, shape: Sequence[int] = (24, 48, 48),
            data_seed: int = 7) -> dict:
    """Write the full phantom, its two halves and the two merged datasets, planned and preprocessed (once per
    ``workdir``). Returns the environment the stock commands run with."""
    env = {**os.environ, "nnUNet_compile": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(workdir / name)
        (workdir / name).mkdir(parents=True, exist_ok=True)
    raw = workdir / "nnUNet_raw"
    full = raw / f"Dataset{FULL_ID}_PhantomFull"
    if (workdir / "nnUNet_preprocessed" / f"Dataset{HALVES_MERGED_ID}_Halves").is_dir():
        return env
    from ..data.synthetic import make_partial_phantom_datasets
    if not full.is_dir():
        make_partial_phantom_datasets(raw, datasets={FULL_ID: ("PhantomFull", list(ORGANS))}, n_train=n_train,
                                      n_test=n_test, shape=tuple(shape), seed=data_seed)
    cases = sorted(f.name[:-len(".nii.gz")] for f in (full / "labelsTr").glob("*.nii.gz"))
    half = len(cases) // 2
    for dataset_id, name, side, part in ((RIGHT_ID, "RightHalf", "right", cases[:half]),
                                         (LEFT_ID, "LeftHalf", "left", cases[half:])):
        if not (raw / f"Dataset{dataset_id}_{name}").is_dir():
            write_partial_copy(raw, full, dataset_id, name, SIDES[side], part)
    for sources, target, name in (((FULL_ID,), FULL_MERGED_ID, "FullLabels"),
                                  ((RIGHT_ID, LEFT_ID), HALVES_MERGED_ID, "Halves")):
        if not (raw / f"Dataset{target}_{name}").is_dir():
            _run("nnunet-textguided", "merge", "-d", *sources, "-o", target, "--name", name, env=env)
        _run("nnUNetv2_plan_and_preprocess", "-d", target, "-c", "3d_fullres", "-np", "2", env=env)
    return env


def partial_label_check(workdir: str | Path, trainer: str = "CDPDNetTrainer_40epochs", seed: int = 0,
                        settings: dict | None = None, preset: str = "3d_tiny", n_train: int = 16, n_test: int = 6,
                        shape: Sequence[int] = (24, 48, 48), data_seed: int = 7) -> dict:
    """Train ``trainer`` on the halves and on the full labels (same ``preset``, ``settings`` and model ``seed``),
    predict the held-out cases with each and return ``{"FullLabels": {organ: Dice}, "Halves": {...}, "minutes":
    {arm: training minutes}, "ratio": mean(Halves) / mean(FullLabels)}``."""
    workdir = Path(workdir).resolve()
    env = prepare(workdir, n_train, n_test, shape, data_seed)
    env["nnUNet_n_proc_DA"] = "0"  # exact seeding (settings key `seed`) needs augmentation in the main process
    raw = workdir / "nnUNet_raw"
    full = raw / f"Dataset{FULL_ID}_PhantomFull"
    truth_labels = json.loads((full / "labelsTs_full.json").read_text())["labels"]
    values = {**(settings or {}), "seed": seed}
    configuration = f"{preset}_seed{seed}" + "".join(f"_{k}{v}" for k, v in sorted((settings or {}).items()))
    sets = [a for k, v in sorted(values.items()) for a in ("--set", f"{k}={v}")]
    result: dict = {"minutes": {}}
    for arm, dataset_id in ARMS.items():
        _run("nnunet-textguided", "add-config", "-d", dataset_id, preset, "--name", configuration, "--method",
             "cdpdnet", *sets, "--force", env=env)
        t0 = time.time()
        _run("nnUNetv2_train", dataset_id, configuration, "all", "-tr", trainer, "-device", "cpu", env=env,
             log=workdir / f"{arm}_{configuration}.train.log")
        result["minutes"][arm] = (time.time() - t0) / 60
        prediction = workdir / "predictions" / f"{arm}_{configuration}"
        _run("nnUNetv2_predict", "-i", full / "imagesTs", "-o", prediction, "-d", dataset_id, "-c", configuration,
             "-f", "all", "-tr", trainer, "-device", "cpu", "-npp", 1, "-nps", 1, "--disable_tta", env=env)
        result[arm] = pooled_dice(prediction, raw / f"Dataset{dataset_id}_{arm}" / "dataset.json",
                                  full / "labelsTs_full", truth_labels)
    result["ratio"] = float(np.nanmean(list(result["Halves"].values()))
                            / np.nanmean(list(result["FullLabels"].values())))
    return result


def format_rows(seed: int, result: dict) -> list[str]:
    rows = [f"| {seed} | {arm} | " + " | ".join(f"{result[arm][o]:.3f}" for o in ORGANS)
            + f" | {np.nanmean(list(result[arm].values())):.3f} | {result['minutes'][arm]:.1f} |" for arm in ARMS]
    return rows + [f"| {seed} | halves / full | | | | | {result['ratio']:.2f}x | |"]


TABLE_HEADER = ("| seed | labels | " + " | ".join(ORGANS) + " | mean | train min |\n|---|---|" + "---:|" * 6)
