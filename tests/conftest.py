"""Test session set-up: nnU-Net's folders point into one temporary directory per session.

nnunetv2.paths reads the nnUNet_* variables at import, so they are set here, before any test imports it.
Child processes (the stock nnU-Net commands) inherit them.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SESSION_ROOT = Path(tempfile.mkdtemp(prefix="textguided-tests-"))
for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ[name] = str(SESSION_ROOT / name)
    (SESSION_ROOT / name).mkdir()
os.environ.update(nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", nnUNet_compile="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
import nnunet_textguided_trainers  # noqa: E402

os.environ["nnUNet_extTrainer"] = os.path.abspath(list(nnunet_textguided_trainers.__path__)[0])

PHANTOM_ID = 991
PHANTOM_NAME = f"Dataset{PHANTOM_ID}_TestPhantom"
REFERRING_ID = 993
#: two partially labelled phantom datasets (liver + spleen, right + left kidney) and their merge
PARTIAL_IDS = (994, 995)
UNIVERSAL_ID = 996
UNIVERSAL_NAME = f"Dataset{UNIVERSAL_ID}_TestUniversal"
#: the same two partial-label phantom sources at 10 : 1 training cases, and their merge
UNBALANCED_IDS, UNBALANCED_ID = (987, 988), 989
BIN = Path(sys.executable).parent


def run_cmd(*cmd, check=True, timeout=900, env=None) -> subprocess.CompletedProcess:
    exe = shutil.which(cmd[0], path=str(BIN)) or cmd[0]
    r = subprocess.run([exe, *map(str, cmd[1:])], capture_output=True, text=True, timeout=timeout,
                       env=None if env is None else {**os.environ, **env})
    if check and r.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


@pytest.fixture(scope="session")
def phantom_dataset() -> Path:
    """A small CT phantom dataset, planned and preprocessed by stock nnU-Net, with the 3d_tiny preset."""
    from nnunet_textguided.data.synthetic import make_ct_phantom_dataset
    folder = make_ct_phantom_dataset(Path(os.environ["nnUNet_raw"]), dataset_id=PHANTOM_ID, name="TestPhantom",
                                     n_train=5, n_test=2, shape=(24, 48, 48), seed=1)
    run_cmd("nnUNetv2_plan_and_preprocess", "-d", PHANTOM_ID, "-c", "3d_fullres", "-np", "2",
            "--verify_dataset_integrity")
    run_cmd("nnunet-textguided", "add-config", "-d", PHANTOM_ID, "3d_tiny")
    return folder


@pytest.fixture(scope="session")
def referring_dataset() -> Path:
    """The synthetic 2D referring dataset, planned and preprocessed (2d) by stock nnU-Net, with 2d_tiny."""
    from nnunet_textguided.data.referring import make_referring_dataset
    folder = make_referring_dataset(Path(os.environ["nnUNet_raw"]), dataset_id=REFERRING_ID, n_train=16, n_test=8,
                                    seed=3)
    run_cmd("nnUNetv2_plan_and_preprocess", "-d", REFERRING_ID, "-c", "2d", "-np", "2", "--verify_dataset_integrity")
    run_cmd("nnunet-textguided", "add-config", "-d", REFERRING_ID, "2d_tiny")
    return folder


@pytest.fixture(scope="session")
def universal_dataset() -> Path:
    """Two partially labelled phantom datasets merged into one universal dataset, planned and preprocessed by
    stock nnU-Net, with 3d_tiny."""
    from nnunet_textguided.data.synthetic import make_partial_phantom_datasets
    raw = Path(os.environ["nnUNet_raw"])
    make_partial_phantom_datasets(raw, datasets={PARTIAL_IDS[0]: ("PhantomLiverSpleen", ["liver", "spleen"]),
                                                 PARTIAL_IDS[1]: ("PhantomKidneys", ["right kidney", "left kidney"])},
                                  n_train=5, n_test=2, shape=(16, 32, 32), seed=2)
    run_cmd("nnunet-textguided", "merge", "-d", *PARTIAL_IDS, "-o", UNIVERSAL_ID, "--name", "TestUniversal")
    run_cmd("nnUNetv2_plan_and_preprocess", "-d", UNIVERSAL_ID, "-c", "3d_fullres", "-np", "2",
            "--verify_dataset_integrity")
    run_cmd("nnunet-textguided", "add-config", "-d", UNIVERSAL_ID, "3d_tiny")
    return raw / UNIVERSAL_NAME


@pytest.fixture(scope="session")
def unbalanced_universal_dataset() -> Path:
    """A universal dataset merged from a 10-case liver + spleen source and a 1-case kidneys source, planned and
    preprocessed by stock nnU-Net, with 3d_tiny."""
    import json

    from nnunet_textguided.data.synthetic import make_partial_phantom_datasets
    raw = Path(os.environ["nnUNet_raw"])
    small, = make_partial_phantom_datasets(raw, datasets={UNBALANCED_IDS[1]: ("PhantomKidneysFew", ["right kidney",
                                                                                                   "left kidney"])},
                                           n_train=1, n_test=1, shape=(16, 32, 32), seed=4)
    make_partial_phantom_datasets(raw, datasets={UNBALANCED_IDS[0]: ("PhantomLiverSpleenMany", ["liver", "spleen"])},
                                  n_train=10, n_test=1, shape=(16, 32, 32), seed=3)
    assert json.loads((small / "dataset.json").read_text())["numTraining"] == 1
    run_cmd("nnunet-textguided", "merge", "-d", *UNBALANCED_IDS, "-o", UNBALANCED_ID, "--name", "TestUnbalanced")
    run_cmd("nnUNetv2_plan_and_preprocess", "-d", UNBALANCED_ID, "-c", "3d_fullres", "-np", "2")
    run_cmd("nnunet-textguided", "add-config", "-d", UNBALANCED_ID, "3d_tiny")
    return raw / f"Dataset{UNBALANCED_ID}_TestUnbalanced"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_ROOT, ignore_errors=True)
