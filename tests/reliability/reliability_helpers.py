"""Shared helpers of the reliability catalog (issue 9; tests/reliability/test_NN_*.py).

Every catalog test works on private copies: the session datasets (conftest's fixtures) are copied into the test's
tmp_path and nnUNet_raw / nnUNet_preprocessed / nnUNet_results point there (nnunetv2 2.8 reads these variables
lazily, so the change reaches nnU-Net, the package and the commands run as subprocesses alike). Model folders are
written from an initialised, untrained trainer (nnU-Net's own layout: plans.json, dataset.json,
fold_0/checkpoint_final.pth): every case of the catalog must stop before anything is predicted, so no training is
needed. Not a conftest.py on purpose: a second ``conftest`` module would shadow tests/conftest.py for the
``from conftest import ...`` lines of the other test folders.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from conftest import REFERRING_ID

#: the note-guided model of the catalog (RecLMIS on the referring dataset, bundled MiniLM text encoder)
NOTE_TRAINER = "RecLMISTrainer_2epochs"
NOTE_CONFIG = "2d_tiny"
EXTRACT_ARGS = ["-d", str(REFERRING_ID), "-c", NOTE_CONFIG, "-tr", NOTE_TRAINER]
PREDICT_ARGS = ("-d", REFERRING_ID, "-c", NOTE_CONFIG, "-f", 0, "-tr", NOTE_TRAINER, "-device", "cpu",
                "-npp", 1, "-nps", 1)
#: nnU-Net's record of a prediction run's arguments in the output folder
NNUNET_RUN_RECORD = "predict_from_raw_data_args.json"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` (hidden files included)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_unchanged(before: dict[str, str], folder, ignore=()) -> dict[str, str]:
    """Every file of ``before`` still exists under ``folder`` with the same bytes. Returns the new snapshot."""
    after = snapshot(folder)
    changed = sorted(k for k in before if k not in ignore and after.get(k) != before[k])
    assert not changed, f"pre-existing files changed or removed in {folder}: {changed}"
    return after


def private_dataset(source_raw: Path, tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """Copy a session dataset (raw folder and preprocessed folder, without any embedding store) into tmp_path and
    point nnUNet_raw / nnUNet_preprocessed / nnUNet_results there. Returns (raw dataset, preprocessed dataset)."""
    name = Path(source_raw).name
    pre_src = Path(os.environ["nnUNet_preprocessed"]) / name
    raw, pre = tmp_path / "raw" / name, tmp_path / "pre" / name
    shutil.copytree(source_raw, raw)
    shutil.copytree(pre_src, pre, ignore=shutil.ignore_patterns("textguided"))
    (tmp_path / "results").mkdir(exist_ok=True)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    return raw, pre


def configure(dataset_id, configuration: str, method: str, **values) -> None:
    """``nnunet-textguided add-config -d ID CONFIGURATION --method METHOD --set KEY=VALUE ... --force`` (in this
    process) on the current $nnUNet_preprocessed: the way a user changes a configuration's settings."""
    from nnunet_textguided.cli import main
    items = [f"{k}={v}" for k, v in values.items()]
    assert main(["add-config", "-d", str(dataset_id), configuration, "--method", method, "--set", *items,
                 "--force"]) == 0


def build_model_folder(dataset_id, configuration: str, trainer_name: str) -> Path:
    """nnU-Net's model folder of ``trainer_name`` (in $nnUNet_results, plans nnUNetPlans) from an initialised,
    untrained trainer: what prediction and ``nnUNetv2_train --c`` read. Settings come from the configuration."""
    from batchgenerators.utilities.file_and_folder_operations import save_json

    from nnunet_textguided.conditioning.extract import build_trainer
    tr = build_trainer(str(dataset_id), configuration, trainer_name, for_extraction=False)
    tr.initialize()  # builds the network: loads the encoders and records their weight hashes in the plans
    out = Path(tr.output_folder_base)
    (out / "fold_0").mkdir(parents=True, exist_ok=True)
    save_json(tr.plans_manager.plans, str(out / "plans.json"), sort_keys=False)
    save_json(tr.dataset_json, str(out / "dataset.json"), sort_keys=False)
    tr.save_checkpoint(str(out / "fold_0" / "checkpoint_final.pth"))
    return out


def previous_predictions(folder: Path, model: Path, labels: Path, file_ending: str) -> dict[str, str]:
    """An output folder as an earlier prediction run left it: one label map per case (the reference labels stand
    in for them), nnU-Net's dataset.json / plans.json copies and its run record. Returns its snapshot."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(labels.glob(f"*{file_ending}")):
        shutil.copy2(f, folder / f.name)
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(model / name, folder / name)
    record = {"list_of_lists_or_source_folder": "/earlier/run/imagesTs",
              "output_folder_or_list_of_truncated_output_files": str(folder)}
    (folder / NNUNET_RUN_RECORD).write_text(json.dumps(record))
    return snapshot(folder)


def store_root(preprocessed_dataset: Path, data_identifier: str = "nnUNetPlans_2d") -> Path:
    """The embedding store of a configuration: <preprocessed>/<data identifier>/textguided."""
    return Path(preprocessed_dataset) / data_identifier / "textguided"


def extract(argv, capsys) -> tuple[int, str]:
    """``nnUNetv2_extract_textguided`` in this process (its console script is ``sys.exit(main())``): (exit status,
    stderr)."""
    from nnunet_textguided.conditioning.extract import main
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def check_bad_note(referring_dataset: Path, tmp_path: Path, monkeypatch, capsys, spoil, expected: list[str]) -> None:
    """Catalog items 1-3: ``spoil(note file)`` breaks one training note and one input note.

    Training extraction (``nnUNetv2_extract_textguided``) over a complete store: exit 2, a message naming the file
    and the fix, the store byte-identical. Prediction (``nnUNetv2_predict_textguided``) into a folder holding an
    earlier run's predictions: exit 2 before anything is predicted, same message, the predictions byte-identical.
    """
    from conftest import run_cmd
    raw, pre = private_dataset(referring_dataset, tmp_path, monkeypatch)
    model = build_model_folder(REFERRING_ID, NOTE_CONFIG, NOTE_TRAINER)

    # -- training extraction: the store already holds every case
    rc, err = extract(EXTRACT_ARGS, capsys)
    assert rc == 0, err
    store = store_root(pre)
    before = snapshot(store)
    assert sum(k.endswith(".npy") for k in before) == 16
    note = raw / "imagesTr" / "referring_005.txt"
    spoil(note)
    rc, err = extract(EXTRACT_ARGS, capsys)
    assert rc == 2, err
    assert "nnUNetv2_extract_textguided: error: 1 of 16 training cases have no usable note" in err
    assert str(note) in err and all(e in err for e in expected), err
    assert snapshot(store) == before  # nothing written, nothing removed

    # -- prediction: every input note is read before anything is predicted
    inputs, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(raw / "imagesTs", inputs)
    before = previous_predictions(out, model, raw / "labelsTs", ".png")
    note = inputs / "referring_017.txt"
    spoil(note)
    r = run_cmd("nnUNetv2_predict_textguided", "-i", inputs, "-o", out, *PREDICT_ARGS, check=False, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "nnUNetv2_predict_textguided: error: 1 of 8 cases have no usable note" in r.stderr
    assert str(note) in r.stderr and all(e in r.stderr for e in expected), r.stderr[-2000:]
    assert snapshot(out) == before  # nothing written: no prediction, no run record, no dataset.json/plans.json


def extract_output(argv, capsys) -> tuple[int, str, str]:
    """``nnUNetv2_extract_textguided`` in this process: (exit status, stdout, stderr)."""
    from nnunet_textguided.conditioning.extract import main
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def forge_store_entry(entry: Path, array) -> None:
    """Replace a store entry (``<case>.npy``) by ``array`` with a ``<case>.json`` record consistent with it (same source
    hash): what an entry of another encoder or of another volume looks like when copied into the store."""
    import io

    import numpy as np
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data, record = buffer.getvalue(), Path(entry).with_suffix(".json")
    meta = json.loads(record.read_text())
    meta.update(shape=list(array.shape), dtype=str(array.dtype), size=len(data),
                sha256=hashlib.sha256(data).hexdigest())
    Path(entry).write_bytes(data)
    record.write_text(json.dumps(meta, indent=2, sort_keys=True))
