"""`nnUNetv2_predict_textguided`: nnUNetv2_predict with whole-case conditioning.

Same flags as nnUNetv2_predict. For models whose conditioning needs the whole case (BiCLIP paper mode:
embeddings of every full slice), each case's conditioning is computed from its preprocessed data exactly as
the embedding store computed it for training, and positional channels are appended so nnU-Net's sliding
window and test-time mirroring hand every patch the embeddings of its source slices. For all other models
it predicts exactly like nnUNetv2_predict.

Note-guided models (RecLMIS, TGC-Net, MPTPN) read each case's clinical note from ``<CASE>.txt`` beside its
image files in the input folder and encode it exactly as the embedding store encoded the training notes. Every
case is checked first: a case without a note (or with an empty one) stops the run with exit code 2 and the
list of such cases, before anything is written into the output folder. Stock nnUNetv2_predict refuses these
models while it builds the network (it cannot pass notes).

BiCLIP paper-mode models (BiCLIPTrainer, _Net2, _Net3) embed every slice of each test case once (batched; not per
tile or mirror) and take one more flag:

  --embedding_store DIR           keep those slice tables in DIR (e.g. next to the output folder): a rerun on the
                                  same images reads them and makes no encoder call; entries are keyed by the
                                  preprocessed image's sha256 and the encoders' identity, so a changed image or
                                  model is recomputed

Universal (merged, partial-label) models — CDPDNet — take more flags:

  --labels "left kidney, liver"   predict only these labels; each phrase is matched to the model's label
                                  vocabulary by text similarity (conditioning.labels; the match is printed);
                                  an unknown phrase stops with the list of known labels
  --task NAME                     predict under this task's prompt, writing the labels it annotates (or those
                                  of --labels); default: each label under a task that annotated it
  --label-threshold T, --label-margin M, --label-encoder SPEC
                                  similarity threshold (0.7), margin over the runner-up (0.1), sentence encoder
  --save_label_masks              also write one binary mask per label: <output>/label_masks/<case>/<label>.nii.gz

Output form of overlapping labels (organ and its tumour): nnU-Net's region export — one label map per case in
which every label is written with its code in ``regions_class_order`` order (a tumour after its organ, so it
stays visible); a label's mask read from the map is ``isin(map, its region codes)`` (an organ includes its
tumour, but loses voxels where a later label was also predicted). ``--save_label_masks`` instead thresholds each label's own sigmoid probability at 0.5 (overlaps kept, exactly
the network's per-label decision). The selection used is recorded in <output>/textguided_selection.json.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

from ..conditioning.labels import (DEFAULT_LABEL_ENCODER, DEFAULT_MARGIN, DEFAULT_THRESHOLD, match_labels,
                                  split_phrases)
from ..conditioning.notes import NoteConditioner, NoteError, note_path, read_case_notes, warn_truncated_notes
from ..conditioning import slices as slice_embeddings
from ..conditioning.slices import MissingCaseConditioningError, TableSliceConditioner, slice_table, slice_table_identity
from ..conditioning.store import EmbeddingStore, StoreEntryError, StoreWriteError
from ..data.position_channels import position_channels
from ..encoders.base import EncoderSpecError
from ..io import atomic_path, atomic_write_json
from ..settings import SettingsError
from ..training.base import CheckpointError, EncoderMismatchError, describe_encoders, load_checkpoint_file

PROG = "nnUNetv2_predict_textguided"


def _conditioner(network):
    net = getattr(network, "_orig_mod", network)
    return getattr(net, "conditioner", None)


class LabelSelectionError(ValueError):
    pass


class InputImageError(ValueError):
    """An input image that cannot be predicted (NaN or infinite voxels)."""


def check_image(data) -> str | None:
    """'non-finite' (NaN/inf anywhere), 'constant' (one value everywhere) or None, for a case's preprocessed data."""
    if isinstance(data, str):  # nnU-Net hands large cases over as a .npy file
        data = np.load(data, mmap_mode="r")
    t = data if torch.is_tensor(data) else torch.from_numpy(np.ascontiguousarray(data))
    if not bool(torch.isfinite(t).all()):
        return "non-finite"
    if t.numel() and bool(t.amax() == t.amin()):
        return "constant"
    return None


def check_checkpoints(model_folder: str, use_folds, checkpoint_name: str) -> None:
    """Read every checkpoint to be used with ``weights_only=True`` and check that the encoders it was trained with
    are those the model folder's plans.json records (EncoderMismatchError names both and the fix)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    folds = nnUNetPredictor.auto_detect_available_folds(model_folder, checkpoint_name) if use_folds is None \
        else ([use_folds] if isinstance(use_folds, str) else use_folds)
    plans_file = os.path.join(model_folder, "plans.json")
    plans = load_json(plans_file)
    for f in folds:
        path = os.path.join(model_folder, f"fold_{f}", checkpoint_name)
        checkpoint = load_checkpoint_file(path)
        configuration = checkpoint["init_args"]["configuration"]
        saved = checkpoint["init_args"]["plans"]["configurations"][configuration].get("textguided", {})
        folder = plans["configurations"].get(configuration, {}).get("textguided", {})
        if saved.get("encoders", {}) != folder.get("encoders", {}):
            raise EncoderMismatchError(
                f"{path} was trained with encoders {describe_encoders(saved.get('encoders', {}))}, but {plans_file} "
                f"of its model folder records {describe_encoders(folder.get('encoders', {}))}: the checkpoint "
                "belongs to another model folder. Put the checkpoint back into the model folder it was trained in "
                "(or use that folder's plans.json and dataset.json with it)")


class TextGuidedPredictor(nnUNetPredictor):
    #: note-guided networks may be built for this predictor (it passes each case's note); stock nnU-Net's
    #: predictor is refused while building them (training.base._built_for_stock_predictor)
    reads_notes = True
    #: universal models: {"labels": free text or None, "task": name or None, "threshold", "encoder"}
    label_selection: dict | None = None
    #: what the last initialisation selected and which outputs the last run wrote (read by ``main`` after
    #: nnU-Net's entry point returns)
    last_selection: dict | None = None
    last_outputs: list[str] | None = None
    #: paper-mode BiCLIP: where test cases' slice tables are kept (``--embedding_store``; None: computed each run)
    embedding_store: str | None = None
    #: slice tables of this process: computed vs read from the embedding store
    slice_table_counts = {"computed": 0, "stored": 0}

    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds=None,
                                             checkpoint_name: str = "checkpoint_final.pth"):
        """nnU-Net's, after every checkpoint was read safely (``weights_only=True``: a checkpoint that pickles
        arbitrary objects is refused before nnU-Net unpickles it) and checked to belong to this model folder: its
        recorded encoders must be those of the folder's plans.json (a checkpoint copied from another model
        folder would otherwise run with the wrong frozen encoders)."""
        check_checkpoints(model_training_output_dir, use_folds, checkpoint_name)
        super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        if self.label_selection:
            self.selection = self.select_labels(**self.label_selection)
            type(self).last_selection = self.selection

    def predict_from_files(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                           save_probabilities: bool = False, overwrite: bool = True,
                           num_processes_preprocessing: int = default_num_processes,
                           num_processes_segmentation_export: int = default_num_processes,
                           folder_with_segs_from_prev_stage: str = None, num_parts: int = 1, part_id: int = 0):
        """nnU-Net's, after the notes of note-guided models were checked: nnU-Net writes its run record and the
        model's dataset.json / plans.json into the output folder first, and a run that stops for a missing note
        must leave an earlier run's folder as it was. (Same signature as nnU-Net's: it records its own arguments
        by inspecting it.)"""
        self._check_notes_first(list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                                overwrite, num_parts, part_id)
        return super().predict_from_files(list_of_lists_or_source_folder,
                                          output_folder_or_list_of_truncated_output_files, save_probabilities,
                                          overwrite, num_processes_preprocessing, num_processes_segmentation_export,
                                          folder_with_segs_from_prev_stage, num_parts, part_id)

    def _check_notes_first(self, list_of_lists_or_source_folder, outputs, overwrite: bool = True,
                           num_parts: int = 1, part_id: int = 0) -> None:
        """The notes of the cases this run will predict (this part's; with --continue_prediction, those without a
        prediction yet), read before anything is written: NoteError."""
        if not isinstance(_conditioner(self.network), NoteConditioner):
            return
        ending = self.dataset_json["file_ending"]
        lists = list_of_lists_or_source_folder
        if isinstance(lists, str):
            lists = create_lists_from_splitted_dataset_folder(lists, ending)
        lists = lists[part_id::num_parts]
        if not overwrite and isinstance(outputs, str):
            lists = [files for files in lists if not os.path.isfile(
                os.path.join(outputs, os.path.basename(files[0])[:-(len(ending) + 5)] + ending))]
        self.case_note_texts(lists)  # NoteError: nothing written yet

    def _manage_input_and_output_lists(self, *args, **kwargs):
        lists = super()._manage_input_and_output_lists(*args, **kwargs)
        type(self).last_outputs = list(lists[1]) if lists[1] is not None else None  # this run's cases only
        self._inputs_by_output = dict(zip(lists[1], lists[0])) if lists[1] is not None else {}
        if isinstance(_conditioner(self.network), NoteConditioner):
            notes = self.read_case_notes(lists[0])
            # for this run only: the parallel path finds a case's note by its output name, the sequential path
            # (-npp 0 -nps 0) takes them in order
            outputs = list(lists[1]) if lists[1] is not None else [None] * len(notes)
            self._case_notes = {"by_output": {o: n for o, n in zip(outputs, notes) if o is not None},
                                "in_order": list(notes)}
        return lists

    # -- note-guided models ---------------------------------------------------------------------------------
    def read_case_notes(self, list_of_lists: list[list[str]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(tokens (1, L, D), mask (1, L))] of the cases to predict, in order ((1, 2L, D), (1, 2L) for models with
        auxiliary notes): each case's ``<CASE>.txt`` (and, for those models, the optional ``<CASE>.aux.txt``)
        beside its first image file, encoded exactly like the embedding store encodes training notes. Every case
        is checked before anything is predicted; cases without a usable note stop the run (NoteError)."""
        notes, paths = self.case_note_texts(list_of_lists)
        cond = _conditioner(self.network)
        warn_truncated_notes(PROG, cond.spec, notes, paths, cond.max_tokens)
        # one at a time, exactly like the store (bitwise-equal tokens)
        return [cond.encode([notes[c]], self.device) for c in paths]

    def case_note_texts(self, list_of_lists: list[list[str]]) -> tuple[dict, dict]:
        """({case: note}, {case: note file}) of the cases to predict; NoteError lists every case without a usable
        note."""
        ending = self.dataset_json["file_ending"]
        paths = {}
        for files in list_of_lists:
            case = os.path.basename(files[0])[:-(len(ending) + 5)]
            paths[case] = note_path(os.path.dirname(files[0]), case)
        return read_case_notes(paths, _conditioner(self.network).aux), paths

    def set_note(self, text: str, aux: str | None = None) -> None:
        """For the in-memory APIs (predict_single_npy_array ...): the note (and auxiliary note, for models that
        read them) of the next case(s) predicted."""
        cond = _conditioner(self.network)
        if not isinstance(cond, NoteConditioner):
            raise ValueError("this model does not read notes")
        note = " ".join(str(text).split())
        if cond.aux:
            extra = None if aux is None else " ".join(str(aux).split())
            if extra == "":
                raise ValueError("empty auxiliary note: pass aux=None for a case without one")
            note = (note, extra)
        elif aux is not None:
            raise ValueError("this model reads no auxiliary notes")
        cond.set_notes(*cond.encode([note], self.device))

    def predict_from_data_iterator(self, data_iterator, *args, **kwargs):
        """nnU-Net's, with each case's note set (note-guided models) and cases whose image holds NaN or inf
        skipped: the other cases are predicted, then the run stops with InputImageError naming the skipped ones
        (nothing is written for them, so an earlier prediction of such a case stays as it was)."""
        notes = self.__dict__.pop("_case_notes", None)
        skipped: list[str] = []
        data_iterator = self._finite_cases(data_iterator, skipped)
        if notes is not None:
            data_iterator = self._with_notes(data_iterator, notes)
        result = super().predict_from_data_iterator(data_iterator, *args, **kwargs)
        if skipped:
            raise InputImageError(f"{len(skipped)} case(s) were not predicted because their image holds NaN or "
                                  f"infinite values: {'; '.join(skipped)}. Replace those voxels (e.g. by the "
                                  "background intensity) and predict these cases again; the other cases were "
                                  "predicted")
        return result

    def _finite_cases(self, data_iterator, skipped: list[str]):
        for item in data_iterator:
            problem = check_image(item["data"])
            files = self.__dict__.get("_inputs_by_output", {}).get(item.get("ofile"))
            where = ", ".join(files) if files else (item.get("ofile") or "the input image")
            if problem == "non-finite":
                skipped.append(where)
                continue
            if problem == "constant":
                print(f"{PROG}: warning: {where} is constant (every voxel has the same value); its prediction says "
                      "nothing about the image: check the file", file=sys.stderr)
            yield item

    def _with_notes(self, data_iterator, notes):
        """Set each case's note just before nnU-Net predicts it (the loop pulls one case at a time)."""
        cond = _conditioner(self.network)
        order = iter(notes["in_order"])
        for item in data_iterator:
            ofile = item.get("ofile")
            note = notes["by_output"].get(ofile) if ofile is not None else next(order, None)
            if note is None:
                raise NoteError(f"no note was read for the case written to {ofile}")
            cond.set_notes(*note)
            yield item
        cond.set_notes(None)

    def predict_from_files_sequential(self, list_of_lists_or_source_folder,
                                      output_folder_or_list_of_truncated_output_files,
                                      save_probabilities: bool = False, overwrite: bool = True,
                                      folder_with_segs_from_prev_stage: str = None):
        """nnU-Net's sequential path (-npp 0 -nps 0): cases are predicted in list order, one call of
        ``predict_logits_from_preprocessed_data`` each, which takes the next note. (Same signature as nnU-Net's:
        it records its own arguments by inspecting this method's signature.)"""
        self._check_notes_first(list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                                overwrite)
        self._sequential, self._sequential_index = True, 0
        try:
            return super().predict_from_files_sequential(
                list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files, save_probabilities,
                overwrite, folder_with_segs_from_prev_stage)
        finally:
            self._sequential = False
            self.__dict__.pop("_case_notes", None)

    def select_labels(self, labels: str | None = None, task: str | None = None,
                      threshold: float = DEFAULT_THRESHOLD, margin: float = DEFAULT_MARGIN,
                      encoder: str = DEFAULT_LABEL_ENCODER) -> dict:
        """Route a universal model's labels to tasks and pick the labels to write (see module docstring)."""
        from ..data.merge import route_labels
        settings = self.configuration_manager.configuration.get("textguided", {})
        net = getattr(self.network, "_orig_mod", self.network)
        if "task_labels" not in settings or not hasattr(net, "set_label_tasks"):
            raise LabelSelectionError("--labels / --task apply to universal models trained on a merged dataset "
                                      "(CDPDNetTrainer); this model predicts a fixed label set")
        if task is not None and not settings.get("use_ttpg", True):
            raise LabelSelectionError(f"--task: this model ({settings.get('method')} without TTPG) has no task "
                                      "prompts; predict without --task")
        vocab, tasks, task_labels = settings["labels"], settings["tasks"], settings["task_labels"]
        synonyms = (self.dataset_json.get("textguided_universal") or {}).get("synonyms")
        matches = []
        if labels is not None:
            phrases = split_phrases(labels)
            if not phrases:
                raise LabelSelectionError(f"--labels {labels!r} names no label; known labels: {', '.join(vocab)}")
            matches = match_labels(phrases, vocab, encoder, threshold, margin, synonyms)
            for m in matches:
                print(f"{PROG}: label {m.describe()}")
        asked = [l for l in vocab if l in {m.label for m in matches}] if matches else None
        if task is not None:
            lower = {t.lower(): i for i, t in enumerate(tasks)}
            if task.lower() not in lower:
                raise LabelSelectionError(f"--task {task!r} is not a task of this model; tasks: {', '.join(tasks)}")
            t = lower[task.lower()]
            routing = [t] * len(vocab)
            # the task's prompt was trained only on its own labels: write those unless --labels asks for others
            wanted = asked or [l for l in vocab if l in task_labels[t]]
            foreign = [l for l in wanted if l not in task_labels[t]]
            if foreign:
                print(f"{PROG}: warning: task '{tasks[t]}' never annotated {', '.join(foreign)}; their prediction "
                      "under its prompt was not trained (drop --task to use a task that annotated them)")
        else:
            wanted = asked or list(vocab)
            routing = route_labels(task_labels, vocab, wanted)
            print(f"{PROG}: the input cases' source datasets are unknown here: each label goes to a task that "
                  "annotated it (the fewest tasks covering the labels; --task NAME chooses one, and "
                  "`nnunet-textguided evaluate-universal` predicts a source's test set under its own tasks)")
        net.set_label_tasks(routing)
        for t in sorted({routing[vocab.index(l)] for l in wanted}):
            print(f"{PROG}: task '{tasks[t]}' predicts " + ", ".join(l for l in wanted if routing[vocab.index(l)] == t))
        return {"labels": wanted, "channels": [vocab.index(l) for l in wanted],
                "matches": [m.__dict__ for m in matches], "routing": {l: tasks[routing[i]] for i, l in enumerate(vocab)}}

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        if check_image(data) == "non-finite":  # the sequential path (stops at the case) and the in-memory APIs
            where = "the image to predict"
            if getattr(self, "_sequential", False):
                inputs = list(self.__dict__.get("_inputs_by_output", {}).values())
                if self._sequential_index < len(inputs):
                    where = ", ".join(inputs[self._sequential_index])
            raise InputImageError(f"{where} holds NaN or infinite values; replace those voxels (e.g. by the "
                                  "background intensity) and predict it again")
        if getattr(self, "_sequential", False):
            self._sequential_index += 1
        cond = _conditioner(self.network)
        if getattr(self, "_sequential", False) and "_case_notes" in self.__dict__:
            cond.set_notes(*self._case_notes["in_order"].pop(0))
        if isinstance(cond, TableSliceConditioner):
            data = torch.as_tensor(np.asarray(data)) if not torch.is_tensor(data) else data
            cond.set_tables({0: self.case_slice_tables(cond, data)})  # once per case, before tiles and mirrors
            # the case's positional channels; appended to each tile as the sliding window hands it over
            self._case_positions = position_channels(0, tuple(data.shape[1:]))
        try:
            logits = super().predict_logits_from_preprocessed_data(data)
        finally:
            self.__dict__.pop("_case_positions", None)
        selection = getattr(self, "selection", None)
        if selection and len(selection["channels"]) < logits.shape[0]:
            drop = [c for c in range(logits.shape[0]) if c not in selection["channels"]]
            with torch.inference_mode():  # the logits are inference tensors
                logits[drop] = -1e4  # sigmoid -> 0: unselected labels are never written
        return logits

    # -- paper-mode positions, tile by tile ------------------------------------------------------------------
    # nnU-Net's sliding window copies each tile in a prefetch thread; tiles of the image alone keep that copy as
    # cheap as for any model (a tile with two more channels crossed torch's parallel-copy threshold at small
    # patches, and the copy's thread team then competed with the forward for the cores: +40 % per case on 2 CPU
    # cores). The two channels are appended to the tile in the main thread instead, before nnU-Net's test-time
    # mirroring, which flips them with the image exactly as before.
    def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device: bool = True):
        positions = self.__dict__.get("_case_positions")
        if positions is None:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        # padded like the image (predict_sliding_window_return_logits pads to at least one patch): validity 0 there
        padded = pad_nd_image(torch.from_numpy(positions), self.configuration_manager.patch_size, "constant",
                              {"value": 0}, False, None)
        if tuple(padded.shape[1:]) != tuple(data.shape[1:]):
            raise RuntimeError(f"positional channels {tuple(padded.shape)} do not match the padded image "
                               f"{tuple(data.shape)}")
        self._tiles = {"positions": padded, "slicers": list(slicers), "next": 0}
        try:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        finally:
            self.__dict__.pop("_tiles", None)

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        tiles = self.__dict__.get("_tiles")
        if tiles is not None:
            # nnU-Net predicts the tiles in slicer order, one call each (its prefetch queue is FIFO)
            sl = tiles["slicers"][tiles["next"]]
            tiles["next"] += 1
            pos = tiles["positions"][sl][None]
            if tuple(pos.shape[2:]) != tuple(x.shape[2:]):
                raise RuntimeError(f"tile {tiles['next'] - 1} has shape {tuple(x.shape)}, its slicer {sl} another")
            x = torch.cat((x, pos.to(x.device, x.dtype)), 1)
        return super()._internal_maybe_mirror_and_predict(x)

    def case_slice_tables(self, cond: TableSliceConditioner, data: torch.Tensor) -> dict[str, torch.Tensor]:
        """{stream: (D + 1, E) table} of one preprocessed case (C, D, H, W): from ``embedding_store`` when it holds
        this image's tables for these encoders, else computed (and stored there, if set)."""
        counts = type(self).slice_table_counts
        if self.embedding_store is None:
            counts["computed"] += len(cond.streams)
            return cond.compute_tables(data, device=self.device)
        import hashlib
        image = np.ascontiguousarray(data[0].detach().cpu().numpy().astype(np.float32, copy=False))
        source = hashlib.sha256(image.tobytes()).hexdigest()
        entry, expected = f"image_{source[:24]}", (data.shape[1] + 1, None)
        records = self.configuration_manager.configuration["textguided"]["encoders"]
        tables = {}
        for stream in cond.streams:
            store = EmbeddingStore(self.embedding_store, f"slices_{stream.name}",
                                   slice_table_identity(stream, cond.window, records),
                                   command=f"{PROG} ... --embedding_store {self.embedding_store}")
            if store.is_current(entry, source, expected):
                tables[stream.name] = torch.from_numpy(store.load(entry, expected))
                counts["stored"] += 1
                continue
            table = slice_table(data, stream, cond.window, device=self.device)
            store.save(entry, table.numpy(), source)
            tables[stream.name] = table
            counts["computed"] += 1
        return tables


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def save_label_masks(output_folder: str, cases: list[str], labels: list[str] | None = None) -> int:
    """One binary mask per label for each case of ``cases`` in ``output_folder``. Universal (region) models:
    from the sigmoid probabilities nnU-Net saved beside each label map (``<case>.npz``, channel k = label k,
    ``p > 0.5``: the network's own per-label decision, overlaps kept), else from the map (``isin(map, region
    codes)``: a label overwritten by a later one in ``regions_class_order`` loses those voxels). Label models
    (softmax): ``map == code``."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    dj = load_json(os.path.join(output_folder, "dataset.json"))
    ending = dj["file_ending"]
    files = [os.path.join(output_folder, c + ending) for c in cases if os.path.isfile(os.path.join(output_folder, c + ending))]
    if not files:
        raise FileNotFoundError(f"--save_label_masks: no prediction ending in {ending} in {output_folder}")
    regions = {name: [int(v) for v in (r if isinstance(r, (list, tuple)) else [r])]
               for name, r in dj["labels"].items() if name not in ("background", "ignore")}
    has_regions = any(len(r) > 1 for r in regions.values())
    channel = {name: k for k, name in enumerate(regions)}
    names = [n for n in regions if labels is None or n in labels]
    rw = determine_reader_writer_from_dataset_json(dj, files[0])()
    n = 0
    for f in files:
        case = os.path.basename(f)[:-len(ending)]
        seg, props = rw.read_seg(f)
        probs_file = os.path.join(output_folder, case + ".npz")
        probs = np.load(probs_file)["probabilities"] if has_regions and os.path.isfile(probs_file) else None
        case_dir = os.path.join(output_folder, "label_masks", case)
        os.makedirs(case_dir, exist_ok=True)
        for name in names:
            if probs is not None:
                mask = probs[channel[name]] > 0.5
            else:
                mask = np.isin(seg[0], regions[name])
            with atomic_path(os.path.join(case_dir, _slug(name) + ending), suffix=ending) as tmp:
                rw.write_seg(mask.astype(np.uint8), tmp, props)
            n += 1
    return n


def _split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--labels")
    p.add_argument("--task")
    p.add_argument("--label-threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--label-margin", type=float, default=DEFAULT_MARGIN)
    p.add_argument("--label-encoder", default=DEFAULT_LABEL_ENCODER)
    p.add_argument("--save_label_masks", action="store_true")
    p.add_argument("--embedding_store")
    p.add_argument("-o")
    ours, rest = p.parse_known_args(argv)
    if ours.o is not None:
        rest += ["-o", ours.o]
    return ours, rest


def input_problem(argv: list[str]) -> str | None:
    """What makes nnUNetv2_predict's arguments unusable before anything runs (an unknown dataset, a model folder
    that does not exist, a missing input folder), in one line; None if nothing."""
    from ..data.names import DatasetNotFoundError, dataset_name

    def value(flag, default=None):
        return argv[argv.index(flag) + 1] if flag in argv[:-1] else default
    if value("-i") is not None and not os.path.isdir(value("-i")):
        return f"input folder {value('-i')} does not exist (-i: the folder with the images to predict)"
    if value("-d") is None or value("-c") is None:
        return None  # nnU-Net's parser names the missing arguments
    try:
        name = dataset_name(value("-d"), ("nnUNet_results",), "train a model on it first")
    except DatasetNotFoundError as e:
        return str(e)
    results = Path(os.environ["nnUNet_results"], name)
    model = f"{value('-tr', 'nnUNetTrainer')}__{value('-p', 'nnUNetPlans')}__{value('-c')}"
    if not (results / model).is_dir():
        there = sorted(p.name for p in results.iterdir() if p.is_dir() and p.name.count("__") == 2)
        return (f"no model {model} in {results} (models there: {', '.join(there) or 'none'}); check -tr, -p and -c, "
                "or train it with nnUNetv2_train")
    return None


def main() -> None:
    # nnU-Net's own entry point and argument parser, with this predictor class in place of nnUNetPredictor
    # (changed in this process only), so every flag behaves exactly as in nnUNetv2_predict; the flags of
    # universal models are taken off argv first.
    import nnunetv2.inference.predict_from_raw_data as stock
    # the long form every other command of the package accepts beside nnU-Net's -device
    ours, rest = _split_argv(["-device" if a == "--device" else a for a in sys.argv[1:]])
    if "-h" in rest or "--help" in rest:
        print(__doc__)
    # per-label masks come from the probabilities: have nnU-Net save them, and remove them afterwards unless
    # they were asked for
    added_probabilities = ours.save_label_masks and "--save_probabilities" not in rest
    if added_probabilities:
        rest.append("--save_probabilities")
    TextGuidedPredictor.label_selection = (
        {"labels": ours.labels, "task": ours.task, "threshold": ours.label_threshold, "margin": ours.label_margin,
         "encoder": ours.label_encoder}
        if ours.labels is not None or ours.task is not None else None)
    TextGuidedPredictor.embedding_store = ours.embedding_store
    stock.nnUNetPredictor = TextGuidedPredictor
    sys.argv = [PROG] + rest
    encoder_calls = dict(slice_embeddings.ENCODER_CALLS)
    if not ("-h" in rest or "--help" in rest):
        problem = input_problem(rest)  # nnU-Net's own checks end these in a traceback
        if problem:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
            sys.exit(2)
    try:
        stock.predict_entry_point()
    except (LabelSelectionError, NoteError, InputImageError, EncoderMismatchError, CheckpointError, SettingsError,
            EncoderSpecError, StoreWriteError, StoreEntryError, MissingCaseConditioningError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:  # UnknownLabelError
        if type(e).__name__ != "UnknownLabelError":
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    counts = TextGuidedPredictor.slice_table_counts
    if counts["computed"] or counts["stored"]:
        calls = {k: v - encoder_calls.get(k, 0) for k, v in slice_embeddings.ENCODER_CALLS.items()}
        print(f"{PROG}: slice tables: {counts['computed']} computed, {counts['stored']} read from the embedding store"
              f" ({sum(calls.values())} slices through the frozen encoders)")
    selection = TextGuidedPredictor.last_selection
    if ours.o and selection:
        atomic_write_json(os.path.join(ours.o, "textguided_selection.json"),
                          {"labels_argument": ours.labels, "task_argument": ours.task,
                           "threshold": ours.label_threshold, "margin": ours.label_margin,
                           "label_encoder": ours.label_encoder, **selection})
    if ours.save_label_masks and ours.o:
        cases = [os.path.basename(f) for f in TextGuidedPredictor.last_outputs or []]
        try:
            n = save_label_masks(ours.o, cases, selection["labels"] if selection else None)
        except FileNotFoundError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"{PROG}: wrote {n} per-label masks to {os.path.join(ours.o, 'label_masks')}")
        if added_probabilities:  # only the files this run added
            for case in cases:
                for ext in (".npz", ".pkl"):
                    if os.path.isfile(os.path.join(ours.o, case + ext)):
                        os.remove(os.path.join(ours.o, case + ext))


if __name__ == "__main__":
    main()
