"""Catalog 5: a store entry of another embedding dimension (another encoder's entry copied into the store).

The store's manifest records the trailing shape of its entries (one identity, one encoder): extraction detects the
entry, warns naming the file and recomputes it, every other file byte-identical; training-time loading refuses it
with StoreEntryError naming the file and the extract command.
"""
import numpy as np
import pytest

from conftest import REFERRING_ID
from reliability_helpers import (EXTRACT_ARGS, NOTE_CONFIG, NOTE_TRAINER, extract_output, forge_store_entry,
                                 private_dataset, snapshot, store_root)


def test_an_entry_of_another_dimension_is_recomputed_at_extraction_and_refused_at_load(
        referring_dataset, tmp_path, monkeypatch, capsys):
    from nnunet_textguided.conditioning.extract import build_trainer
    from nnunet_textguided.conditioning.store import StoreEntryError
    from nnunet_textguided.training.base import check_and_record_encoders
    _, pre = private_dataset(referring_dataset, tmp_path, monkeypatch)
    rc, _, err = extract_output(EXTRACT_ARGS, capsys)
    assert rc == 0, err
    clean = snapshot(pre)
    (folder,) = store_root(pre).iterdir()
    entry = folder / "referring_003.npy"
    tokens, dim = np.load(entry).shape
    forge_store_entry(entry, np.ones((tokens, 33), np.float32))  # a 32-wide encoder's states + the mask column

    # training start without the notes (nnUNet_raw elsewhere): the stored tokens are loaded as they are -> refused
    tr = build_trainer(str(REFERRING_ID), NOTE_CONFIG, NOTE_TRAINER)
    check_and_record_encoders(tr.textguided)
    store = tr.note_store()
    assert store.root == folder
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "elsewhere"))
    with pytest.raises(StoreEntryError) as e:
        tr._register_notes()
    msg = str(e.value)
    assert f"{entry} has embedding dimension 33, this store's encoder gives {dim} (written by another encoder?)" in msg
    assert "; run `nnUNetv2_extract_textguided -d " in msg and msg.endswith("` to recompute it")
    # a caller's expected shape is checked as well
    with pytest.raises(StoreEntryError, match=rf"referring_000.npy has shape \({tokens}, {dim}\), expected "
                                              rf"\({2 * tokens}, \*\)"):
        store.load("referring_000", expected_shape=(2 * tokens, None))
    assert store.load("referring_000", expected_shape=(tokens, dim)).shape == (tokens, dim)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))

    # extraction: detected, reported by name, recomputed; everything else untouched
    rc, out, err = extract_output(EXTRACT_ARGS, capsys)
    assert rc == 0, err
    assert f"WARNING: recomputing {entry}: it has embedding dimension 33, this store's encoder gives {dim}" in err
    assert "embeddings computed: 1, already current: 15" in out
    assert snapshot(pre) == clean
