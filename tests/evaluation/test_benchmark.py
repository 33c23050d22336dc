"""The benchmark harness runs and measures (no timing is asserted: timings belong to scripts/benchmark)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_harness_prints_the_side_by_side_table():
    # a subprocess: the CPU memory measurement changes the allocator's settings for the whole process
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark"), "--trainers", "BiCLIPTrainer", "CDPDNetTrainer",
                        "--repeats", "1", "--predict-repeats", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ")}
    assert {"nnUNetTrainer", "BiCLIPTrainer", "CDPDNetTrainer"} <= set(rows)
    base = [c.strip() for c in rows["nnUNetTrainer"].split("|")[2:-1]]
    assert base[1] == "1.00" and base[5] == "1.00"  # the baseline's ratios
    assert float(base[2]) > 1  # peak memory of a training iteration is measured (MiB)
    assert "Machine:" in r.stdout and "raw / store" in r.stdout


def test_peak_memory_sees_a_transient_allocation():
    code = ("import torch; from nnunet_textguided.evaluation.benchmark import peak_memory; "
            "print(peak_memory(lambda: torch.ones(64 * 2**20 // 4).sum(), torch.device('cpu')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 56 < float(r.stdout.split()[-1]) < 200  # a 64 MiB tensor, freed again after the call


def test_biclip_comparison_prints_every_trainer_against_net1_and_the_encoder_flops():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark"), "--biclip", "--repeats", "1",
                        "--predict-repeats", "1"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    tables = r.stdout.split("BiCLIP on ")[1:]
    assert [t.split(" (")[0] for t in tables] == ["nnU-Net's UNet", "nnFormer"]
    for table in tables:
        rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
                for line in table.splitlines() if line.startswith("| BiCLIP")}
        assert list(rows) == ["BiCLIPTrainer_Net1", "BiCLIPTrainer_Net2", "BiCLIPTrainer_Net3", "BiCLIPTrainer",
                              "BiCLIPTrainer_Net2_online", "BiCLIPTrainer_Net3_online", "BiCLIPTrainer_online"]
        # columns: mode, GFLOP/it, x Net1, s/it, x Net1, predict s/case, x Net1
        assert rows["BiCLIPTrainer_Net1"][2] == "1.000" and rows["BiCLIPTrainer_Net1"][4] == "1.00" \
            and rows["BiCLIPTrainer_Net1"][6] == "1.00"
        assert rows["BiCLIPTrainer"][0] == "paper (offline)" and rows["BiCLIPTrainer_online"][0] == "online"
        # the work of a step: paper mode adds only the fusion layers, online mode runs both encoders inside it
        assert 1.0 < float(rows["BiCLIPTrainer"][2]) < 1.1 < float(rows["BiCLIPTrainer_online"][2])
        assert float(rows["BiCLIPTrainer_Net2"][2]) <= float(rows["BiCLIPTrainer"][2])
    flops = r.stdout.split("Frozen-encoder TFLOPs")[1]
    assert "3d_nnformer_synapse: patch 64x128x128, batch 32" in flops
    rows = {line.split("|")[1].strip(): line for line in flops.splitlines() if line.startswith("| ")}
    assert "0 (read from the store)" in rows["image"] and "0 (read from the store)" in rows["caption"]
