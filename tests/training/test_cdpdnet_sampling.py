"""Dataset-balanced sampling of CDPDNetTrainer (seed 002 §IV-A2: patches "from each dataset with equal
probability") through nnU-Net's own training data loader, on a merge of a 10-case and a 1-case source."""
from collections import Counter

import numpy as np
import pytest

from nnunet_textguided.conditioning.extract import build_trainer


def trainer_loaders(name, monkeypatch, **settings):
    from conftest import UNBALANCED_ID
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # loaders in-process: the test reads the training loader itself
    tr = build_trainer(str(UNBALANCED_ID), "3d_tiny", name, fold="all", for_extraction=False, settings=settings)
    tr.initialize()
    tr_gen, val_gen = tr.get_dataloaders()
    return tr, tr_gen.data_loader, val_gen.data_loader


def draws_per_source(tr, loader, batches=400):
    np.random.seed(0)
    return Counter(tr.source_of(c) for _ in range(batches) for c in loader.get_indices())


def test_each_source_dataset_is_drawn_equally_often(unbalanced_universal_dataset, monkeypatch):
    tr, dl, dl_val = trainer_loaders("CDPDNetTrainer", monkeypatch)
    sources = Counter(tr.source_of(c) for c in dl.indices)
    assert sorted(sources.values()) == [1, 10]  # 10 : 1 training cases
    counts = draws_per_source(tr, dl)
    assert len(counts) == 2 and all(abs(n - 400) <= 40 for n in counts.values()), counts  # equal within 10 %
    assert dl_val.sampling_probabilities is None  # nnU-Net's uniform validation draw
    log = open(tr.log_file).read()
    assert "dataset-balanced sampling" in log and "50.0% of the draws (uniform over cases: 90.9%)" in log


def test_balanced_sampling_off_is_nnunets_uniform_draw_over_cases(unbalanced_universal_dataset, monkeypatch):
    tr, dl, _ = trainer_loaders("CDPDNetTrainer", monkeypatch, balanced_sampling=False)
    assert dl.sampling_probabilities is None
    counts = draws_per_source(tr, dl)
    assert min(counts.values()) < 0.15 * 800, counts  # the 1-case source gets ~1/11 of the draws
