"""Several tasks per source dataset, end to end with the stock commands (CPU, 3d_tiny): the liver + spleen
phantom source merged as two tasks (Liver, Spleen) beside the kidneys source (one task) -> plan and preprocess ->
nnUNetv2_train CDPDNetTrainer_2epochs on fold 'all' -> nnU-Net's validation predicts each case under its own
tasks (validation/task_routing.json) and summary.json reports Dice per source dataset and per task."""
import json
import os
from pathlib import Path

import pytest

from conftest import PARTIAL_IDS, run_cmd

pytestmark = pytest.mark.slow
TWO_TASK_ID = 986
TRAINER = "CDPDNetTrainer_2epochs"
LIVER_SPLEEN, KIDNEYS = (f"Dataset{i}_{n}" for i, n in zip(PARTIAL_IDS, ("PhantomLiverSpleen", "PhantomKidneys")))


@pytest.fixture(scope="module")
def trained_two_task(universal_dataset, tmp_path_factory):
    tasks = tmp_path_factory.mktemp("tasks") / "tasks.json"
    tasks.write_text(json.dumps({LIVER_SPLEEN: {"Liver": ["liver"], "Spleen": ["spleen"]}}))
    run_cmd("nnunet-textguided", "merge", "-d", *PARTIAL_IDS, "-o", TWO_TASK_ID, "--name", "TestTwoTasks",
            "--tasks", tasks)
    run_cmd("nnUNetv2_plan_and_preprocess", "-d", TWO_TASK_ID, "-c", "3d_fullres", "-np", "2")
    run_cmd("nnunet-textguided", "add-config", "-d", TWO_TASK_ID, "3d_tiny")
    run_cmd("nnUNetv2_train", TWO_TASK_ID, "3d_tiny", "all", "-tr", TRAINER, "-device", "cpu",
            env={"nnUNet_n_proc_DA": "0"})
    return (Path(os.environ["nnUNet_results"]) / f"Dataset{TWO_TASK_ID}_TestTwoTasks"
            / f"{TRAINER}__nnUNetPlans__3d_tiny" / "fold_all")


def test_validation_cases_are_predicted_under_their_own_tasks(trained_two_task):
    routing = json.loads((trained_two_task / "validation" / "task_routing.json").read_text())["cases"]
    assert len(routing) == 10
    for case, labels in routing.items():
        if case.startswith(f"D{PARTIAL_IDS[0]}_"):
            assert labels == {"liver": "Liver", "spleen": "Spleen"}, case
        else:
            assert labels == {"right kidney": "PhantomKidneys", "left kidney": "PhantomKidneys"}, case


def test_validation_summary_reports_dice_per_source_and_per_task(trained_two_task):
    summary = json.loads((trained_two_task / "validation" / "summary.json").read_text())
    tables = summary["textguided_universal_dice"]
    assert set(tables["per_source"]) == {LIVER_SPLEEN, KIDNEYS}
    assert set(tables["per_source"][LIVER_SPLEEN]) == {"liver", "spleen"}
    assert set(tables["per_task"]) == {"Liver", "Spleen", "PhantomKidneys"}
    assert set(tables["per_task"]["Spleen"]) == {"spleen"}
    assert all(0 <= d <= 1 for per in tables["per_task"].values() for d in per.values())
    log = next(trained_two_task.glob("training_log_*.txt")).read_text()
    assert "Validation Dice, task Spleen: spleen" in log and "dataset-balanced sampling" in log
