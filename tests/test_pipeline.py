"""End to end through nnU-Net's stock commands (subprocesses, CPU, 3d_tiny preset, tiny encoders)."""
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.evaluation.evaluate_predictions import load_summary_json

from conftest import PHANTOM_ID, PHANTOM_NAME, run_cmd

pytestmark = pytest.mark.slow
RESULTS = Path(os.environ["nnUNet_results"])
# on nnU-Net's UNet (3d_tiny): the paper-mode ablations Net2, Net3 and Net4 (= BiCLIPTrainer); the backbone alone
# (Net1) and Net4 in online mode (beyond the paper), which stock nnUNetv2_predict runs exactly
PAPER = ["BiCLIPTrainer_Net2_2epochs", "BiCLIPTrainer_Net3_2epochs", "BiCLIPTrainer_Net4_2epochs"]
OFFLINE = PAPER[-1]
ONLINE = ["BiCLIPTrainer_Net1_2epochs", "BiCLIPTrainer_online_2epochs"]
# BiCLIP-nnFormer Net1 and Net4 (paper mode, from pretrained nnFormer weights) on the nnFormer configuration
# (3d_nnformer_tiny); the single-stream Net2/Net3 differ from Net4 only in the streams they build
NNFORMER = ["nnFormerTrainer_2epochs", "BiCLIPTrainer_2epochs"]
PRETRAINED = "3d_nnformer_tiny_pretrained"


def model_dir(trainer: str, configuration: str = "3d_tiny") -> Path:
    return RESULTS / PHANTOM_NAME / f"{trainer}__nnUNetPlans__{configuration}"


@pytest.fixture(scope="session")
def trained(phantom_dataset):
    """Train the paper-mode ablations and the online ones with stock nnUNetv2_train (the store filled ahead for
    one trainer, lazily at training start for the others)."""
    run_cmd("nnUNetv2_extract_textguided", "-d", PHANTOM_ID, "-c", "3d_tiny", "-tr", OFFLINE)
    for tr in PAPER + ONLINE:
        run_cmd("nnUNetv2_train", PHANTOM_ID, "3d_tiny", 0, "-tr", tr, "-device", "cpu")
    return phantom_dataset


@pytest.fixture(scope="session")
def trained_nnformer(phantom_dataset):
    """BiCLIP-nnFormer Net1 (nnFormerTrainer) and Net4 in paper mode trained with stock nnUNetv2_train on
    3d_nnformer_tiny, Net1 from scratch, Net4 from Net1's weights saved as an nnFormer checkpoint (the paper starts
    from nnFormer's pretrained weights)."""
    run_cmd("nnunet-textguided", "add-config", "-d", PHANTOM_ID, "3d_nnformer_tiny")
    net1, net4 = NNFORMER
    run_cmd("nnUNetv2_train", PHANTOM_ID, "3d_nnformer_tiny", 0, "-tr", net1, "-device", "cpu")
    weights = model_dir(net1, "3d_nnformer_tiny") / "fold_0" / "checkpoint_final.pth"
    backbone = {k.removeprefix("backbone."): v for k, v in
                torch.load(weights, map_location="cpu", weights_only=True)["network_weights"].items()}
    pretrained = RESULTS / "nnformer_pretrained.model"
    torch.save({"state_dict": backbone}, pretrained)
    run_cmd("nnunet-textguided", "add-config", "-d", PHANTOM_ID, "3d_nnformer_tiny", "--name", PRETRAINED,
            "--set", f"nnformer_weights={pretrained}")
    for configuration in ("3d_nnformer_tiny", PRETRAINED):
        run_cmd("nnUNetv2_train", PHANTOM_ID, configuration, 0, "-tr", net4, "-device", "cpu")
    return phantom_dataset


def assert_valid_segmentations(pred: Path, ref: Path, n: int):
    files = sorted(pred.glob("*.nii.gz"))
    assert len(files) == n
    for f in files:
        seg, gt = sitk.ReadImage(str(f)), sitk.ReadImage(str(ref / f.name))
        assert seg.GetSize() == gt.GetSize() and np.allclose(seg.GetSpacing(), gt.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2, 3}


@pytest.mark.parametrize("trainer", PAPER + ONLINE)
def test_training_outputs(trained, trainer):
    fold = model_dir(trainer) / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    # the final validation writes nnU-Net's summary.json extended with the papers' metrics
    summary = load_summary_json(str(fold / "validation" / "summary.json"))
    assert {"Dice", "IoU", "HD95", "Precision", "Recall", "Accuracy", "IoU_fgbg"} <= set(summary["foreground_mean"])
    assert set(summary["mean"]) == {1, 2, 3} and {"mIoU", "mIoU_fgbg", "Accuracy"} <= set(summary["case_mean"])
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    keys = list(ckpt["network_weights"])
    # frozen encoders are not part of the checkpoint; the checkpoint records their specs and weight hashes
    assert not any(k.startswith(("encoder_", "_conditioner", "conditioner")) for k in keys)
    assert all(k.startswith(("backbone.", "adapters.", "fuse.", "attention.")) for k in keys)
    records = ckpt["init_args"]["plans"]["configurations"]["3d_tiny"]["textguided"]["encoders"]
    assert all(len(r["weight_hash"]) == 64 for r in records.values())
    plans = json.loads((model_dir(trainer) / "plans.json").read_text())
    assert plans["configurations"]["3d_tiny"]["textguided"]["encoders"] == records


@pytest.mark.parametrize("trainer", NNFORMER)
def test_biclip_nnformer_trains_and_predicts_with_stock_commands(trained_nnformer, trainer, tmp_path):
    fold = model_dir(trainer, "3d_nnformer_tiny") / "fold_0"
    summary = load_summary_json(str(fold / "validation" / "summary.json"))
    assert "HD95" in summary["foreground_mean"]
    keys = list(torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=True)["network_weights"])
    assert any(k.startswith("backbone.encoder.") for k in keys)
    # Net1 is nnFormer alone; Net2-4 add adapters and the two fused attention layers
    assert any(k.startswith("attention.1.") for k in keys) == (trainer != "nnFormerTrainer_2epochs")
    command = "nnUNetv2_predict" if trainer == "nnFormerTrainer_2epochs" else "nnUNetv2_predict_textguided"
    run_cmd(command, "-i", trained_nnformer / "imagesTs", "-o", tmp_path, "-d", PHANTOM_ID,
            "-c", "3d_nnformer_tiny", "-f", 0, "-tr", trainer, "-device", "cpu", "-npp", 1, "-nps", 1)
    assert_valid_segmentations(tmp_path, trained_nnformer / "labelsTs", 2)


def test_paper_mode_nnformer_starts_from_pretrained_nnformer_weights(trained_nnformer, tmp_path):
    folder = model_dir(NNFORMER[1], PRETRAINED)
    log = "".join(p.read_text() for p in (folder / "fold_0").glob("training_log_*.txt"))
    assert "nnFormer weights" in log and "missing []" in log and "shape mismatch []" in log
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["configurations"][PRETRAINED]["textguided"]["settings"]["nnformer_weights"] == str(
        RESULTS / "nnformer_pretrained.model")
    run_cmd("nnUNetv2_predict_textguided", "-i", trained_nnformer / "imagesTs", "-o", tmp_path, "-d", PHANTOM_ID,
            "-c", PRETRAINED, "-f", 0, "-tr", NNFORMER[1], "-device", "cpu", "-npp", 1, "-nps", 1)
    assert_valid_segmentations(tmp_path, trained_nnformer / "labelsTs", 2)


def test_nnformer_trainer_needs_an_nnformer_configuration(trained):
    r = run_cmd("nnUNetv2_train", PHANTOM_ID, "3d_tiny", 0, "-tr", "nnFormerTrainer_2epochs", "-device", "cpu",
                check=False)
    assert r.returncode != 0 and "3d_nnformer_synapse" in r.stdout + r.stderr


@pytest.mark.parametrize("trainer", ONLINE[1:])  # Net1 has no conditioning at all
def test_stock_predict_equals_package_predictor(trained, trainer, tmp_path):
    images = trained / "imagesTs"
    for cmd, out in (("nnUNetv2_predict", tmp_path / "stock"), ("nnUNetv2_predict_textguided", tmp_path / "pkg")):
        run_cmd(cmd, "-i", images, "-o", out, "-d", PHANTOM_ID, "-c", "3d_tiny", "-f", 0, "-tr", trainer,
                "-device", "cpu", "-npp", 1, "-nps", 1, "--save_probabilities")
        assert_valid_segmentations(out, trained / "labelsTs", 2)
    for f in sorted((tmp_path / "stock").glob("*.npz")):
        a = np.load(f)["probabilities"]
        b = np.load(tmp_path / "pkg" / f.name)["probabilities"]
        np.testing.assert_allclose(a, b, atol=1e-5)
        seg_a = sitk.GetArrayFromImage(sitk.ReadImage(str(f).replace(".npz", ".nii.gz")))
        seg_b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pkg" / f.name).replace(".npz", ".nii.gz")))
        assert (seg_a == seg_b).all()


@pytest.mark.parametrize("trainer", PAPER)
def test_paper_mode_predicts_with_the_package_predictor_and_stock_predict_names_it(trained, trainer, tmp_path):
    """Stock nnUNetv2_predict on a paper-mode model stops while nnU-Net builds the network, writes nothing (not
    even the output folder), and prints the nnUNetv2_predict_textguided line with the user's flags; that line
    predicts, and with --embedding_store a rerun reads every slice table and calls no encoder."""
    flags = ["-i", str(trained / "imagesTs"), "-o", str(tmp_path / "stock"), "-d", str(PHANTOM_ID), "-c", "3d_tiny",
             "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"]
    r = run_cmd("nnUNetv2_predict", *flags, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    line = shlex.join(["nnUNetv2_predict_textguided", *flags])
    assert r.stderr.strip().endswith("Run instead: " + line), r.stderr[-2000:]
    assert not (tmp_path / "stock").exists()
    store = tmp_path / "embeddings"
    out = tmp_path / "pkg"
    outputs = {}
    for run in ("first", "rerun"):
        r = run_cmd("nnUNetv2_predict_textguided", *flags[:2], "-o", out, *flags[4:], "--embedding_store", store,
                    "--save_probabilities")
        assert_valid_segmentations(out, trained / "labelsTs", 2)
        outputs[run] = {f.name: np.load(f)["probabilities"] for f in sorted(out.glob("*.npz"))}
        streams = 1 if trainer in PAPER[:2] else 2
        if run == "first":
            assert f"slice tables: {2 * streams} computed, 0 read from the embedding store" in r.stdout
        else:
            assert (f"slice tables: 0 computed, {2 * streams} read from the embedding store (0 slices through the "
                    "frozen encoders)") in r.stdout
    for name, probs in outputs["first"].items():
        np.testing.assert_array_equal(probs, outputs["rerun"][name])


def test_predict_refuses_other_encoder_weights(trained, tmp_path):
    """A model folder whose recorded encoder hash differs from the loaded encoder stops with a clear message."""
    import shutil
    src = model_dir("BiCLIPTrainer_online_2epochs")
    dst = RESULTS / PHANTOM_NAME / "BiCLIPTrainer_online_2epochs__tampered__3d_tiny"
    shutil.copytree(src, dst)
    plans = json.loads((dst / "plans.json").read_text())
    for rec in plans["configurations"]["3d_tiny"]["textguided"]["encoders"].values():
        rec["weight_hash"] = "0" * 64
    (dst / "plans.json").write_text(json.dumps(plans))
    r = run_cmd("nnUNetv2_predict", "-i", trained / "imagesTs", "-o", tmp_path / "o", "-d", PHANTOM_ID,
                "-c", "3d_tiny", "-f", 0, "-tr", "BiCLIPTrainer_online_2epochs", "-p", "tampered", "-device", "cpu",
                "-npp", 1, "-nps", 1, check=False)
    assert r.returncode != 0 and "was trained with" in r.stderr


def test_resume_with_other_encoder_fails(trained):
    """The configuration's encoder changed after training (add-config --force): resuming refuses the checkpoint."""
    plans_file = Path(os.environ["nnUNet_preprocessed"]) / PHANTOM_NAME / "nnUNetPlans.json"
    before = plans_file.read_bytes()
    try:
        run_cmd("nnunet-textguided", "add-config", "-d", PHANTOM_ID, "3d_tiny", "--method", "biclip", "--set",
                "caption_encoder=tiny-coca?embed_dim=48", "--force")
        r = run_cmd("nnUNetv2_train", PHANTOM_ID, "3d_tiny", 0, "-tr", "BiCLIPTrainer_Net4_2epochs", "-device", "cpu",
                    "--val", check=False)
    finally:
        plans_file.write_bytes(before)
    assert r.returncode != 0
    assert "was trained with encoders" in r.stdout + r.stderr


def test_a_legacy_setting_variable_stops_training_with_the_set_line(trained):
    r = run_cmd("nnUNetv2_train", PHANTOM_ID, "3d_tiny", 0, "-tr", "BiCLIPTrainer_Net4_2epochs", "-device", "cpu",
                "--val", check=False, env={"nnUNet_textguided_caption_encoder": "tiny-coca?embed_dim=48"})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--set caption_encoder='tiny-coca?embed_dim=48'" in r.stderr


def test_paper_mode_predictor_conditions_like_the_store(trained):
    """Consistency rule: for a training case, the predictor's whole-case tables equal the stored ones."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_textguided.inference.predict import TextGuidedPredictor
    pred = TextGuidedPredictor(device=torch.device("cpu"), use_mirroring=True, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(model_dir(OFFLINE)), (0,), "checkpoint_final.pth")
    folder = Path(os.environ["nnUNet_preprocessed"]) / PHANTOM_NAME / "nnUNetPlans_3d_fullres"
    case = sorted(nnUNetDatasetBlosc2.get_identifiers(str(folder)))[0]
    data = torch.from_numpy(np.asarray(nnUNetDatasetBlosc2(str(folder), [case]).load_case(case)[0][:]))
    logits = pred.predict_logits_from_preprocessed_data(data)
    assert logits.shape == (4, *data.shape[1:])
    tables = pred.network.conditioner.tables[0]
    for stream, table in tables.items():
        store = next((folder / "textguided").glob(f"slices_{stream}__*"))
        torch.testing.assert_close(table, torch.from_numpy(np.load(store / f"{case}.npy")), atol=1e-5, rtol=1e-4)
