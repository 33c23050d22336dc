"""Issue 9, safe loading: store files are read by numpy without pickle (a pickled store entry is refused and never
executed), and nothing in the package asks transformers for remote code."""
import re
from pathlib import Path

import numpy as np
import pytest

import nnunet_textguided
from nnunet_textguided.conditioning.store import EmbeddingStore, StoreEntryError

MARKER = Path("/nonexistent")  # replaced per test


class Payload:
    """Unpickling this writes a marker file: proof that pickle ran."""

    def __reduce__(self):
        return (Path.write_text, (MARKER, "pickle ran"))


def test_a_pickled_store_entry_is_refused_without_running_it(tmp_path, monkeypatch):
    global MARKER
    MARKER = tmp_path / "pickle_ran"
    (tmp_path / "c1.b2nd").write_bytes(b"volume")
    store = EmbeddingStore(tmp_path, "notes", {"encoder": "minilm"})
    store.save("c1", np.zeros((2, 3), np.float32), store.source_hash("c1"))
    entry = store.root / "c1.npy"
    np.save(entry, np.array([Payload()], dtype=object), allow_pickle=True)  # a shared store with a poisoned file
    with pytest.raises(StoreEntryError, match=r"is not a plain numpy array \(pickled objects are refused"):
        store.load("c1")
    assert not MARKER.exists()


def test_no_trust_remote_code_anywhere_in_the_package():
    root = Path(nnunet_textguided.__file__).parent
    hits = [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"trust_remote_code", line)]
    assert hits == []


def test_a_checkpoint_that_pickles_code_is_refused_before_anything_unpickles_it(tmp_path):
    global MARKER
    import torch

    from nnunet_textguided.inference.predict import check_checkpoints
    from nnunet_textguided.training.base import CheckpointError
    MARKER = tmp_path / "pickle_ran"
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "plans.json").write_text("{\"configurations\": {}}")
    path = tmp_path / "fold_0" / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "init_args": Payload()}, path)
    with pytest.raises(CheckpointError, match="holds objects other than tensors, numbers and strings, so it is not "
                                              "loaded: unpickling them could run code"):
        check_checkpoints(str(tmp_path), ["0"], "checkpoint_final.pth")
    assert not MARKER.exists()
    path.write_bytes(path.read_bytes()[:100])  # an interrupted copy
    with pytest.raises(CheckpointError, match="is not a readable checkpoint .* it may be truncated"):
        check_checkpoints(str(tmp_path), ["0"], "checkpoint_final.pth")


def test_checkpoints_hold_plain_numbers_and_load_with_weights_only(referring_dataset, tmp_path, monkeypatch):
    """nnU-Net logs numpy floats; the package's checkpoints store them as Python floats, so plain
    ``torch.load(weights_only=True)`` reads them with nothing allow-listed."""
    import torch

    from conftest import REFERRING_ID
    from nnunet_textguided.conditioning.extract import build_trainer
    from reliability_helpers import NOTE_CONFIG, NOTE_TRAINER, private_dataset
    private_dataset(referring_dataset, tmp_path, monkeypatch)
    tr = build_trainer(str(REFERRING_ID), NOTE_CONFIG, NOTE_TRAINER, for_extraction=False)
    tr.initialize()
    tr.logger.log("mean_fg_dice", np.float64(0.25), 0)
    tr.logger.log("ema_fg_dice", np.float32(0.5), 0)
    tr._best_ema = np.float32(0.5)
    tr.save_checkpoint(str(tmp_path / "c.pth"))
    c = torch.load(tmp_path / "c.pth", weights_only=True)
    assert c["logging"]["mean_fg_dice"] == [0.25] and type(c["logging"]["mean_fg_dice"][0]) is float
    assert type(c["_best_ema"]) is float
    tr.load_checkpoint(str(tmp_path / "c.pth"))  # resuming reads it the same safe way
    assert tr.logger.get_checkpoint()["mean_fg_dice"] == [0.25]
