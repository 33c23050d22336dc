"""Catalog 7: damaged store files: a truncated .npy, a .npy with flipped bytes (same size), a pickled .npy, a
garbage .json record, a truncated manifest.json, temporary files of killed writes; and a manifest of another
identity.

Extraction recomputes each damaged entry with a warning naming its file, rewrites the unreadable manifest from the
store's identity (its folder name's hash fixes it), removes the stale temporary files (not a fresh one: it may be a
concurrent extraction's write), and leaves every other file byte-identical: the store ends as a clean run left it.
A readable manifest of another identity is an error (exit 2) that changes nothing.
"""
import json
import os
import time

import numpy as np

from reliability_helpers import EXTRACT_ARGS, extract_output, private_dataset, snapshot, store_root


def test_damaged_store_files_are_recomputed_or_rewritten_by_name(referring_dataset, tmp_path, monkeypatch, capsys):
    from nnunet_textguided.conditioning.store import STALE_TEMP_SECONDS
    _, pre = private_dataset(referring_dataset, tmp_path, monkeypatch)
    rc, _, err = extract_output(EXTRACT_ARGS, capsys)
    assert rc == 0, err
    clean = snapshot(pre)
    (folder,) = store_root(pre).iterdir()
    manifest = folder / "manifest.json"
    truncated, flipped, pickled = (folder / f"referring_00{i}.npy" for i in (1, 2, 3))
    garbage = folder / "referring_004.json"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[-8:] = bytes(8)
    flipped.write_bytes(bytes(data))
    np.save(pickled, np.array([{"not": "an array"}], dtype=object), allow_pickle=True)
    garbage.write_bytes(b"\x00{garbage")
    manifest.write_text(manifest.read_text()[:40])
    stale, fresh = folder / ".referring_005.npy.k1ll3d.tmp", folder / ".referring_006.json.wr1t1ng.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))

    rc, out, err = extract_output(EXTRACT_ARGS, capsys)
    assert rc == 0, err
    assert f"WARNING: rewriting {manifest}: it is unreadable (" in err
    assert "this store's identity is fixed by its folder name" in err
    assert f"WARNING: removed 1 temporary file(s) left in {folder} by an interrupted extraction" in err
    assert f"WARNING: recomputing {truncated}: it is truncated or corrupt (" in err
    assert f"WARNING: recomputing {flipped}: it is corrupt (its bytes differ from those recorded in " \
           "referring_002.json)" in err
    assert f"WARNING: recomputing {pickled}: it is not a plain numpy array (pickled objects are refused" in err
    assert f"WARNING: recomputing {garbage}: it is unreadable (" in err
    assert "embeddings computed: 4, already current: 12" in out
    after = snapshot(pre)
    fresh_key = str(fresh.relative_to(pre))
    assert after.pop(fresh_key) and not stale.exists()
    assert after == clean  # recomputed and rewritten files as a clean run wrote them, all others untouched
    fresh.unlink()

    # a readable manifest of another identity: an error naming it and the fix, nothing changed
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "encoder": "another-encoder"}))
    before = snapshot(pre)
    rc, out, err = extract_output(EXTRACT_ARGS, capsys)
    assert rc == 2, out + err
    assert f"nnUNetv2_extract_textguided: error: {manifest} does not match this store's identity; delete {folder} " \
           "to recompute it" in err
    assert snapshot(pre) == before
