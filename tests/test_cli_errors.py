"""Every command's --help, and its answer to a wrong input: exit code 2, one line on stderr naming the command,
what is wrong and what to do, never a traceback. (Runs with the session's nnU-Net folders; dataset 777 is in none
of them.)"""
import os
import re

import pytest

from conftest import run_cmd
from nnunet_textguided.cli import _DELEGATED

ENTRY_POINTS = ["nnUNetv2_extract_textguided", "nnUNetv2_predict_textguided", "nnUNetv2_evaluate_folder_textguided"]
SUBCOMMANDS = ["list", "env", "add-config", "settings", *_DELEGATED]


@pytest.mark.parametrize("command", [["nnunet-textguided", c] for c in SUBCOMMANDS] + [[e] for e in ENTRY_POINTS],
                         ids=" ".join)
def test_help(command):
    r = run_cmd(*command, "--help", check=False, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage" in r.stdout.lower() and "Traceback" not in r.stderr
    # nnU-Net's -device, with --device as its long form, wherever a device is chosen
    if re.search(r"(?<!-)-device\b|--device\b", r.stdout) and command[0] != "nnUNetv2_predict_textguided":
        assert re.search(r"(?<!-)-device\b", r.stdout) and re.search(r"--device\b", r.stdout), r.stdout


#: (command, the expected words of its one-line error)
BAD_INPUTS = [
    (["nnunet-textguided", "add-config", "-d", "777", "3d_tiny"], "dataset 777 not found"),
    (["nnunet-textguided", "add-config", "-d", "{phantom}", "no_such_preset"], "unknown preset"),
    (["nnUNetv2_extract_textguided", "-d", "777", "-c", "3d_tiny"], "dataset 777 not found"),
    (["nnUNetv2_extract_textguided", "-d", "{phantom}", "-c", "no_such_configuration"], "configurations: "),
    (["nnUNetv2_extract_textguided", "-d", "{phantom}", "-c", "3d_tiny", "-tr", "NoSuchTrainer"],
     "nnunet-textguided list"),
    (["nnUNetv2_predict_textguided", "-i", "{tmp}", "-o", "{tmp}/out", "-d", "777", "-c", "3d_tiny", "-f", "0",
      "-tr", "BiCLIPTrainer"], "dataset 777 not found"),
    (["nnUNetv2_predict_textguided", "-i", "{tmp}/missing", "-o", "{tmp}/out", "-d", "{phantom}", "-c", "3d_tiny",
      "-f", "0", "-tr", "BiCLIPTrainer"], "input folder"),
    (["nnunet-textguided", "params", "NoSuchTrainer"], "unknown trainer"),
    (["nnunet-textguided", "params", "BiCLIPTrainer", "--config", "plans", "-d", "777", "-c", "3d_tiny"],
     "dataset 777 not found"),
    (["nnunet-textguided", "info", "{tmp}/missing"], "not a model folder"),
    (["nnunet-textguided", "info", "-d", "777", "-c", "3d_tiny", "-tr", "BiCLIPTrainer"], "dataset 777 not found"),
    (["nnunet-textguided", "text-dependence", "-d", "777", "-c", "2d_tiny", "-tr", "RecLMISTrainer", "-o",
      "{tmp}/td"], "dataset 777 not found"),
    (["nnunet-textguided", "evaluate-universal", "-d", "777", "-c", "3d_tiny", "-tr", "CDPDNetTrainer", "-o",
      "{tmp}/eu"], "dataset 777 not found"),
    (["nnunet-textguided", "merge", "-d", "777", "778", "-o", "779", "--name", "X"], "no dataset with id 777"),
    (["nnunet-textguided", "ablation", "reclmis", "-d", "777", "-c", "2d_tiny", "-o", "{tmp}/ab"],
     "dataset 777 not found"),
    (["nnunet-textguided", "settings", "no_such_method"], "unknown method"),
    (["nnUNetv2_evaluate_folder_textguided", "{tmp}", "{tmp}", "-djfile", "{tmp}/dataset.json", "-pfile",
      "{tmp}/plans.json"], "dataset.json not found"),
]


@pytest.mark.parametrize("command, words", BAD_INPUTS, ids=[" ".join(c[:3]) for c, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_code_2(command, words, phantom_dataset, tmp_path):
    import conftest
    command = [c.format(phantom=conftest.PHANTOM_ID, tmp=tmp_path) for c in command]
    r = run_cmd(*command, check=False, timeout=300)
    prog = "nnUNetv2_extract_textguided" if command[:2] == ["nnunet-textguided", "extract"] else \
        " ".join(command[:2]) if command[0] == "nnunet-textguided" else command[0]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and words in lines[0], r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out")  # nothing written
