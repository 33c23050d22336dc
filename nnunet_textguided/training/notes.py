"""The shared base of the note-guided 2D trainers (RecLMIS; TGC-Net and MPTPN build on it).

What it adds to TextGuidedTrainer:
- the note store: every training case's ``<CASE>.txt`` (in ``nnUNet_raw/<Dataset>/imagesTr``) encoded once by the
  frozen text encoder into token states (``conditioning.notes``), kept in the embedding store next to the
  preprocessed data (``nnUNetv2_extract_textguided``, or lazily at training start). A case is recomputed when
  its note changes (the store keys each case by the note's sha256) or the encoder/max length changes (another
  store folder);
- batches: before each training / validation step the notes of ``batch['keys']`` are handed to the network's
  NoteConditioner; the end-of-training validation hands over each validation case's note before its sliding
  window;
- inference: the network refuses to run without notes (stock ``nnUNetv2_predict`` stops with the name of
  ``nnUNetv2_predict_textguided``, which reads each new case's sidecar and encodes it with the same function).

Settings (``settings.NoteSettings`` and each method's schema): ``text_encoder`` and ``max_tokens``; no mirroring
by default (``mirror_axes``: notes name sides).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from tqdm import tqdm

from ..conditioning.notes import NoteConditioner, NoteError, note_path, note_sha256, pack_note, read_case_notes, \
    truncated_notes, unpack_note, warn_truncated_notes
from ..conditioning.store import EmbeddingStore, extract_command
from ..conditioning.slices import get_encoder
from .base import CaseLoadHookDatasetClass, TextGuidedTrainer, check_and_record_encoders

MAX_ROTATION = 15.0 / 180.0 * np.pi


def token_dim(settings: dict) -> int:
    """Width D of the note's token states (CLIP's projected tokens: the embed dim; BERT/MiniLM: hidden)."""
    spec = settings["text_encoder"]
    if torch.get_default_device().type == "meta":  # counting: no encoder is loaded
        return int(settings["encoders"][spec]["embed_dim"])
    d = get_encoder(spec).token_dim
    if d is None:
        raise ValueError(f"text encoder {spec!r} gives no per-token states; note-guided models need a text tower with "
                         "token outputs (openclip CLIP text, hf BERT-style, minilm)")
    return int(d)


class NoteGuidedTrainer(TextGuidedTrainer):
    tiny_preset = "2d_tiny"
    spatial_dims = 2  # one note per 2D image
    configuration_hint = "2d, 2d_tiny, 2d_reclmis_paper"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # notes name positions ("lower right lung"): nnU-Net's foreground oversampling re-centres a patch on the
        # lesion and would make the note wrong; patches keep their place in the image
        self.oversample_foreground_percent = 0.0

    @classmethod
    def reads_aux_notes(cls, settings) -> bool:
        """Whether the model reads ``<CASE>.aux.txt`` too (TGC-Net's DATE): the store then holds (note,
        auxiliary note) per case."""
        return False

    @classmethod
    def note_settings(cls, settings) -> dict:
        spec = settings.text_encoder
        aux = {"aux_notes": True} if cls.reads_aux_notes(settings) else {}
        return {"notes": True, "text_encoder": spec, "max_tokens": settings.max_tokens, **aux,
                "encoders": {spec: {}}, "encoder_use": {spec: {"role": "case notes", "towers": ["text"]}}}

    # -- the note store -----------------------------------------------------------------------------------
    def notes_folder(self) -> str:
        from nnunetv2.paths import nnUNet_raw
        if nnUNet_raw is None:
            raise NoteError("nnUNet_raw is not set: the training notes are read from "
                            f"$nnUNet_raw/{self.plans_manager.dataset_name}/imagesTr/<CASE>.txt")
        return os.path.join(nnUNet_raw, self.plans_manager.dataset_name, "imagesTr")

    def note_store(self) -> EmbeddingStore:
        s = self.textguided
        identity = {"kind": "note_tokens", "encoder": s["text_encoder"], "max_tokens": s["max_tokens"],
                    "weight_hash": s["encoders"][s["text_encoder"]].get("weight_hash")}
        if s.get("aux_notes"):
            identity["aux_notes"] = True
        tokens = s["max_tokens"] * (2 if s.get("aux_notes") else 1)
        return EmbeddingStore(self.preprocessed_dataset_folder, "notes", identity, command=extract_command(self),
                              entry_shape=(tokens, None))

    def read_training_notes(self, cases: list[str]) -> dict:
        """{case: note} ({case: (note, auxiliary note or None)} with ``aux_notes``) from the raw dataset; one error
        listing every case without a usable note."""
        folder = self.notes_folder()
        return read_case_notes({c: note_path(folder, c) for c in cases}, bool(self.textguided.get("aux_notes")),
                               "training cases")

    def note_encoder(self) -> NoteConditioner:
        """Encodes notes for the store exactly as the network's conditioner encodes them for a new case."""
        s = self.textguided
        return NoteConditioner(s["text_encoder"], s["max_tokens"], 0, aux=bool(s.get("aux_notes")))

    def extract(self, cases=None, num_parts: int = 1, part_id: int = 0, progress: bool = True) -> dict:
        """Encode missing or changed notes into the store. Returns counts {'computed', 'skipped'}."""
        check_and_record_encoders(self.textguided)
        cases = sorted(cases or self.all_case_identifiers())[part_id::num_parts]
        notes = self.read_training_notes(cases)  # every note checked before anything is computed
        store = self.note_store()
        todo = [c for c in cases if not store.is_current(c, note_sha256(notes[c]))]
        s = self.textguided
        if todo:
            warn_truncated_notes(type(self).__name__, s["text_encoder"], {c: notes[c] for c in todo},
                                 {c: note_path(self.notes_folder(), c) for c in todo}, s["max_tokens"])
        limit, truncated = truncated_notes(s["text_encoder"], notes, s["max_tokens"])
        encoder = self.note_encoder()
        # one note at a time, exactly as nnUNetv2_predict_textguided encodes a new case: batched matmuls may
        # differ in the last bits, and training and inference must see bitwise-equal tokens
        for c in tqdm(todo, desc="note tokens", disable=not progress or not todo):
            states, mask = encoder.encode([notes[c]], self.device)
            store.save(c, pack_note(states[0], mask[0]), note_sha256(notes[c]))
        return {"computed": len(todo), "skipped": len(cases) - len(todo), "token_limit": limit,
                "truncated": truncated}

    def _register_notes(self) -> None:
        cases = self.all_case_identifiers()
        check_and_record_encoders(self.textguided)  # the store's identity holds the encoder's weight hash
        store = self.note_store()
        if os.path.isdir(self.notes_folder()):
            counts = self.extract(cases, progress=False)
            if counts["computed"]:
                self.print_to_log_file(f"note tokens: {counts['computed']} cases encoded into {store.root}")
            if counts["truncated"]:  # every run, also when the store was already complete (no extraction warning)
                longest = max(counts["truncated"].values())
                self.print_to_log_file(
                    f"WARNING: {len(counts['truncated'])} of {len(cases)} training notes are longer than the "
                    f"{counts['token_limit']} tokens this model reads (max_tokens {self.textguided['max_tokens']}); "
                    f"their ends are never seen. The longest has {longest} tokens: nnunet-textguided add-config ... "
                    f"--set max_tokens={longest} reads every note", also_print_to_console=True)
        elif all(store.has(c) for c in cases):
            self.print_to_log_file(f"WARNING: {self.notes_folder()} not found; using the stored note tokens of "
                                   f"{store.root} without checking them against the notes")
        else:
            raise NoteError(f"{self.notes_folder()} not found and the note store {store.root} is incomplete: set "
                            "nnUNet_raw to the folder holding this dataset's raw data (with <CASE>.txt notes)")
        self._notes = {c: unpack_note(store.load(c)) for c in cases}

    def set_case_notes(self, keys) -> None:
        """Hand the notes of these cases (one per sample, in order) to the network."""
        if not getattr(self, "_notes", None):
            self._register_notes()
        missing = [k for k in keys if k not in self._notes]
        if missing:
            raise KeyError(f"no stored note for case {missing[0]}; run nnUNetv2_extract_textguided -d "
                           f"{self.plans_manager.dataset_name} -c {self.configuration_name} -tr {type(self).__name__}")
        tokens = torch.stack([self._notes[k][0] for k in keys]).to(self.device)
        mask = torch.stack([self._notes[k][1] for k in keys]).to(self.device)
        if self.network is not None and self.network.training:
            tokens, mask = self.augment_notes(tokens, mask)
        self.note_conditioner().set_notes(tokens, mask)

    def augment_notes(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batches only: a trainer may alter the notes it hands over (TGC-Net drops auxiliary notes)."""
        return tokens, mask

    @contextmanager
    def case_notes(self, keys):
        """The notes of ``keys`` set on the network for the duration of the block."""
        self.set_case_notes(list(keys))
        try:
            yield
        finally:
            self.note_conditioner().set_notes(None)

    def note_conditioner(self) -> NoteConditioner:
        return self.bare_network().conditioner

    # -- nnU-Net hooks ------------------------------------------------------------------------------------
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """Notes name sides and positions ("all left lung and lower right lung"): no mirroring (training or
        test time; setting ``mirror_axes``, default none) and rotations within +-15 degrees instead of nnU-Net's
        +-180 for square 2D patches, so an augmented image still matches its note."""
        _, dummy2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        rotation = (-MAX_ROTATION, MAX_ROTATION)
        patch = self.configuration_manager.patch_size
        initial = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
        return rotation, dummy2d, initial, mirror_axes

    def on_train_start(self):
        super().on_train_start()
        self._register_notes()

    def train_step(self, batch: dict) -> dict:
        with self.case_notes(batch["keys"]):
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with self.case_notes(batch["keys"]):
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's validation, with each case's note set when nnU-Net loads the case (just before its
        sliding window)."""
        base = self.dataset_class
        self.dataset_class = CaseLoadHookDatasetClass(base, lambda k: self.set_case_notes([k]))
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = base
            self.note_conditioner().set_notes(None)
