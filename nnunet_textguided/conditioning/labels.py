"""Free-text label selection: "kidney on the left" -> the vocabulary label "left kidney".

Used by ``nnUNetv2_predict_textguided --labels`` on universal (merged, partial-label) models, in three steps:

1. exact: a phrase whose unified name (the merge's normalisation and synonym table: case, ``_``/``-``,
   tumour/tumor, "kidney_l", "ivc", ...) is a vocabulary label is that label;
2. side: a phrase naming one side ("left", "right") never matches a label of the other side;
3. similarity: phrase and labels are embedded with a sentence encoder; the most similar label wins if its
   cosine similarity reaches ``threshold`` and beats the runner-up by ``margin`` (otherwise the phrase is
   ambiguous, e.g. "kidneys" between the left and the right kidney, and the command stops).

The default encoder is the bundled all-MiniLM-L6-v2 (``minilm``): a model trained for sentence similarity,
offline. CLIP-style text towers score unrelated words high (cosines of 0.7-0.9 are common), so with another
encoder pass a threshold measured for it. Measured with ``minilm`` on the phantom vocabulary (liver, spleen,
right kidney, left kidney, liver tumor, pancreas): "kidney on the left" 0.90 -> left kidney (after the side
rule, next liver), "hepatic" 0.81 -> liver (next 0.58), "tumour of the liver" 0.93 -> liver tumor (0.60);
"kidneys" is ambiguous (0.73 vs 0.67); unrelated words stay below 0.7 ("organ" 0.67, "lung" 0.46).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from ..data.merge import canonical_label, normalise_label_name

DEFAULT_LABEL_ENCODER = "minilm"
DEFAULT_THRESHOLD = 0.7
DEFAULT_MARGIN = 0.1
_SIDES = ("left", "right")


class UnknownLabelError(ValueError):
    pass


@dataclass(frozen=True)
class LabelMatch:
    phrase: str
    label: str
    score: float  # 1.0 for an exact match
    runner_up: str | None = None
    runner_up_score: float | None = None

    def describe(self) -> str:
        if self.score >= 1.0 and self.runner_up is None:
            return f"'{self.phrase}' -> '{self.label}' (exact)"
        second = f"; next '{self.runner_up}' {self.runner_up_score:.2f}" if self.runner_up else ""
        return f"'{self.phrase}' -> '{self.label}' (similarity {self.score:.2f}{second})"


def _side(text: str) -> str | None:
    words = set(normalise_label_name(text).split())
    found = [s for s in _SIDES if s in words]
    return found[0] if len(found) == 1 else None


def split_phrases(text: str) -> list[str]:
    """'left kidney, liver; spleen' -> ['left kidney', 'liver', 'spleen']."""
    return [p.strip() for p in re.split(r"[,;]", text) if p.strip()]


def match_labels(phrases: Sequence[str], vocabulary: Sequence[str], encoder_spec: str = DEFAULT_LABEL_ENCODER,
                 threshold: float = DEFAULT_THRESHOLD, margin: float = DEFAULT_MARGIN,
                 synonyms: dict | None = None) -> list[LabelMatch]:
    """Match every phrase to one vocabulary label; UnknownLabelError (listing the labels) if one has no clear
    match. ``synonyms``: the merge's ``--synonyms`` table, if one was used."""
    vocabulary = list(vocabulary)
    if not vocabulary:
        raise UnknownLabelError("the model has no label vocabulary")
    exact = {canonical_label(v, synonyms): v for v in vocabulary}
    out: list[LabelMatch | None] = [None] * len(phrases)
    todo = []
    for i, p in enumerate(phrases):
        v = exact.get(canonical_label(p, synonyms))
        if v is not None:
            out[i] = LabelMatch(p, v, 1.0)
        else:
            todo.append(i)
    if todo:
        from .slices import get_encoder
        enc = get_encoder(encoder_spec)
        if not enc.normalize:
            raise UnknownLabelError(f"label encoder {encoder_spec!r} does not produce normalised sentence "
                                    "embeddings; use 'minilm' or a CLIP text encoder")
        sims = enc.embed_texts([phrases[i] for i in todo]) @ enc.embed_texts(vocabulary).T
        problems = []
        for row, i in zip(sims, todo):
            side = _side(phrases[i])
            ranked = sorted(((float(row[j]), v) for j, v in enumerate(vocabulary)
                             if side is None or _side(v) in (None, side)), reverse=True)
            if not ranked or ranked[0][0] < threshold:
                best = f"closest '{ranked[0][1]}', similarity {ranked[0][0]:.2f} < {threshold}" if ranked else "none"
                problems.append(f"'{phrases[i]}' ({best})")
                continue
            (score, best), second = ranked[0], (ranked[1] if len(ranked) > 1 else (None, None))
            if second[0] is not None and score - second[0] < margin:
                problems.append(f"'{phrases[i]}' (ambiguous: '{best}' {score:.2f}, '{second[1]}' {second[0]:.2f})")
                continue
            out[i] = LabelMatch(phrases[i], best, score, second[1], second[0])
        if problems:
            raise UnknownLabelError(
                f"no clear label of this model for {', '.join(problems)}. Known labels: {', '.join(vocabulary)}. "
                "Use one of them (or a clearer paraphrase), or change --label-threshold / --label-margin.")
    return [m for m in out if m is not None]
