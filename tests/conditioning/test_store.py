"""Embedding store and extraction: atomic files, skip/recompute rules, sharding, counted encoder calls."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from nnunet_textguided.conditioning import slices
from nnunet_textguided.conditioning.store import EmbeddingStore


def test_store_roundtrip_and_identity(tmp_path):
    (tmp_path / "c1.b2nd").write_bytes(b"volume-1")
    store = EmbeddingStore(tmp_path, "slices_image", {"encoder": "tiny-clip", "weight_hash": "a"})
    assert not store.is_current("c1")
    store.save("c1", np.ones((3, 4), np.float32), store.source_hash("c1"))
    assert store.is_current("c1")
    np.testing.assert_array_equal(store.load("c1"), np.ones((3, 4)))
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((store.root / "manifest.json").read_text())["encoder"] == "tiny-clip"
    (tmp_path / "c1.b2nd").write_bytes(b"volume-1 changed")
    assert not store.is_current("c1")
    other = EmbeddingStore(tmp_path, "slices_image", {"encoder": "tiny-clip", "weight_hash": "b"})
    assert other.root != store.root and not other.is_current("c1")


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    (tmp_path / "c1.b2nd").write_bytes(b"v")
    store = EmbeddingStore(tmp_path, "s", {"encoder": "x"})
    store.save("c1", np.zeros(3, np.float32), store.source_hash("c1"))
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        store.save("c1", np.ones(3, np.float32), "other")
    np.testing.assert_array_equal(store.load("c1"), np.zeros(3))
    assert store.is_current("c1") and not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]


def test_missing_case_error_names_the_command(tmp_path):
    store = EmbeddingStore(tmp_path, "s", {"encoder": "x"})
    with pytest.raises(FileNotFoundError, match="nnUNetv2_extract_textguided"):
        store.load("nope")


@pytest.fixture
def offline_trainer(phantom_dataset, tmp_path, monkeypatch):
    """BiCLIPTrainer (paper mode) on a private copy of the preprocessed phantom data."""
    from conftest import PHANTOM_ID
    from nnunet_textguided.conditioning.extract import build_trainer

    def make(**settings):
        tr = build_trainer(str(PHANTOM_ID), "3d_tiny", "BiCLIPTrainer", settings=settings)
        if not (tmp_path / "pre").exists():
            shutil.copytree(tr.preprocessed_dataset_folder, tmp_path / "pre",
                            ignore=shutil.ignore_patterns("textguided"))
        tr.preprocessed_dataset_folder = str(tmp_path / "pre")
        return tr
    return make


@pytest.fixture
def encoder_calls(monkeypatch):
    calls = []
    real = slices.embed_slices

    def counting(slc, stream, *a, **k):
        calls.append((stream.name, slc.shape[0]))
        return real(slc, stream, *a, **k)
    monkeypatch.setattr(slices, "embed_slices", counting)
    return calls


def test_extraction_skips_current_and_recomputes_stale(offline_trainer, encoder_calls):
    tr = offline_trainer()
    cases = tr.all_case_identifiers()
    assert tr.extract(progress=False) == {"computed": 2 * len(cases), "skipped": 0}
    assert len(encoder_calls) == 2 * len(cases)
    encoder_calls.clear()
    assert offline_trainer().extract(progress=False) == {"computed": 0, "skipped": 2 * len(cases)}
    assert encoder_calls == []  # unchanged store: zero encoder calls

    # a case's preprocessed image changes -> that case, and only it, is recomputed
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    folder = tr.preprocessed_dataset_folder
    ds = nnUNetDatasetBlosc2(folder, [cases[0]])
    data, seg, _, props = ds.load_case(cases[0])
    data, seg = np.asarray(data[:]) + 1.0, np.asarray(seg[:])
    for ext in (".b2nd", "_seg.b2nd"):
        os.remove(os.path.join(folder, cases[0] + ext))
    nnUNetDatasetBlosc2.save_case(data, seg, props, os.path.join(folder, cases[0]))
    assert offline_trainer().extract(progress=False) == {"computed": 2, "skipped": 2 * len(cases) - 2}
    assert sorted(n for n, _ in encoder_calls) == ["caption", "image"]
    encoder_calls.clear()

    # another encoder spec -> a new store for that stream; the old one stays intact and is not reused
    store_root = Path(folder) / "textguided"
    before = {p.name for p in store_root.iterdir()}
    tr2 = offline_trainer(caption_encoder="tiny-coca?seed=1")
    assert tr2.extract(progress=False) == {"computed": len(cases), "skipped": len(cases)}
    assert {n for n, _ in encoder_calls} == {"caption"}
    after = {p.name for p in store_root.iterdir()}
    assert before < after and len(after) == 3


def test_sharding_covers_every_case_once(offline_trainer, encoder_calls):
    tr = offline_trainer()
    n = len(tr.all_case_identifiers())
    a = tr.extract(num_parts=2, part_id=0, progress=False)
    b = offline_trainer().extract(num_parts=2, part_id=1, progress=False)
    assert a["computed"] + b["computed"] == 2 * n and a["computed"] and b["computed"]
    assert offline_trainer().extract(progress=False)["computed"] == 0


def test_training_extracts_lazily_when_the_store_is_missing(offline_trainer, encoder_calls):
    tr = offline_trainer()
    tr.initialize()
    assert not (Path(tr.preprocessed_dataset_folder) / "textguided").exists()
    tr._register_tables()
    n = len(tr.all_case_identifiers())
    assert len(encoder_calls) == 2 * n and len(tr.network.conditioner.tables) == n


def test_damaged_or_foreign_entries_are_not_current_and_refused_by_name(tmp_path, capsys):
    from nnunet_textguided.conditioning.store import StoreEntryError
    (tmp_path / "c1.b2nd").write_bytes(b"v")
    store = EmbeddingStore(tmp_path, "s", {"encoder": "x"}, command="extract it", entry_shape=(3, None))
    source = store.source_hash("c1")
    store.save("c1", np.ones((3, 4), np.float32), source)
    assert store.is_current("c1", source)
    np.save(store.root / "c1.npy", np.ones((2, 4), np.float32))  # another length, e.g. another max_tokens
    assert not store.is_current("c1", source)
    assert f"recomputing {store.root / 'c1.npy'}: it is corrupt" in capsys.readouterr().err  # sha256 of the record
    store.save("c1", np.ones((2, 4), np.float32), source)  # the record agrees: the entry shape still refuses it
    with pytest.raises(StoreEntryError, match=r"c1.npy has shape \(2, 4\), expected \(3, \*\); run `extract it`"):
        store.load("c1")
    with pytest.raises(RuntimeError, match="records entries"):  # the manifest's format: one identity, one encoder
        store.save("c1", np.ones((3, 5), np.float32), source)
