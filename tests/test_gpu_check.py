"""scripts/gpu_check runs on the CPU at the tiny presets (the GPU run uses the same code at the paper
configurations), and the real-size encoder stand-ins it builds where weights are absent are the real
architectures. No timing is asserted."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunet_textguided.gpu_check import COLUMNS, METHODS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_on_cpu_prints_a_row_for_every_method(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check"), "--device", "cpu", "--work",
                        str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "Machine:" in r.stdout and "Tiny presets and encoders" in r.stdout
    header = next(line for line in r.stdout.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.split("|")[1:-1]] == list(COLUMNS)
    rows = {c[0]: dict(zip(COLUMNS, c)) for c in ([x.strip() for x in line.split("|")[1:-1]]
                                                   for line in r.stdout.splitlines() if line.startswith("| "))
            if c[0] in METHODS}
    assert list(rows) == list(METHODS)
    for method, row in rows.items():
        assert row["trainer"] == METHODS[method][0]
        assert row["compile"] == "off" and row["AMP"] == "off (float32)"  # nnU-Net's CPU behaviour
        assert float(row["s/it"]) > 0 and float(row["predict s/case"]) > 0 and float(row["peak memory GiB"]) > 0
        # the trained model predicted its test case: nnU-Net's export wrote it
        assert list((tmp_path / f"row_{row['trainer']}").glob("*.nii.gz")) or \
            list((tmp_path / f"row_{row['trainer']}").glob("*.png"))


def test_gpu_check_without_cuda_says_how_to_run_it():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "--device cpu" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["openclip:ViT-B-32@openai", "pmcclip:pmc-clip/image_encoder(resnet50).pth",
                                  "hf:facebook/dinov2-base", "hf:bert-base-uncased"])
def test_real_size_standins_are_the_counted_architectures(spec, tmp_path):
    from nnunet_textguided.encoders.registry import load_encoder
    from nnunet_textguided.encoders.standins import save_real_size_standin
    from nnunet_textguided.encoders.structure import encoder_structure
    saved = save_real_size_standin(spec, tmp_path / "standin")
    enc = load_encoder(saved)
    assert enc.untrained  # flagged: every model trained with it warns
    counted = encoder_structure(spec)
    assert sum(p.numel() for p in enc.model.parameters()) == counted.num_parameters()
    assert enc.embed_dim == counted.embed_dim
    # seeded from the spec: the same stand-in in every process
    again = load_encoder(save_real_size_standin(spec, tmp_path / "again"))
    assert enc.weight_hash() == again.weight_hash()
