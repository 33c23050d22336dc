"""A model folder describes itself and travels: add-config --set names encoders saved under a weights root, stock
nnUNetv2_train trains the configuration, and a copy of the model folder predicts on "another machine" (another
results root, the weights under another weights root, no variable but nnU-Net's roots and the weights root) exactly
like the original. Another file behind the same name is refused with both hashes; info, list, the validation
summary and prediction mark the untrained stand-ins."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN, PHANTOM_ID, PHANTOM_NAME, run_cmd
from nnunet_textguided.encoders import save_tiny_encoder
from nnunet_textguided.settings import WEIGHTS_ROOT_VARIABLE, keys

pytestmark = pytest.mark.slow
TRAINER = "BiCLIPTrainer_Net4_2epochs"
CONFIG = "3d_tiny_local"  # the user's name for "3d_tiny with our own encoder files"
GENERATION = "?generation=greedy&seq_len=8"  # tiny-coca's own captioning settings


def clean_env(results: Path, weights: Path) -> dict:
    """What another machine has: PATH, nnU-Net's roots and the weights root; no other nnUNet_textguided_* name."""
    keep = ("PATH", "HOME", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_extTrainer", "nnUNet_n_proc_DA",
            "nnUNet_def_n_proc", "nnUNet_compile", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k in keep}
    return {**env, "nnUNet_results": str(results), WEIGHTS_ROOT_VARIABLE: str(weights)}


def run_clean(env: dict, *cmd, check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which(cmd[0], path=str(BIN)) or cmd[0]
    r = subprocess.run([exe, *map(str, cmd[1:])], capture_output=True, text=True, timeout=900, env=env)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def predict(env: dict, out: Path, check: bool = True) -> subprocess.CompletedProcess:
    raw = Path(env["nnUNet_raw"]) / PHANTOM_NAME
    # BiCLIP Net4 trains the paper's offline mode: each test case's slices are embedded by the package's predictor
    return run_clean(env, "nnUNetv2_predict_textguided", "-i", raw / "imagesTs", "-o", out, "-d", PHANTOM_ID, "-c", CONFIG,
                     "-f", 0, "-tr", TRAINER, "-device", "cpu", "-npp", 1, "-nps", 1, "--save_probabilities",
                     check=check)


@pytest.fixture(scope="module")
def travelled(phantom_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("portable")
    root_a, root_b = base / "weights_here", base / "weights_there"
    pmc = save_tiny_encoder("tiny-pmcclip", root_a / "pmc-clip")
    coca = save_tiny_encoder("tiny-coca", root_a / "coca")
    here = {WEIGHTS_ROOT_VARIABLE: str(root_a)}
    run_cmd("nnunet-textguided", "add-config", "-d", PHANTOM_ID, "3d_tiny", "--name", CONFIG, "--method", "biclip",
            "--set", f"image_encoder={pmc}", f"caption_encoder={coca}{GENERATION}", env=here)
    run_cmd("nnUNetv2_train", PHANTOM_ID, CONFIG, 0, "-tr", TRAINER, "-device", "cpu", env=here)
    model = Path(os.environ["nnUNet_results"]) / PHANTOM_NAME / f"{TRAINER}__nnUNetPlans__{CONFIG}"
    original = predict(clean_env(Path(os.environ["nnUNet_results"]), root_a), base / "pred_here")
    # another machine: the model folder under another results root, the weights under another root
    results_b = base / "results_there"
    shutil.copytree(model, results_b / PHANTOM_NAME / model.name)
    shutil.copytree(root_a, root_b)
    shutil.move(root_a, base / "weights_gone")  # nothing may still read the first root
    return {"base": base, "model": model, "copy": results_b / PHANTOM_NAME / model.name, "env_b":
            clean_env(results_b, root_b), "root_b": root_b, "original": original}


def test_the_model_folder_stores_portable_encoder_names(travelled):
    plans = json.loads((travelled["copy"] / "plans.json").read_text())
    block = plans["configurations"][CONFIG]["textguided"]
    assert block["settings"]["image_encoder"] == "pmcclip:pmc-clip"
    assert block["settings"]["caption_encoder"] == f"coca:local-dir:coca{GENERATION}"
    for spec, rec in block["encoders"].items():
        assert len(rec["weight_hash"]) == 64 and rec["embed_dim"] == 32 and rec["untrained"] is True
    assert str(travelled["base"]) not in (travelled["copy"] / "plans.json").read_text()  # no absolute weight path


def test_the_copy_predicts_identically_with_the_weights_under_another_root(travelled):
    out = travelled["base"] / "pred_there"
    r = predict(travelled["env_b"], out)
    assert "untrained (random-init) stand-in encoders" in r.stderr  # predict says so
    here = sorted((travelled["base"] / "pred_here").glob("*.npz"))
    assert here and [p.name for p in here] == sorted(p.name for p in out.glob("*.npz"))
    for p in here:
        np.testing.assert_array_equal(np.load(p)["probabilities"], np.load(out / p.name)["probabilities"])


def test_another_file_behind_the_same_name_is_refused_with_both_hashes(travelled):
    plans = json.loads((travelled["copy"] / "plans.json").read_text())
    spec = f"coca:local-dir:coca{GENERATION}"
    expected = plans["configurations"][CONFIG]["textguided"]["encoders"][spec]["weight_hash"]
    coca = travelled["root_b"] / "coca"
    kept = travelled["base"] / "coca_kept"
    shutil.copytree(coca, kept)
    try:
        save_tiny_encoder("tiny-coca?seed=1", coca)  # a fine-tuned model saved over the old one
        out = travelled["base"] / "pred_other_weights"
        r = predict(travelled["env_b"], out, check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"encoder '{spec}' (read from {coca}) has weights sha256 " in r.stderr
        assert f"but the model was trained with {expected}" in r.stderr
        assert not list(out.glob("*.nii.gz"))
    finally:
        shutil.rmtree(coca)
        shutil.move(kept, coca)


def test_info_list_and_the_summary_describe_the_copied_folder(travelled):
    env = travelled["env_b"]
    out = run_clean(env, "nnunet-textguided", "info", travelled["copy"]).stdout
    plans = json.loads((travelled["copy"] / "plans.json").read_text())
    block = plans["configurations"][CONFIG]["textguided"]
    assert f"{TRAINER} (biclip)" in out and f"configuration {CONFIG}" in out and ": trained" in out
    assert all(f" {k} " in out for k in keys("biclip"))  # every setting is visible
    for spec, rec in block["encoders"].items():
        assert spec in out and rec["weight_hash"] in out
    assert "UNTRAINED ENCODERS:" in out and f"here: read from {travelled['root_b'] / 'coca'}" in out
    assert "parameters: trainable" in out and "training cases: 5" in out
    assert (f"predict: nnUNetv2_predict_textguided -i INPUT_FOLDER -o OUTPUT_FOLDER -d {PHANTOM_NAME} -c {CONFIG} -tr {TRAINER} "
            "-p nnUNetPlans -f 0") in out
    listed = run_clean(env, "nnunet-textguided", "list").stdout
    assert f"{PHANTOM_NAME}/{travelled['copy'].name}  [biclip]  UNTRAINED ENCODERS:" in listed
    summary = json.loads((travelled["copy"] / "fold_0" / "validation" / "summary.json").read_text())
    assert sorted(summary["textguided_model"]["untrained_encoders"]) == sorted(block["encoders"])
    data = json.loads(run_clean(env, "nnunet-textguided", "info", travelled["copy"], "--json").stdout)
    assert data["untrained_encoders"] == sorted(block["encoders"])
    assert "checkpoint_final.pth" in data["folds"]["fold_0"]
