"""`nnunet-textguided ablation`: every row of the paper's ablation tables is listed with its trainer and settings,
every row's settings pass the schema, and the rows that need their own code path (each distinct trainer, the
self-attention and condition variants) train and predict one epoch through the stock commands."""
import json

import pytest

from conftest import REFERRING_ID, run_cmd
from nnunet_textguided import settings
from nnunet_textguided.evaluation.ablations import ROWS, rows_of, select_rows

#: Tables III (a-e), IV (5 rows), V (4 rows) of seed 004 and the figures' sweeps (Fig. 7, 8, 11, 12)
RECLMIS_TABLE_ROWS = {"III-a", "III-b", "III-c", "III-d", "III-e", "IV-none", "IV-noccl", "IV-noclr", "IV-nocvr",
                      "IV-all", "V-SA-CA", "V-SA-SA", "V-CA-SA", "V-CA-CA"}


def test_reclmis_rows_cover_every_table_row_and_sweep():
    names = [r.name for r in rows_of("reclmis")]
    assert len(names) == len(set(names))
    assert RECLMIS_TABLE_ROWS <= set(names)
    assert {f"F11-L{n}" for n in range(1, 11)} <= set(names)
    assert {"F7-random-0.5", "F7-interest-0.5", "F8-av0.5", "F8-at0.3", "F12-l1-1.5", "F12-l3-0.5"} <= set(names)
    # the tables' ablations ran at α_v = α_t = 0.3 (§IV-D); the figure sweeps set their own
    for r in rows_of("reclmis"):
        if r.source.startswith("Table"):
            assert r.settings["image_mask_rate"] == r.settings["text_mask_rate"] == 0.3, r.name
    assert select_rows("reclmis", ["III-*"])[3].trainer == "RecLMISTrainer_CI"
    with pytest.raises(ValueError, match="no reclmis ablation row matches IX"):
        select_rows("reclmis", ["IX"])


def test_tgcnet_and_mptpn_rows_cover_their_tables():
    tgc = {r.name: r for r in rows_of("tgcnet")}
    assert {"T3-a", "T3-b", "T3-c", "T3-d", "T3-e", "T5-llm", "T6-single", "T6-bi"} <= set(tgc)
    assert len([r for r in tgc.values() if r.source == "Table 4"]) == 6  # every encoder configuration is listed
    assert {n for n, r in tgc.items() if r.not_offered} == {"T4-vit-qv", "T4-vit-ft", "T4-sse-ft"}  # fine-tuned CLIP
    assert {r.trainer for r in rows_of("mptpn")} == {"MPTPNTrainer", "MPTPNTrainer_noDownViT", "MPTPNTrainer_noUpViT",
                                                     "MPTPNTrainer_noPretrain", "MPTPNTrainer_noMSFF",
                                                     "MPTPNTrainer_noUpAttention"}


def test_a_row_that_cannot_run_here_is_refused_before_any_work(tmp_path):
    from nnunet_textguided.evaluation.ablations import run
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"cannot run here: T4-vit-ft \(the CLIP towers stay frozen"):
        run("tgcnet", "Dataset999_Nothing", "2d_tiny", select_rows("tgcnet", ["T3-a", "T4-vit-ft"]), out)
    assert not out.exists()


@pytest.mark.parametrize("method", sorted(ROWS))
def test_every_row_names_a_trainer_of_its_method_and_valid_settings(method):
    from nnunet_textguided.evaluation.params import trainer_class
    for row in rows_of(method):
        cls = trainer_class(row.trainer)
        assert cls.textguided_method == method, row
        settings.check_values(method, {**cls.own_settings(), **row.settings}, f"row {row.name}")


def test_listing_prints_every_row(capsys):
    from nnunet_textguided.cli import main
    assert main(["ablation", "reclmis"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {r.name} |" in out for r in rows_of("reclmis"))


@pytest.mark.slow
def test_rows_with_their_own_code_path_train_and_predict_through_the_stock_commands(referring_dataset, tmp_path):
    rows = ["III-*", "IV-none", "V-SA-SA", "F7-random-0.5"]
    r = run_cmd("nnunet-textguided", "ablation", "reclmis", "-d", REFERRING_ID, "-c", "2d_tiny", "--rows", *rows,
                "-o", tmp_path, "--epochs", "1", "--iterations", "2")
    result = json.loads((tmp_path / "ablation_reclmis.json").read_text())
    assert [x["row"] for x in result["rows"]] == ["III-a", "III-b", "III-c", "III-d", "III-e", "IV-none", "V-SA-SA",
                                                 "F7-random-0.5"]
    assert {x["trainer"] for x in result["rows"]} == {"RecLMISTrainer", "RecLMISTrainer_noCLR",
                                                      "RecLMISTrainer_noCVR", "RecLMISTrainer_CI",
                                                      "RecLMISTrainer_noCI"}
    for x in result["rows"]:
        assert 0.0 <= x["dice_true_notes"] <= 1.0
    # each row's settings are in its own configuration of the plans, and so in the trained model's plans.json
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    name = maybe_convert_to_dataset_name(str(REFERRING_ID))
    row = next(x for x in result["rows"] if x["row"] == "V-SA-SA")
    model = f"{nnUNet_results}/{name}/RecLMISTrainer__nnUNetPlans__{row['configuration']}/plans.json"
    block = json.loads(open(model).read())["configurations"][row["configuration"]]["textguided"]
    assert block["method"] == "reclmis"  # the resolved settings the model was trained with
    settings = block["settings"]
    assert settings["ci_attention"] == settings["reconstruction_attention"] == "self" and settings["epochs"] == 1
    assert "| III-e |" in r.stdout


#: one row per distinct trainer of TGC-Net's Tables 3-6 and MPTPN's Table 3 (the other rows share these trainers)
ONE_ROW_PER_TRAINER = {
    "tgcnet": ["T3-a", "T3-b", "T3-c", "T3-d", "T3-e", "T4-cnn", "T5-aux", "T6-single", "T6-bi"],
    "mptpn": ["T3-full", "T3-noDownViT", "T3-noUpViT", "T3-noPPE", "T3-noMSFF", "T3-noUpAttention"],
}


def test_one_row_per_trainer_covers_every_trainer_of_the_listing():
    for method, names in ONE_ROW_PER_TRAINER.items():
        chosen = {r.trainer for r in select_rows(method, names)}
        assert chosen == {r.trainer for r in rows_of(method)}, method


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(ONE_ROW_PER_TRAINER))
def test_every_trainer_of_the_listing_trains_and_predicts_through_the_stock_commands(method, referring_dataset,
                                                                                     tmp_path):
    base = "2d_tiny"
    if method == "mptpn":  # the rows with stage 1 read ppe_weights from the base configuration
        ppe = tmp_path / "ppe.pth"
        run_cmd("nnunet-textguided", "pretrain-ppe", referring_dataset / "imagesTr", "-o", ppe, "--size", 64,
                "--base-channels", 8, "--text-encoder", "minilm", "--epochs", 1, "--batch-size", 8, "--device", "cpu",
                "--num-workers", 0, "--no-progress")
        base = "2d_tiny_ablation_ppe"
        run_cmd("nnunet-textguided", "add-config", "-d", REFERRING_ID, "2d_tiny", "--name", base, "--method", "mptpn",
                "--set", f"ppe_weights={ppe}")
    rows = ONE_ROW_PER_TRAINER[method]
    run_cmd("nnunet-textguided", "ablation", method, "-d", REFERRING_ID, "-c", base, "--rows", *rows, "-o",
            tmp_path / "out", "--epochs", "1", "--iterations", "2", timeout=1800)
    result = json.loads((tmp_path / "out" / f"ablation_{method}.json").read_text())
    assert [x["row"] for x in result["rows"]] == rows
    assert {x["trainer"] for x in result["rows"]} == {r.trainer for r in rows_of(method)}
    for x in result["rows"]:  # trained one epoch and predicted every test case with true and shuffled notes
        assert 0.0 <= x["dice_true_notes"] <= 1.0 and 0.0 <= x["dice_shuffled_notes"] <= 1.0, x
