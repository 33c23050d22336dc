"""Per-case clinical notes: ``<CASE>.txt`` sidecars -> frozen token states, one path for training and inference.

Consistency rule (DESIGN.md): a note is read (:func:`read_note`) and encoded (:func:`encode_notes`) by the same
two functions when the embedding store is filled for training and when ``nnUNetv2_predict_textguided`` meets a
new case, so a network sees exactly the same tokens for the same note in both.

Encoding: the frozen text encoder's per-token states (``FrozenEncoder.token_states``: CLIP's
``ln_final(x) @ text_projection`` for every token, the RecLMIS text features; BERT/MiniLM last hidden states),
cropped or zero-padded to ``max_tokens`` (18 in RecLMIS for QaTa-COV19/MosMedData+, 10 for MoNuSeg), with a
mask of the real tokens. In the store one case is one (max_tokens, D + 1) float32 array: the states and, in the
last column, the mask (1/0).

Auxiliary notes (TGC-Net's DATE): ``<CASE>.aux.txt`` beside the note, optional per case. A conditioner built with
``aux=True`` takes (note, auxiliary note or None) pairs: both are encoded the same way and stacked along the
token axis, (2 * max_tokens, D + 1) in the store; a missing auxiliary note is all-zero states with an all-False
mask. The store keys such a case by the sha256 of both texts, so adding, editing or deleting an auxiliary note
recomputes the case.

Networks get the note of each sample through a :class:`NoteConditioner` (unregistered, like every conditioner:
not in checkpoints or the optimizer): the trainer sets the batch's notes from its case keys before each step, the
predictor sets the case's note before the sliding window. A forward without notes stops with the name of the
note-aware command: stock ``nnUNetv2_predict`` never silently predicts without the note.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .slices import get_encoder

NOTE_SUFFIX = ".txt"
AUX_SUFFIX = ".aux.txt"


class NoteError(ValueError):
    """A case without a usable note (missing, empty, not UTF-8)."""


NOTES_REQUIRED = ("this model segments each image with its clinical note, and no note was given. Predict with "
                  "nnUNetv2_predict_textguided (same flags as nnUNetv2_predict) and put each case's note as "
                  f"<CASE>{NOTE_SUFFIX} beside its images; stock nnUNetv2_predict cannot pass notes")


class NotesRequiredError(Exception):
    """A note-guided network called without notes. Not a RuntimeError: nnU-Net's sliding window takes those
    for out-of-memory errors and retries on the CPU."""


def note_path(folder: str | os.PathLike, case: str) -> Path:
    return Path(folder) / f"{case}{NOTE_SUFFIX}"


def aux_note_path(folder: str | os.PathLike, case: str) -> Path:
    return Path(folder) / f"{case}{AUX_SUFFIX}"


def read_note(path: str | os.PathLike) -> str:
    """The note of a case: UTF-8 text with whitespace runs (newlines included) collapsed to single spaces."""
    path = Path(path)
    if not path.is_file():
        raise NoteError(f"no note for case '{path.name[:-len(NOTE_SUFFIX)]}': {path} does not exist. This model "
                        f"segments with each image's clinical note: write it as <CASE>{NOTE_SUFFIX} (UTF-8) beside "
                        "the case's image files")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NoteError(f"{path} is not UTF-8 text ({e}); save the note as UTF-8") from None
    text = " ".join(text.split())
    if not text:
        raise NoteError(f"{path} is empty; write the case's clinical note into it")
    return text


def read_notes(paths: dict[str, str | os.PathLike], what: str = "cases") -> dict[str, str]:
    """{case: note} for {case: note file}; every case is checked first and one NoteError lists those without a
    usable note (the first three with their reason), so nothing is computed for a partly annotated folder."""
    notes, problems = {}, []
    for case, path in paths.items():
        try:
            notes[case] = read_note(path)
        except NoteError as e:
            problems.append(str(e))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise NoteError(f"{len(problems)} of {len(paths)} {what} have no usable note: " + "; ".join(problems[:3])
                        + more)
    return notes


def read_case_notes(paths: dict[str, str | os.PathLike], aux: bool = False, what: str = "cases") -> dict:
    """{case: note} (``aux``: {case: (note, auxiliary note or None)}) for {case: note file}. Notes are required
    (``read_notes``); an auxiliary note ``<CASE>.aux.txt`` is optional, but one that exists must be usable."""
    notes = read_notes(paths, what)
    if not aux:
        return notes
    aux_paths = {c: aux_note_path(Path(p).parent, c) for c, p in paths.items()}
    try:
        present = read_notes({c: p for c, p in aux_paths.items() if p.is_file()}, f"auxiliary notes of {what}")
    except NoteError as e:
        raise NoteError(f"{e}. Auxiliary notes are optional: fill such a file or delete it") from None
    return {c: (notes[c], present.get(c)) for c in paths}


def note_sha256(note: str | tuple[str, str | None]) -> str:
    """Store key of a case's note; (note, auxiliary) pairs hash both (a pair without auxiliary hashes like the
    note alone)."""
    if isinstance(note, tuple):
        text, extra = note
        note = text if extra is None else f"{text}\x00aux\x00{extra}"
    return hashlib.sha256(note.encode("utf-8")).hexdigest()


def truncated_notes(spec: str, notes: dict, max_tokens: int) -> tuple[int, dict[str, int]]:
    """(L, {case: token count}) for the notes of ``notes`` ({case: note or (note, auxiliary)}) longer than the L =
    min(max_tokens, encoder context) tokens a model reads. The truncation rule (``token_states``): a note keeps
    its first L tokens with its end token in the last kept position; the rest is never seen by the model."""
    enc = get_encoder(spec, device=None)  # tokenising only: the shared encoder stays where it is
    limit = min(int(max_tokens), enc.context_length or int(max_tokens))
    counts = {}
    for case, note in notes.items():
        n = max(enc.token_count(t) for t in (note if isinstance(note, tuple) else (note,)) if t is not None)
        if n > limit:
            counts[case] = n
    return limit, counts


def warn_truncated_notes(prog: str, spec: str, notes: dict, paths: dict, max_tokens: int, file=None) -> list[str]:
    """Print one warning naming the notes (case, file, token count) that ``token_states`` truncates; returns
    their cases."""
    import sys
    limit, counts = truncated_notes(spec, notes, max_tokens)
    if counts:
        listed = ", ".join(f"{c} ({paths[c]}, {n} tokens)" for c, n in list(counts.items())[:5])
        more = f" (and {len(counts) - 5} more)" if len(counts) > 5 else ""
        print(f"{prog}: warning: {len(counts)} of {len(notes)} notes are longer than the {limit} tokens this model "
              f"reads (max_tokens {max_tokens}, encoder '{spec}'); each keeps its first {limit} tokens, ending with "
              f"its end token, and the rest is not seen: {listed}{more}. Shorten these notes, or train with a larger "
              f"max_tokens setting: nnunet-textguided add-config ... --set max_tokens={max(counts.values())} reads "
              "every one of them", file=file or sys.stderr)
    return list(counts)


def encode_notes(spec: str, texts: list[str], max_tokens: int, device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Notes -> (n, max_tokens, D) float32 token states (zero past each note's tokens) and (n, max_tokens) bool."""
    states, mask = get_encoder(spec, device).token_states(list(texts), max_length=int(max_tokens))
    return states.float(), mask.bool()


def pack_note(states: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """(L, D) states + (L,) mask -> (L, D + 1) float32 array for the store."""
    return torch.cat((states.float(), mask.float()[:, None]), 1).cpu().numpy()


def unpack_note(array: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(np.asarray(array, dtype=np.float32))
    return t[:, :-1], t[:, -1] > 0.5


class NoteConditioner:
    """x -> (x, {"tokens": (B, L, D), "mask": (B, L)}) from the notes set for the current batch or case.

    ``set_notes`` takes one note per sample of the coming batch, or a single note (first dimension 1) that is
    used for every patch of a case (sliding window, mirroring). With ``aux`` the notes set are (B, 2L, D) (note,
    then auxiliary note) and the output adds ``"aux_tokens"`` and ``"aux_mask"``.
    """

    def __init__(self, spec: str, max_tokens: int, token_dim: int, aux: bool = False):
        self.spec, self.max_tokens, self.token_dim, self.aux = spec, int(max_tokens), int(token_dim), bool(aux)
        self.tokens: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def set_notes(self, tokens: torch.Tensor | None, mask: torch.Tensor | None = None) -> None:
        if tokens is not None and (tokens.ndim != 3 or mask is None or mask.shape != tokens.shape[:2]):
            raise ValueError(f"notes must be (B, L, D) states with a (B, L) mask, got {tuple(tokens.shape)} and "
                             f"{None if mask is None else tuple(mask.shape)}")
        self.tokens, self.mask = tokens, mask

    def encode(self, notes: list, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Notes (``aux``: (note, auxiliary or None) pairs) -> (n, L or 2L, D) states and (n, L or 2L) mask."""
        if not self.aux:
            return encode_notes(self.spec, notes, self.max_tokens, device)
        states, mask = encode_notes(self.spec, [n for n, _ in notes], self.max_tokens, device)
        extra = [(i, a) for i, (_, a) in enumerate(notes) if a is not None]
        aux_states, aux_mask = torch.zeros_like(states), torch.zeros_like(mask)
        for i, a in extra:  # one note at a time: bitwise equal to what the store computed for the case
            aux_states[i:i + 1], aux_mask[i:i + 1] = encode_notes(self.spec, [a], self.max_tokens, device)
        return torch.cat((states, aux_states), 1), torch.cat((mask, aux_mask), 1)

    def apply_to_encoders(self, fn) -> None:
        pass  # the encoder runs once per case (store / predictor), never inside forward

    def encoder_calls(self, x_shape) -> list:
        return []  # nothing per forward: notes are encoded once per case

    def placeholder(self, x: torch.Tensor, dims: dict[str, int]):
        """Zero tokens (all valid) of the right shapes, without the encoder (parameter/FLOP counting)."""
        b = x.shape[0]
        tokens = x.new_zeros(b, self.max_tokens, dims.get(self.spec, self.token_dim))
        mask = torch.ones(b, self.max_tokens, dtype=torch.bool, device=x.device)
        return x, self._split(tokens.repeat(1, 2, 1), mask.repeat(1, 2)) if self.aux else \
            {"tokens": tokens, "mask": mask}

    def _split(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.aux:
            return {"tokens": tokens, "mask": mask}
        n = self.max_tokens
        if tokens.shape[1] != 2 * n:
            raise ValueError(f"notes with auxiliary notes must have 2 x {n} tokens, got {tokens.shape[1]}")
        return {"tokens": tokens[:, :n], "mask": mask[:, :n], "aux_tokens": tokens[:, n:], "aux_mask": mask[:, n:]}

    def __call__(self, x: torch.Tensor):
        if self.tokens is None:
            raise NotesRequiredError(NOTES_REQUIRED)
        tokens, mask = self.tokens.to(x.device), self.mask.to(x.device)
        if tokens.shape[0] == 1 and x.shape[0] != 1:
            tokens, mask = tokens.expand(x.shape[0], -1, -1), mask.expand(x.shape[0], -1)
        elif tokens.shape[0] != x.shape[0]:
            raise ValueError(f"{tokens.shape[0]} notes set for a batch of {x.shape[0]}")
        return x, self._split(tokens.to(x.dtype) if x.is_floating_point() else tokens, mask)
