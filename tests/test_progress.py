"""What a person sees while the demo's steps run (progress.run_logged): one line per nnU-Net epoch with an ETA,
progress bars, and a sign of life at least every HEARTBEAT_S; the log keeps everything."""
import sys

from nnunet_textguided import progress

EPOCH = """2026-12-07 16:16:50.756347: Epoch 3 
2026-12-07 16:16:50.756451: Current learning rate: 0.00019 
2026-12-07 16:16:55.342910: train_loss 0.0942 
2026-12-07 16:16:55.343228: val_loss 0.0772 
2026-12-07 16:16:55.343282: Pseudo dice [np.float32(0.91), np.float32(0.5)] 
2026-12-07 16:16:55.343332: Epoch time: 4.59 s 
"""


def test_an_nnunet_epoch_becomes_one_line_with_an_eta():
    summary = progress.EpochSummary(epochs=40)
    shown = [s for s in map(summary.feed, EPOCH.splitlines()) if s]
    assert shown == ["  epoch 4/40, train loss 0.094, val loss 0.077, pseudo-Dice 0.91 0.50, 4.6 s/epoch, ETA 165 s"]


def test_a_silent_step_shows_a_sign_of_life_and_the_log_keeps_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "HEARTBEAT_S", 1.0)
    monkeypatch.setattr(progress, "BAR_INTERVAL_S", 0.0)
    child = ("import sys, time\n"
             "print('preparing', flush=True)\n"
             "time.sleep(2.5)\n"
             "sys.stderr.write('cases:  50%|#####     | 1/2 [00:01<00:01]\\r'); sys.stderr.flush()\n"
             "sys.stderr.write('cases: 100%|##########| 2/2 [00:02<00:00]\\n')\n"
             + "".join(f"print({line!r})\n" for line in EPOCH.splitlines())
             + "sys.exit(3)\n")
    shown = []
    with open(tmp_path / "step.log", "w") as log:
        code = progress.run_logged([sys.executable, "-c", child], {}, log, epochs=10, echo=shown.append)
    assert code == 3
    assert any("still running" in s for s in shown)  # 2.5 s without output, heartbeat 1 s
    assert any("1/2" in s for s in shown) and any("2/2" in s for s in shown)
    assert any(s.startswith("  epoch 4/10, train loss 0.094") for s in shown)
    assert "preparing" not in " ".join(shown)  # other output stays in the log
    text = (tmp_path / "step.log").read_text()
    assert "preparing" in text and "Epoch time: 4.59 s" in text and text.startswith("$ ")
