"""Catalog 6: BiCLIP paper mode (BiCLIPTrainer), a stored slice table whose row count does not match the
preprocessed volume (a table of another preprocessing copied in), and a volume with NaN voxels.

The table must have one row per slice of the preprocessed volume plus the zero-slice row: extraction detects a
mismatch, warns naming the file and recomputes it; loading it for training is refused with StoreEntryError naming
the file and the extract command (the conditioner would otherwise clamp the rows silently). NaN/inf embeddings are
never stored: the extraction stops (exit 2) naming the case's preprocessed file, the store byte-identical.
"""
import os

import numpy as np
import pytest

from conftest import PHANTOM_ID
from reliability_helpers import assert_unchanged, extract_output, forge_store_entry, private_dataset, snapshot, \
    store_root

TRAINER, CONFIG, DATA = "BiCLIPTrainer", "3d_tiny", "nnUNetPlans_3d_fullres"
ARGS = ["-d", str(PHANTOM_ID), "-c", CONFIG, "-tr", TRAINER]


def test_a_table_of_another_slice_count_is_recomputed_and_nan_embeddings_are_refused(
        phantom_dataset, tmp_path, monkeypatch, capsys):
    import blosc2

    from nnunet_textguided.conditioning.extract import build_trainer
    from nnunet_textguided.conditioning.store import StoreEntryError
    from nnunet_textguided.training.base import check_and_record_encoders
    _, pre = private_dataset(phantom_dataset, tmp_path, monkeypatch)
    rc, out, err = extract_output(ARGS, capsys)
    assert rc == 0, err
    n = int(out.split("embeddings computed: ")[1].split(",")[0])
    clean = snapshot(pre)
    tr = build_trainer(str(PHANTOM_ID), CONFIG, TRAINER)
    check_and_record_encoders(tr.textguided)
    store = dict((st.name, s) for st, s in tr.slice_stores())["image"]
    assert store.root.parent == store_root(pre, DATA)
    case = sorted(tr.all_case_identifiers())[0]
    entry = store.root / f"{case}.npy"
    table = np.load(entry)
    slices = table.shape[0] - 1
    forge_store_entry(entry, table[:-4])

    # training-time load with the volume's shape: refused, by name
    with pytest.raises(StoreEntryError) as e:
        store.load(case, expected_shape=(slices + 1, None))
    assert str(e.value) == (f"{entry} has {slices - 4} slice rows but the preprocessed volume has {slices} slices; "
                            f"run `nnUNetv2_extract_textguided -d {pre.name} -c {CONFIG} -tr {TRAINER}` to recompute "
                            "it")

    # extraction: detected, reported by name, recomputed; everything else untouched
    rc, out, err = extract_output(ARGS, capsys)
    assert rc == 0, err
    assert f"WARNING: recomputing {entry}: it has {slices - 4} slice rows but the preprocessed volume has " \
           f"{slices} slices" in err
    assert f"embeddings computed: 1, already current: {n - 1}" in out
    assert snapshot(pre) == clean

    # NaN voxels in a case's preprocessed volume: nothing stored, exit 2 naming the file and the fix
    data_file = pre / DATA / f"{case}.b2nd"
    data = np.asarray(blosc2.open(str(data_file))[:])
    data[0, 2, 3, 4] = np.nan
    os.remove(data_file)
    blosc2.asarray(np.ascontiguousarray(data), urlpath=str(data_file))
    rc, out, err = extract_output(ARGS, capsys)
    assert rc == 2, out + err
    assert f"nnUNetv2_extract_textguided: error: the image slice embeddings of case {case} are NaN/inf (computed " \
           f"from {data_file}" in err
    assert f"check the image {case} for NaN/inf voxels and run nnUNetv2_plan_and_preprocess again" in err
    assert_unchanged(clean, pre, ignore={str(data_file.relative_to(pre))})
