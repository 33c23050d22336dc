"""Issue 21's held-out check: CDPDNet trained universally on two partial-label halves of one labelled phantom
dataset (right-side organs in one half, left-side in the other) reaches at least 0.8x the Dice of the same trainer
trained on the fully labelled cases, at the same budget (1000 iterations), on the same held-out cases
(nnunet_textguided/evaluation/heldout.py; ~8 min on 2 CPU cores).

Both arms train at lr 1e-3 instead of the paper's 4e-4 (a setting, the same for both): the paper's rate is for 1000
epochs; at this CPU budget it leaves whether a small organ is learned to the model seed, with full labels as with
halves (docs/cdpdnet.md, "Partial labels against full labels")."""
import pytest

from nnunet_textguided.evaluation.heldout import ORGANS, partial_label_check

pytestmark = pytest.mark.slow


def test_halves_reach_full_labels_on_held_out_cases(tmp_path):
    result = partial_label_check(tmp_path, "CDPDNetTrainer_40epochs", seed=0, settings={"lr": 0.001})
    full, halves = result["FullLabels"], result["Halves"]
    print({arm: {o: round(result[arm][o], 3) for o in ORGANS} for arm in ("FullLabels", "Halves")}, result["minutes"])
    assert min(full.values()) > 0.7, f"the fully supervised reference did not learn every organ: {full}"
    assert result["ratio"] >= 0.8, f"halves {halves} against full labels {full}: {result['ratio']:.2f}x"
    for organ in ORGANS:  # each organ is learned from the half that annotates it alone
        assert halves[organ] > 0.5, f"{organ}: halves {halves[organ]:.3f}, full {full[organ]:.3f}"
