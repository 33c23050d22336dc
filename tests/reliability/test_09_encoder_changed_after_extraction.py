"""Catalog 9: the text encoder's weights (same spec) or its spec change after extraction. The store keys its folder
by the encoder identity (spec, weight hash, max tokens), so the stale entries are never reused: every case is
recomputed into the new identity's folder, the old folder stays byte-identical, and switching back finds it."""
import json

from conftest import REFERRING_ID
from reliability_helpers import NOTE_CONFIG, NOTE_TRAINER, configure, private_dataset, snapshot, store_root

ARGS = ["-d", str(REFERRING_ID), "-c", NOTE_CONFIG, "-tr", NOTE_TRAINER]


def counts(capsys_out: str) -> str:
    return capsys_out.split("embeddings computed:")[1].split("(store")[0].strip()


def run(capsys) -> str:
    from nnunet_textguided.conditioning.extract import main
    capsys.readouterr()
    assert main(ARGS) == 0
    return counts(capsys.readouterr().out)


def test_changed_encoder_weights_or_spec_recompute_every_case_and_keep_the_old_entries(
        referring_dataset, tmp_path, monkeypatch, capsys):
    from nnunet_textguided.conditioning import slices
    from nnunet_textguided.encoders import save_tiny_encoder
    _, pre = private_dataset(referring_dataset, tmp_path, monkeypatch)
    store = store_root(pre)
    spec = save_tiny_encoder("tiny-bert", tmp_path / "bert")
    configure(REFERRING_ID, NOTE_CONFIG, "reclmis", text_encoder=spec)
    monkeypatch.setattr(slices, "_ENCODER_CACHE", {})  # each run below loads its encoders afresh, like a new process
    assert run(capsys) == "16, already current: 0"
    assert run(capsys) == "0, already current: 16"
    (first,) = [p for p in store.iterdir()]
    old = snapshot(first)

    # the same spec now loads other weights (a fine-tuned model saved over the old one)
    assert save_tiny_encoder("tiny-bert?seed=1", tmp_path / "bert") == spec
    slices._ENCODER_CACHE.clear()
    assert run(capsys) == "16, already current: 0"
    (second,) = [p for p in store.iterdir() if p != first]
    assert snapshot(first) == old
    manifests = [json.loads((p / "manifest.json").read_text()) for p in (first, second)]
    assert manifests[0]["encoder"] == manifests[1]["encoder"] == spec
    assert manifests[0]["weight_hash"] != manifests[1]["weight_hash"]

    # another spec: a third folder; back to the current weights: nothing to recompute
    configure(REFERRING_ID, NOTE_CONFIG, "reclmis", text_encoder="minilm")
    assert run(capsys) == "16, already current: 0"
    assert len(list(store.iterdir())) == 3
    configure(REFERRING_ID, NOTE_CONFIG, "reclmis", text_encoder=spec)
    assert run(capsys) == "0, already current: 16"
    assert snapshot(first) == old
