"""Issue 9, safe loading: store files are read by numpy without pickle (a pickled store entry is refused and never
executed), and nothing in the package asks transformers for remote code."""
import re
from pathlib import Path

import numpy as np
import pytest

import nnunet_textguided
from nnunet_textguided.conditioning.store import EmbeddingStore

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
    with pytest.raises(ValueError, match="allow_pickle=False"):
        store.load("c1")
    assert not MARKER.exists()


def test_no_trust_remote_code_anywhere_in_the_package():
    root = Path(nnunet_textguided.__file__).parent
    hits = [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"trust_remote_code", line)]
    assert hits == []
