"""The package's own command, trainer discovery through nnUNet_extTrainer, spawn-safety, and the wheel."""
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cmd
from nnunet_textguided.cli import _DELEGATED
from nnunet_textguided.cli import main as cli_main
from spawn_worker import load_in_child

ROOT = Path(__file__).resolve().parents[1]


def test_env_prints_the_trainer_folder():
    out = run_cmd("nnunet-textguided", "env").stdout.strip()
    assert out.startswith("export nnUNet_extTrainer=")
    folder = out.split("=", 1)[1].split(os.pathsep)[0]
    assert (Path(folder) / "textguided_trainers.py").is_file()


def test_list_shows_trainers_by_method_encoders_presets():
    out = run_cmd("nnunet-textguided", "list").stdout
    for name in ("BiCLIPTrainer_Net1", "BiCLIPTrainer_online", "tiny-coca", "pmcclip", "minilm", "3d_tiny",
                 "2d_tiny"):
        assert name in out
    lines = out.splitlines()
    # grouped: each method's heading, its paper trainer first
    for title, paper in (("BiCLIP", "BiCLIPTrainer"), ("CDPDNet", "CDPDNetTrainer"), ("RecLMIS", "RecLMISTrainer"),
                         ("TGC-Net", "TGCNetTrainer"), ("MPTPN", "MPTPNTrainer")):
        assert lines[lines.index(f"  {title}") + 1].split()[0] == paper
    # short schedules only with --all
    assert "_2epochs" not in out.replace("e.g. ", "").split("short schedules")[0] and "list --all" in out
    everything = run_cmd("nnunet-textguided", "list", "--all").stdout
    assert "BiCLIPTrainer_Net4_2epochs" in everything and "RecLMISTrainer_40epochs" in everything


def test_add_config_without_plans_fails_clearly():
    r = run_cmd("nnunet-textguided", "add-config", "-d", "Dataset777_Nope", "3d_tiny", check=False)
    assert r.returncode == 2 and "nnUNetv2_plan_and_preprocess" in r.stderr


def test_extract_without_plans_fails_clearly():
    r = run_cmd("nnUNetv2_extract_textguided", "-d", "Dataset777_Nope", "-c", "3d_tiny", check=False)
    assert r.returncode == 2 and "nnUNetv2_plan_and_preprocess" in r.stderr


def test_nnunet_finds_every_trainer_and_they_pickle():
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunet_textguided.training.biclip import ALL_TRAINERS
    for cls in ALL_TRAINERS:
        found = recursive_find_trainer_class_by_name(cls.__name__)
        assert found is cls and found.__module__.startswith("nnunet_textguided.")
        assert pickle.loads(pickle.dumps(found)) is cls


def test_paper_mode_data_path_survives_spawn(phantom_dataset):
    """Data-loader workers may be spawned: the dataset wrapper and transform wrapper must pickle."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from conftest import PHANTOM_NAME
    from nnunet_textguided.data.position_channels import PositionAwareTransforms, PositionedDataset
    folder = Path(os.environ["nnUNet_preprocessed"]) / PHANTOM_NAME / "nnUNetPlans_3d_fullres"
    keys = sorted(nnUNetDatasetBlosc2.get_identifiers(str(folder)))
    ds = PositionedDataset(nnUNetDatasetBlosc2(str(folder), keys), {k: i for i, k in enumerate(keys)})
    tr = PositionAwareTransforms(nnUNetTrainer.get_validation_transforms(None))
    with mp.get_context("spawn").Pool(1) as pool:
        shape = pool.apply(load_in_child, (ds, tr, keys[0]))
    assert shape[0] == 3 and shape == (3, *np.asarray(ds.load_case(keys[0])[0][:]).shape[1:])


def test_wheel_carries_trainers_presets_and_commands(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("nnunet_textguided-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "nnunet_textguided_trainers/textguided_trainers.py" in names
    assert "nnunet_textguided_plans/3d_tiny.json" in names
    assert "nnunet_textguided_plans/3d_biclip_paper.json" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for cmd in ("nnunet-textguided", "nnUNetv2_extract_textguided", "nnUNetv2_predict_textguided",
                "nnUNetv2_evaluate_folder_textguided"):
        assert cmd in entry


@pytest.mark.parametrize("command", sorted(_DELEGATED))
def test_every_subcommand_is_wired_and_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main([command, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out
