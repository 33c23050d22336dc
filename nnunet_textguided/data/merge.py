"""Merge several partially labelled nnU-Net raw datasets into one universal dataset (CDPDNet-style training).

``nnunet-textguided merge -d 11 12 13 -o 200 --name Universal`` reads the raw datasets 11, 12, 13 and writes
``nnUNet_raw/Dataset200_Universal``, a normal nnU-Net raw dataset that stock planning and preprocessing accept
(``nnUNetv2_plan_and_preprocess -d 200 --verify_dataset_integrity``) and that the universal trainer reads.

Unified vocabulary
    Every foreground label of every source is named by ``label_descriptions[str(code)]`` when the source's
    dataset.json has that key, else by its label name. The name is normalised (lowercase, ``_``/``-`` become
    spaces, spaces collapsed, "tumour" -> "tumor") and mapped to a canonical name by a synonym table: a
    built-in table (:data:`BUILTIN_SYNONYMS`, the 32 regions of interest of the CDPDNet paper with common
    spellings of public datasets: ``kidney_left`` / ``kidney l`` / ``l kidney`` -> "left kidney", ``ivc`` ->
    "postcava", ...) extended or overridden by a user JSON file (``--synonyms``)::

        {"liver tumor": ["hepatic lesion"],                 canonical name: [aliases]
         "kidney tumor": ["Dataset064_KiTS:tumor"],         an alias scoped to one source (name, short name or id)
         "__part_of__": {"kidney cyst": "kidney",           reserved key: part -> parent
                         "lung tumor": null}}               (null: never a part, overrides the rule below)

    Generic names ("tumor", "cancer", "lesion") are deliberately *not* in the built-in table: they mean a
    different structure in every dataset; name them with ``label_descriptions`` or with a scoped alias. Names
    that match nothing become their own vocabulary entries. Two labels of one source that end up with the same
    unified name are an error.

Overlapping structures (an organ and its tumour)
    A unified label "X tumor" or "X cyst" is *part of* X when X is in the merged vocabulary too (adjective
    forms: "pancreatic tumor" is part of "pancreas"; "hepatic vessel tumor" is part of "hepatic vessel", not
    of the liver; "kidney tumor" is part of "kidney" only when "kidney" itself is a label); ``__part_of__``
    adds or removes such relations.

Encoding (dataset.json)
    Every unified label gets one integer code 1..K, parts after all non-part labels (parts of parts after
    their parents), so the merged label maps are ordinary integer maps (uint8 when K < 256): a voxel of a
    liver tumour carries the tumour's code. ``labels`` are written as nnU-Net *regions*, one output channel per
    unified label, each an independent sigmoid: a label's region is its own code plus the codes of its parts
    (liver = [liver, liver tumor]). A label without parts is written as ``[c, c]``: nnU-Net's LabelManager
    (nnunetv2/utilities/label_handling/label_handling.py) switches to region mode -- sigmoid outputs,
    per-channel targets -- only if some region has more than one element, so the duplicate keeps the sigmoid
    outputs of the partial-label method even when no label has parts (``[c, c]`` selects exactly the voxels
    of code c). ``regions_class_order`` is the codes in channel order: nnU-Net's export writes the channels in
    that order, so a part (later) is written over its organ -- the exported prediction is again a plain
    integer map with priority part > parent.

Metadata (dataset.json key ``textguided_universal``, read back with :func:`load_universal`)::

    {"version": 1,
     "labels": [unified label names in channel order],
     "codes": {name: code},
     "part_of": {part: parent},
     "tasks": [{"name": "LiverSpleen", "source": "Dataset011_LiverSpleen", "labels": [annotated labels]}],
     "cases": {"D011_case_000": {"source": "Dataset011_LiverSpleen", "tasks": ["LiverSpleen"],
                                 "source_case": "case_000", "split": "Tr"}},
     "default_task": "auto" | task name,
     "organ_prompt": "A computerized tomography of a {label}.",
     "task_prompt": "A task of segmenting {labels} in computerized tomography."}

    A source dataset has one task named after it (without its ``DatasetXXX_`` prefix) annotating all its labels,
    or the tasks a ``--tasks`` file gives it ({"DatasetXXX_Name": {"task name": [labels]}}: an MSD-style
    dataset with an organ task and a tumour task). A case's own tasks are its source's; its annotated labels
    are theirs, and the loss of every other channel is masked (merges of earlier versions record one "task"
    per case, read the same way). ``default_task`` "auto" leaves the
    choice of the task prompt at inference to the predictor.

Files
    Cases are renamed ``D{source_id:03d}_{case}`` (``D011_phantom_000_0000.nii.gz``) so ids never collide.
    Images are hard links when source and target share a file system (else copies); label maps are read with
    the source's nnU-Net reader/writer, remapped to unified codes and written with the same writer (geometry
    kept). Per-case text sidecars (``<CASE>.txt``, ``<CASE>.aux.txt`` beside the images) are copied. imagesTs /
    labelsTs are merged the same way when present. The dataset is assembled in a hidden staging folder and
    moved into place at the end (:func:`nnunet_textguided.io.staged_dataset_folder`): an existing output is
    only replaced with ``--overwrite``, and a failed merge leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..io import atomic_write_json, read_json_or_yaml, staged_dataset_folder

__all__ = [
    "BUILTIN_SYNONYMS",
    "DEFAULT_ORGAN_PROMPT",
    "DEFAULT_TASK_PROMPT",
    "METADATA_KEY",
    "UniversalInfo",
    "load_universal",
    "merge_datasets",
    "normalise_label_name",
    "main",
]

METADATA_KEY = "textguided_universal"
DEFAULT_ORGAN_PROMPT = "A computerized tomography of a {label}."
DEFAULT_TASK_PROMPT = "A task of segmenting {labels} in computerized tomography."
SIDECAR_SUFFIXES = (".txt", ".aux.txt")
PART_OF_KEY = "__part_of__"

#: canonical name -> aliases (compared after :func:`normalise_label_name`). The 32 regions of interest of the
#: CDPDNet paper with the spellings of common public datasets (BTCV, AMOS, TotalSegmentator, WORD, FLARE, MSD,
#: KiTS, LiTS). Kept modest on purpose: only aliases that mean the same structure in every dataset.
BUILTIN_SYNONYMS: dict[str, list[str]] = {
    "spleen": [],
    "right kidney": ["kidney right", "kidney r", "r kidney", "kidney rt", "rt kidney"],
    "left kidney": ["kidney left", "kidney l", "l kidney", "kidney lt", "lt kidney"],
    "gallbladder": ["gall bladder"],
    "esophagus": ["oesophagus"],
    "liver": [],
    "stomach": [],
    "aorta": [],
    "postcava": ["inferior vena cava", "ivc", "vena cava inferior"],
    "portal vein and splenic vein": ["portal and splenic vein", "portal vein splenic vein",
                                     "portal vein and splenic vein", "portal splenic vein", "pv sv"],
    "pancreas": [],
    "right adrenal gland": ["adrenal gland right", "adrenal gland r", "r adrenal gland", "right adrenal",
                            "adrenal right"],
    "left adrenal gland": ["adrenal gland left", "adrenal gland l", "l adrenal gland", "left adrenal",
                           "adrenal left"],
    "duodenum": [],
    "hepatic vessel": ["hepatic vessels", "liver vessel", "liver vessels"],
    "right lung": ["lung right", "lung r", "r lung"],
    "left lung": ["lung left", "lung l", "l lung"],
    "colon": [],
    "intestine": ["intestines"],
    "rectum": [],
    "bladder": ["urinary bladder"],
    "prostate": [],
    "left head of femur": ["head of femur left", "femur head left", "left femur head", "femoral head left",
                           "left femoral head", "femur left", "left femur", "head of femur l"],
    "right head of femur": ["head of femur right", "femur head right", "right femur head", "femoral head right",
                            "right femoral head", "femur right", "right femur", "head of femur r"],
    "celiac trunk": ["coeliac trunk", "celiac artery", "coeliac artery"],
    "kidney tumor": ["renal tumor", "kidney tumors", "renal tumors"],
    "liver tumor": ["hepatic tumor", "liver tumors", "hepatic tumors"],
    "pancreatic tumor": ["pancreas tumor", "pancreatic tumors", "pancreas tumors"],
    "hepatic vessel tumor": ["hepatic vessels tumor", "liver vessel tumor"],
    "lung tumor": ["lung tumors", "pulmonary tumor"],
    "colon tumor": ["colon tumors", "colon cancer primaries", "colonic tumor"],
    "kidney cyst": ["renal cyst", "kidney cysts", "renal cysts"],
}

#: adjective -> organ noun, for the "X tumor is part of X" rule ("pancreatic tumor" -> "pancreas").
_ADJECTIVES = {"pancreatic": "pancreas", "renal": "kidney", "gastric": "stomach", "splenic": "spleen",
               "colonic": "colon", "rectal": "rectum", "esophageal": "esophagus", "pulmonary": "lung"}
_PART_SUFFIX = re.compile(r"(.+) (tumor|cyst)")


def normalise_label_name(name: str) -> str:
    """Lowercase, ``_``/``-`` -> space, collapse whitespace, British "tumour" -> "tumor"."""
    s = str(name).lower().replace("_", " ").replace("-", " ")
    s = re.sub(r"\s+", " ", s).strip()
    return s.replace("tumour", "tumor")


# ----------------------------------------------------------------------------------------------------------
# metadata helpers (imported by the universal trainer)
# ----------------------------------------------------------------------------------------------------------
def route_labels(task_labels: list[list[str]], labels: list[str], wanted: list[str] | None = None,
                 preferred: int | None = None) -> list[int]:
    """For each label, the task whose prompt predicts it: greedy set cover of ``wanted`` (default: all labels)
    by the tasks' annotated label sets (the task covering most uncovered labels first, lower index on ties;
    the ``preferred`` task — merge's ``--default-task`` — first for the labels it annotates). Labels that are
    not wanted, or annotated nowhere, go to the first chosen task."""
    todo = [l for l in (wanted or labels) if any(l in t for t in task_labels)]
    assign: dict[str, int] = {}
    if preferred is not None:
        assign = {l: preferred for l in todo if l in task_labels[preferred]}
        todo = [l for l in todo if l not in assign]
    while todo:
        best = max(range(len(task_labels)), key=lambda t: (sum(l in task_labels[t] for l in todo), -t))
        for l in [l for l in todo if l in task_labels[best]]:
            assign[l] = best
        todo = [l for l in todo if l not in assign]
    first = min(assign.values(), default=0)
    return [assign.get(l, first) for l in labels]


@dataclass
class UniversalInfo:
    """The ``textguided_universal`` block of a merged dataset.json (see the module docstring)."""

    labels: list[str]
    codes: dict[str, int]
    part_of: dict[str, str]
    tasks: list[tuple[str, list[str]]]
    cases: dict[str, dict]
    default_task: str = "auto"
    organ_prompt: str = DEFAULT_ORGAN_PROMPT
    task_prompt: str = DEFAULT_TASK_PROMPT
    sources: list[str] = field(default_factory=list)

    @property
    def task_names(self) -> list[str]:
        return [name for name, _ in self.tasks]

    def organ_prompts(self) -> list[str]:
        """One prompt per output channel: ``organ_prompt`` filled with the label name."""
        return [self.organ_prompt.format(label=label) for label in self.labels]

    def task_prompts(self) -> list[str]:
        """One prompt per task: ``task_prompt`` filled with the task's labels joined with ", "."""
        return [self.task_prompt.format(labels=", ".join(labels)) for _, labels in self.tasks]

    def task_index(self, name: str) -> int:
        for i, (task, _) in enumerate(self.tasks):
            if task == name:
                return i
        raise ValueError(f"unknown task {name!r}; the merged dataset has the tasks {self.task_names}")

    def _case(self, case_id: str) -> dict:
        try:
            return self.cases[case_id]
        except KeyError:
            raise KeyError(f"case {case_id!r} is not listed in dataset.json[{METADATA_KEY!r}]['cases'] "
                           f"({len(self.cases)} cases); was the dataset changed after `nnunet-textguided merge`? "
                           "Re-run the merge.") from None

    def tasks_of(self, case_id: str) -> list[int]:
        """Indices (into :attr:`tasks`) of the case's own tasks: every task of the source dataset it came from."""
        meta = self._case(case_id)
        if "tasks" in meta:
            return [self.task_index(t) for t in meta["tasks"]]
        return [self.task_index(meta["task"])]  # merges before several tasks per source: one task per source

    def task_of(self, case_id: str) -> int:
        """The case's first task (its only one unless its source has several)."""
        return self.tasks_of(case_id)[0]

    def source_of(self, case_id: str) -> str:
        """The source dataset the case was merged from."""
        meta = self._case(case_id)
        t = self.task_of(case_id)
        return meta.get("source") or self.sources[t] or self.tasks[t][0]

    def labels_of(self, case_id: str) -> list[str]:
        """The labels the case's source annotates (the union of its tasks' labels), in channel order."""
        annotated = {label for t in self.tasks_of(case_id) for label in self.tasks[t][1]}
        return [label for label in self.labels if label in annotated]

    def scored_regions(self, regions: list, file_ending: str) -> dict[str, list]:
        """{case file name: the regions (channel order) annotated in its source}: what evaluation may score."""
        return {f"{case}{file_ending}": [r for r, a in zip(regions, self.annotated_mask(case)) if a]
                for case in self.cases}

    def annotated_mask(self, case_id: str, task: int | None = None) -> list[bool]:
        """Per output channel: is this label annotated in the case's source dataset (or in its task ``task``)?"""
        annotated = set(self.labels_of(case_id) if task is None else self.tasks[task][1])
        return [label in annotated for label in self.labels]

    def case_label_tasks(self, case_id: str, routing: list[int]) -> list[int]:
        """Per output channel, the task whose prompt predicts it for this case: each label the case's source
        annotates under one of the case's own tasks (the fewest covering them), every other label as ``routing``
        (the model's routing for cases of unknown origin)."""
        own = self.tasks_of(case_id)
        task_labels = [self.tasks[t][1] for t in own]
        mine = self.labels_of(case_id)
        within = route_labels(task_labels, self.labels, mine)
        return [own[within[k]] if label in mine else routing[k] for k, label in enumerate(self.labels)]


def _missing_metadata_error() -> ValueError:
    return ValueError(f"dataset.json has no {METADATA_KEY!r} block: universal (partial-label) training needs a "
                      "dataset written by `nnunet-textguided merge -d ID ID ... -o NEW_ID --name NAME`; merge the "
                      "partially labelled source datasets with it, then plan and preprocess the merged dataset.")


def load_universal(dataset_json) -> UniversalInfo:
    """Read the ``textguided_universal`` block of a merged dataset.json (a dict, or the path of the file)."""
    if isinstance(dataset_json, (str, os.PathLike)):
        with open(dataset_json, encoding="utf-8") as f:
            dataset_json = json.load(f)
    meta = dataset_json.get(METADATA_KEY) if isinstance(dataset_json, dict) else None
    if meta is None:
        raise _missing_metadata_error()
    if meta.get("version") != 1:
        raise ValueError(f"dataset.json[{METADATA_KEY!r}] has version {meta.get('version')!r}; this package "
                         "reads version 1. Re-run `nnunet-textguided merge` with this version of the package.")
    labels = list(meta["labels"])
    codes = {k: int(v) for k, v in meta["codes"].items()}
    if sorted(codes) != sorted(labels):
        raise ValueError(f"dataset.json[{METADATA_KEY!r}]: 'labels' and 'codes' disagree; re-run the merge")
    tasks = [(t["name"], list(t["labels"])) for t in meta["tasks"]]
    for name, tl in tasks:
        unknown = [x for x in tl if x not in codes]
        if unknown:
            raise ValueError(f"dataset.json[{METADATA_KEY!r}]: task {name!r} lists unknown labels {unknown}")
    orphans = [x for x in labels if not any(x in tl for _, tl in tasks)]
    if orphans:
        raise ValueError(f"dataset.json[{METADATA_KEY!r}]: labels {orphans} are annotated in no task, so they "
                         "could never be trained; remove them or re-run the merge")
    return UniversalInfo(labels=labels, codes=codes, part_of=dict(meta.get("part_of", {})), tasks=tasks,
                         cases=dict(meta.get("cases", {})), default_task=meta.get("default_task", "auto"),
                         organ_prompt=meta.get("organ_prompt", DEFAULT_ORGAN_PROMPT),
                         task_prompt=meta.get("task_prompt", DEFAULT_TASK_PROMPT),
                         sources=[t.get("source", "") for t in meta["tasks"]])


def _check_prompt(template: str, key: str, what: str) -> str:
    if not isinstance(template, str) or "{" + key + "}" not in template:
        raise ValueError(f"the {what} template must contain the placeholder {{{key}}}, got {template!r}")
    try:
        template.format(**{key: "x"})
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"the {what} template {template!r} may only use the placeholder {{{key}}} "
                         f"(write literal braces as {{{{ and }}}}): {e!r}") from None
    return template


# ----------------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    name: str  # DatasetXXX_Name
    dataset_id: int
    folder: Path
    dataset_json: dict
    labels: list[tuple[str, int, str]] = field(default_factory=list)  # (label name, code, text used for naming)

    @property
    def task(self) -> str:
        return self.name.split("_", 1)[1] if "_" in self.name else self.name

    @property
    def json_path(self) -> Path:
        return self.folder / "dataset.json"

    @property
    def prefix(self) -> str:
        return f"D{self.dataset_id:03d}_"


def _default_raw_root() -> Path:
    from nnunetv2.paths import nnUNet_raw

    value = nnUNet_raw.get()
    if not value:
        raise ValueError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (or pass --raw DIR)")
    return Path(value)


def _available(raw_root: Path) -> list[str]:
    from .names import datasets_in
    return datasets_in(raw_root)


def _resolve_source(raw_root: Path, source) -> str:
    """Dataset name of ``source`` (an id, "11", "011" or "Dataset011_Name"), looked up in ``raw_root``.

    Same rules as nnU-Net's ``maybe_convert_to_dataset_name``, but only in ``raw_root`` (the raw data is what
    is merged) and with an error that lists what is there.
    """
    text = str(source).strip()
    if text.startswith("Dataset"):
        if (raw_root / text / "dataset.json").is_file():
            return text
        raise FileNotFoundError(f"{raw_root / text / 'dataset.json'} does not exist; datasets in {raw_root}: "
                                f"{_available(raw_root)}")
    try:
        dataset_id = int(text)
    except ValueError:
        raise ValueError(f"source {source!r} is neither a dataset id nor a name starting with 'Dataset'") from None
    found = [n for n in _available(raw_root) if n.startswith(f"Dataset{dataset_id:03d}_")]
    if len(found) != 1:
        what = "no dataset" if not found else f"several datasets ({found})"
        raise FileNotFoundError(f"{what} with id {dataset_id} in {raw_root}; datasets there: {_available(raw_root)}")
    return found[0]


def _load_source(raw_root: Path, source) -> _Source:
    name = _resolve_source(raw_root, source)
    folder = raw_root / name
    path = folder / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not an nnU-Net raw dataset")
    with open(path, encoding="utf-8") as f:
        dj = json.load(f)
    for key in ("labels", "channel_names", "file_ending"):
        if key not in dj:
            raise ValueError(f"{path} has no {key!r}: not a valid nnU-Net v2 dataset.json")
    src = _Source(name, int(name[7:10]), folder, dj)
    descriptions = dj.get("label_descriptions") or {}
    if "ignore" in dj["labels"]:
        raise ValueError(f"{path} declares an 'ignore' label: merge supports plain integer labels only; remove "
                         "the ignore label from the source (partial annotation is what the merge expresses)")
    regions = {k: v for k, v in dj["labels"].items() if isinstance(v, (list, tuple))}
    if regions:
        raise ValueError(f"{path} defines its labels as nnU-Net regions ({regions}); merge needs plain integer "
                         "labels {name: code}: merge the dataset's integer label maps (before region conversion) "
                         "and let the merge write the regions")
    for label_name, code in dj["labels"].items():
        code = int(code)
        if code == 0:
            continue
        text = descriptions.get(str(code))
        src.labels.append((label_name, code, text if isinstance(text, str) and text.strip() else label_name))
    src.labels.sort(key=lambda t: t[1])
    if not src.labels:
        raise ValueError(f"{path} has no foreground labels")
    return src


def _list_cases(folder: Path, file_ending: str, num_channels: int, where: str) -> dict[str, list[Path]]:
    """{case id: [channel files]} of an imagesTr/imagesTs folder (``CASE_XXXX<file_ending>``)."""
    cases: dict[str, list[Path]] = {}
    pat = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    for p in sorted(folder.iterdir()):
        m = pat.match(p.name)
        if m and p.is_file():
            cases.setdefault(m.group(1), []).append(p)
    for case, files in cases.items():
        if len(files) != num_channels:
            raise ValueError(f"{where}: case {case} has {len(files)} channel files, dataset.json declares "
                             f"{num_channels} channels; fix the source dataset")
    return cases


def _training_cases(src: _Source, num_channels: int) -> dict[str, tuple[list[Path], Path]]:
    dj, fe = src.dataset_json, src.dataset_json["file_ending"]
    if "dataset" in dj:  # explicit file listing in dataset.json
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        listing = get_filenames_of_train_images_and_targets(str(src.folder), json.loads(json.dumps(dj)))
        return {k: ([Path(p) for p in v["images"]], Path(v["label"])) for k, v in listing.items()}
    images = src.folder / "imagesTr"
    if not images.is_dir():
        raise FileNotFoundError(f"{images} does not exist (and {src.json_path} has no 'dataset' listing)")
    out = {}
    for case, files in _list_cases(images, fe, num_channels, str(images)).items():
        out[case] = (files, src.folder / "labelsTr" / f"{case}{fe}")
    return out


# ----------------------------------------------------------------------------------------------------------
# vocabulary
# ----------------------------------------------------------------------------------------------------------
class _Vocabulary:
    def __init__(self, synonyms: dict | None):
        self.alias: dict[str, str] = {}
        self.scoped: list[tuple[str, str, str]] = []  # (source key, normalised alias, canonical)
        self.user_part_of: dict[str, str | None] = {}
        for canonical, aliases in BUILTIN_SYNONYMS.items():
            self._add(canonical, aliases)
        if synonyms:
            self._add_user(synonyms)

    def _add(self, canonical: str, aliases: Iterable[str]) -> None:
        canonical = normalise_label_name(canonical)
        self.alias[canonical] = canonical
        for a in aliases:
            self.alias[normalise_label_name(a)] = canonical

    def _add_user(self, synonyms: dict) -> None:
        if not isinstance(synonyms, dict):
            raise ValueError('synonyms must be a JSON object {"canonical name": ["alias", ...]}')
        for canonical, aliases in synonyms.items():
            if canonical == PART_OF_KEY:
                if not isinstance(aliases, dict) or not all(
                        isinstance(v, str) or v is None for v in aliases.values()):
                    raise ValueError(f'synonyms[{PART_OF_KEY!r}] must be an object {{"part": "parent" or null}}')
                self.user_part_of.update(aliases)
                continue
            if canonical.startswith("__"):
                raise ValueError(f"synonyms: unknown reserved key {canonical!r} (only {PART_OF_KEY!r} exists)")
            if isinstance(aliases, str):
                aliases = [aliases]
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise ValueError(f"synonyms[{canonical!r}] must be a list of alias strings, got {aliases!r}")
            canon = normalise_label_name(canonical)
            self.alias[canon] = canon
            for a in aliases:
                if ":" in a:
                    scope, _, label = a.partition(":")
                    self.scoped.append((scope.strip(), normalise_label_name(label), canon))
                else:
                    self.alias[normalise_label_name(a)] = canon

    def canonical(self, text: str, src: _Source | None = None) -> str:
        norm = normalise_label_name(text)
        if src is not None:
            for scope, alias, canon in self.scoped:
                if alias == norm and _scope_matches(scope, src):
                    return canon
        return self.alias.get(norm, norm)


def canonical_label(text: str, synonyms: dict | None = None) -> str:
    """The unified name the merge gives ``text`` (normalised, built-in and ``synonyms`` aliases resolved)."""
    return _Vocabulary(synonyms).canonical(text)


def _scope_matches(scope: str, src: _Source) -> bool:
    if scope.isdigit():
        return int(scope) == src.dataset_id
    return scope.lower() in (src.name.lower(), src.task.lower())


def _part_of(vocab: list[str], voc: _Vocabulary) -> dict[str, str]:
    present = set(vocab)
    part_of: dict[str, str] = {}
    for label in vocab:
        m = _PART_SUFFIX.fullmatch(label)
        if not m:
            continue
        base = m.group(1)
        candidates = [base]
        first, _, rest = base.partition(" ")
        if first in _ADJECTIVES:
            candidates.append(f"{_ADJECTIVES[first]} {rest}".strip())
        for c in candidates:
            if c in present and c != label:
                part_of[label] = c
                break
    for part, parent in voc.user_part_of.items():
        p = voc.canonical(part)
        if p not in present:
            print(f"note: {PART_OF_KEY} entry {part!r} ignored: {p!r} is not a label of the merged datasets")
            continue
        if parent is None:
            part_of.pop(p, None)
            continue
        q = voc.canonical(parent)
        if q not in present:
            print(f"note: {PART_OF_KEY} entry {part!r} -> {parent!r} ignored: {q!r} is not a label of the merged "
                  "datasets")
            continue
        if q == p:
            raise ValueError(f"synonyms {PART_OF_KEY}: {part!r} cannot be part of itself")
        part_of[p] = q
    for p in part_of:  # cycles
        seen, cur = {p}, p
        while cur in part_of:
            cur = part_of[cur]
            if cur in seen:
                raise ValueError(f"synonyms {PART_OF_KEY}: the part-of relations form a cycle through {cur!r}")
            seen.add(cur)
    return part_of


def _depth(label: str, part_of: dict[str, str]) -> int:
    d = 0
    while label in part_of:
        label, d = part_of[label], d + 1
    return d


# ----------------------------------------------------------------------------------------------------------
# file operations
# ----------------------------------------------------------------------------------------------------------
def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # other file system, or links not permitted
        shutil.copy2(src, dst)


def _copy_sidecars(image_file: Path, case: str, out_dir: Path, new_case: str) -> None:
    for suffix in SIDECAR_SUFFIXES:
        s = image_file.parent / f"{case}{suffix}"
        if s.is_file():
            shutil.copyfile(s, out_dir / f"{new_case}{suffix}")


def _remap_label(rw, src_file: Path, dst_file: Path, lut: dict[int, int], src: _Source) -> None:
    if not src_file.is_file():
        raise FileNotFoundError(f"{src_file} is missing: every case of {src.folder} needs its label map")
    seg, props = rw.read_seg(str(src_file))
    values = np.unique(seg)
    # readers return float arrays (SimpleITK): print whole codes as ints ([3], not [3.0])
    unknown = [int(v) if float(v).is_integer() else v for v in values.tolist() if v not in lut]
    if unknown:
        raise ValueError(f"{src_file} contains the values {unknown}, which {src.json_path} does not declare "
                         f"(declared: {sorted(lut)}); fix the label map or the dataset.json")
    out = np.zeros(seg.shape, np.uint8 if max(lut.values()) < 256 else np.uint16)
    for v in values.tolist():
        if lut[v]:
            out[seg == v] = lut[v]
    rw.write_seg(out[0], str(dst_file), props)


def _reader_writer(src: _Source, example: Path):
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    return determine_reader_writer_from_dataset_json(src.dataset_json, str(example), verbose=False)()


def _progress(items: list, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=len(items) < 50, file=sys.stderr, leave=False)


# ----------------------------------------------------------------------------------------------------------
# the merge
# ----------------------------------------------------------------------------------------------------------
def label_regions(order: list[str], part_of: dict[str, str]) -> tuple[list[str], dict[str, int], dict[str, list[int]]]:
    """(labels in channel order, codes, nnU-Net regions) of a vocabulary: parts after non-parts (stable),
    codes 1..K in that order, every label's region = its code + the codes of all its (nested) parts, and a
    one-code region written [c, c] (nnU-Net's LabelManager switches to sigmoid outputs only if some region
    has more than one entry)."""
    depth = {u: _depth(u, part_of) for u in order}
    labels = sorted(order, key=lambda u: (depth[u], order.index(u)))  # parts after non-parts, stable
    codes = {u: i + 1 for i, u in enumerate(labels)}
    children: dict[str, list[str]] = {u: [] for u in labels}
    for u in labels:  # every ancestor's region contains u
        cur = u
        while cur in part_of:
            cur = part_of[cur]
            children[cur].append(u)
    regions = {}
    for u in labels:
        r = [codes[u]] + sorted(codes[c] for c in children[u])
        regions[u] = r if len(r) > 1 else [r[0], r[0]]
    return labels, codes, regions


def universal_dataset_json(order: list[str], part_of: dict[str, str], tasks: list[dict], channel_names: dict,
                           file_ending: str, name: str, cases: dict | None = None, default_task: str = "auto",
                           organ_prompt: str = DEFAULT_ORGAN_PROMPT, task_prompt: str = DEFAULT_TASK_PROMPT,
                           num_training: int = 0, description: str = "", synonyms: dict | None = None) -> dict:
    """The dataset.json of a universal dataset: regions + ``regions_class_order`` + the metadata block.
    ``tasks``: [{"name", "labels"[, "source"]}]. Used by the merge and to describe a paper's label set
    (parameter counting) without data."""
    labels, codes, regions = label_regions(order, part_of)
    meta = {"version": 1, "labels": labels, "codes": codes, "part_of": part_of,
            "tasks": [{"name": t["name"], "source": t.get("source", t["name"]),
                       "labels": [u for u in labels if u in t["labels"]]} for t in tasks],
            "cases": dict(cases or {}), "default_task": default_task, "organ_prompt": organ_prompt,
            "task_prompt": task_prompt, "synonyms": dict(synonyms or {})}  # the merge's table, for --labels
    return {
        "channel_names": channel_names,
        "labels": {"background": 0, **regions},
        "regions_class_order": [codes[u] for u in labels],
        "numTraining": num_training,
        "file_ending": file_ending,
        "name": name,
        "description": (
            f"{description} Each label is an nnU-Net region = one sigmoid output channel (a label without parts "
            "is written as [c, c] so that nnU-Net's LabelManager uses region mode, i.e. sigmoid outputs); a part "
            "(e.g. a tumour) is also inside its parent's region and is exported over it (regions_class_order). "
            f"Which labels each case's source annotates: the {METADATA_KEY!r} block.").strip(),
        "licence": "see the source datasets",
        "converted_by": "nnunet_textguided.data.merge.merge_datasets",
        METADATA_KEY: meta,
    }


def merge_datasets(sources: Sequence[int | str], output_id: int, name: str, raw_root=None,
                   synonyms: dict | None = None, organ_prompt: str = DEFAULT_ORGAN_PROMPT,
                   task_prompt: str = DEFAULT_TASK_PROMPT, default_task: str = "auto",
                   overwrite: bool = False, verbose: bool = True, tasks: dict | None = None) -> Path:
    """Merge the nnU-Net raw datasets ``sources`` into ``raw_root/DatasetXXX_name`` and return its path.

    ``raw_root`` defaults to ``$nnUNet_raw``. ``synonyms`` is the parsed ``--synonyms`` JSON. ``tasks`` is the parsed
    ``--tasks`` file, {source dataset: {task name: [labels]}}: a source listed there has those tasks, any other
    source one task with all its labels. Prints the label
    mapping when ``verbose``. Raises ValueError / FileNotFoundError / FileExistsError with messages that name
    the offending file and the fix. See the module docstring for the layout.
    """
    output_id = int(output_id)
    if not 1 <= output_id <= 999:
        raise ValueError(f"the output dataset id must be in 1..999, got {output_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name or ""):
        raise ValueError(f"name must be letters, digits, '_' or '-' (no spaces or slashes), got {name!r}")
    if not sources:
        raise ValueError("give at least one source dataset")
    _check_prompt(organ_prompt, "label", "organ prompt")
    _check_prompt(task_prompt, "labels", "task prompt")
    raw_root = Path(raw_root).expanduser().resolve() if raw_root is not None else _default_raw_root().resolve()
    out_name = f"Dataset{output_id:03d}_{name}"

    srcs = [_load_source(raw_root, s) for s in sources]
    names = [s.name for s in srcs]
    if len(set(names)) != len(names):
        raise ValueError(f"a source dataset is given twice: {names}")
    if len({s.dataset_id for s in srcs}) != len(srcs):
        raise ValueError(f"two sources share a dataset id: {names}")
    if out_name in names or output_id in {s.dataset_id for s in srcs}:
        raise ValueError(f"the output {out_name} would replace/shadow a source dataset ({names}); pick another id")

    # ---- compatibility ---------------------------------------------------------------------------------------
    ref = srcs[0]
    fe, channels = ref.dataset_json["file_ending"], ref.dataset_json["channel_names"]
    for s in srcs[1:]:
        if s.dataset_json["file_ending"] != fe:
            raise ValueError(f"file endings differ: {ref.json_path} has {fe!r}, {s.json_path} has "
                             f"{s.dataset_json['file_ending']!r}; convert one dataset's images and labels to the "
                             "other's format (and file_ending) before merging")
        if len(s.dataset_json["channel_names"]) != len(channels):
            raise ValueError(f"numbers of input channels differ: {ref.json_path} has {len(channels)} "
                             f"({channels}), {s.json_path} has {len(s.dataset_json['channel_names'])} "
                             f"({s.dataset_json['channel_names']}); only datasets with the same input channels "
                             "can be merged: add or drop channels in a source first")
        theirs = {k: str(v).lower() for k, v in s.dataset_json["channel_names"].items()}
        if theirs != {k: str(v).lower() for k, v in channels.items()}:
            raise ValueError(f"input channels differ: {ref.json_path} has {channels}, {s.json_path} has "
                             f"{s.dataset_json['channel_names']}; channel i of every source must be the same kind "
                             "of image (it decides nnU-Net's intensity normalisation). Reorder or rename the "
                             "channels of one source so they agree, then merge")
    rw_names = {s.dataset_json.get("overwrite_image_reader_writer") for s in srcs}
    if len(rw_names) > 1:
        raise ValueError(f"the sources ask for different reader/writers (overwrite_image_reader_writer: "
                         f"{sorted(map(str, rw_names))}) in {[str(s.json_path) for s in srcs]}; make them agree")

    # ---- vocabulary ------------------------------------------------------------------------------------------
    voc = _Vocabulary(synonyms)
    order: list[str] = []
    mapping: list[dict[int, str]] = []
    for s in srcs:
        m: dict[int, str] = {}
        seen: dict[str, tuple[str, int]] = {}
        for label_name, code, text in s.labels:
            u = voc.canonical(text, s)
            if u in ("background", ""):
                raise ValueError(f"{s.json_path}: label {label_name!r} ({code}) would be named {u!r}; give it "
                                 "another name with --synonyms or label_descriptions")
            if u in seen:
                other = seen[u]
                raise ValueError(f"{s.json_path}: labels {other[0]!r} ({other[1]}) and {label_name!r} ({code}) both "
                                 f"map to the unified label {u!r}; one dataset cannot annotate a structure twice. "
                                 f"Give one of them its own name with --synonyms, e.g. "
                                 f'{{"{u} 2": ["{s.name}:{label_name}"]}}, or fix label_descriptions')
            seen[u] = (label_name, code)
            m[code] = u
            if u not in order:
                order.append(u)
        mapping.append(m)
    part_of = _part_of(order, voc)
    labels, codes, regions = label_regions(order, part_of)
    source_tasks = _source_tasks(srcs, mapping, voc, tasks or {}, labels)
    task_names = [t for per in source_tasks for t, _ in per]
    if len(set(task_names)) != len(task_names):
        raise ValueError(f"two tasks have the same name ({task_names}); task names must be unique: rename a task in "
                         "the --tasks file, or rename one of the source datasets (a source's one task is named "
                         "after it, without the DatasetXXX_ prefix)")
    if default_task != "auto" and default_task not in task_names:
        raise ValueError(f"--default-task {default_task!r} is not one of the tasks {task_names} (or 'auto')")
    if verbose:
        print(f"Merging {len(srcs)} datasets into {raw_root / out_name}")
        for s, m, per in zip(srcs, mapping, source_tasks):
            print(f"{s.name} (task{'s' if len(per) > 1 else ''} "
                  + "; ".join(f"{t}: {', '.join(ls)}" if len(per) > 1 else t for t, ls in per) + "):")
            for label_name, code, text in s.labels:
                via = f" [{text!r}]" if text != label_name else ""
                print(f"  {code:3d} {label_name}{via} -> {m[code]} ({codes[m[code]]})")
        for p, q in part_of.items():
            print(f"  {p!r} is part of {q!r}: region {q} = {regions[q]}")

    # ---- files -----------------------------------------------------------------------------------------------
    num_channels = len(channels)
    cases_meta: dict[str, dict] = {}
    num_training = 0
    with staged_dataset_folder(raw_root, output_id, out_name, overwrite) as staging:
        for sub in ("imagesTr", "labelsTr"):
            (staging / sub).mkdir()
        for s, m, per in zip(srcs, mapping, source_tasks):
            lut = {0: 0, **{code: codes[u] for code, u in m.items()}}
            tr = _training_cases(s, num_channels)
            if not tr:
                raise ValueError(f"{s.folder} has no training cases")
            rw = _reader_writer(s, next(iter(tr.values()))[0][0])
            splits = [("Tr", case, files, lab) for case, (files, lab) in tr.items()]
            ts_dir = s.folder / "imagesTs"
            if ts_dir.is_dir():
                lab_ts = s.folder / "labelsTs"
                for case, files in _list_cases(ts_dir, fe, num_channels, str(ts_dir)).items():
                    lab = lab_ts / f"{case}{fe}"
                    splits.append(("Ts", case, files, lab if lab.is_file() else None))
            for split, case, files, lab in _progress(splits, s.name):
                new = f"{s.prefix}{case}"
                img_dir = staging / f"images{split}"
                img_dir.mkdir(exist_ok=True)
                for ch, f in enumerate(files):
                    _link_or_copy(f, img_dir / f"{new}_{ch:04d}{fe}")
                _copy_sidecars(files[0], case, img_dir, new)
                if lab is not None:
                    lab_dir = staging / f"labels{split}"
                    lab_dir.mkdir(exist_ok=True)
                    _remap_label(rw, lab, lab_dir / f"{new}{fe}", lut, s)
                if new in cases_meta:
                    raise ValueError(f"{s.folder}: case {case!r} is both a training (imagesTr) and a test case "
                                     "(imagesTs); rename one of them")
                cases_meta[new] = {"source": s.name, "tasks": [t for t, _ in per], "source_case": case,
                                   "split": split}
                num_training += split == "Tr"
        task_list = [{"name": t, "source": s.name, "labels": ls} for s, per in zip(srcs, source_tasks) for t, ls in per]
        dj = universal_dataset_json(order, part_of, task_list, channels, fe, out_name, cases_meta, default_task,
                                    organ_prompt, task_prompt, num_training,
                                    f"Universal partially labelled dataset merged by `nnunet-textguided merge` "
                                    f"from {names}.", synonyms)
        if rw_names != {None}:
            dj["overwrite_image_reader_writer"] = rw_names.pop()
        atomic_write_json(staging / "dataset.json", dj, sort_keys=False)  # key order = channel order
    if verbose:
        print(f"{raw_root / out_name}: {len(labels)} labels, {len(task_names)} tasks, {num_training} training cases, "
              f"{len(cases_meta) - num_training} test cases")
    return raw_root / out_name


def _source_tasks(srcs: list[_Source], mapping: list[dict[int, str]], voc: _Vocabulary, tasks: dict,
                  labels: list[str]) -> list[list[tuple[str, list[str]]]]:
    """Per source, its tasks [(name, unified labels in channel order)]: from the --tasks file where it lists the
    source (by DatasetXXX_Name, id or Name), else one task named after the source with all its labels."""
    keys = {}
    for key in tasks:
        hit = [s for s in srcs if str(key) in (s.name, str(s.dataset_id), f"{s.dataset_id:03d}", s.task)]
        if not hit:
            raise ValueError(f"--tasks names the source {key!r}, which is not merged here (sources: "
                             f"{[s.name for s in srcs]})")
        if hit[0].name in keys:
            raise ValueError(f"--tasks lists the source {hit[0].name} twice ({keys[hit[0].name]!r} and {key!r})")
        keys[hit[0].name] = key
    out = []
    for s, m in zip(srcs, mapping):
        own = [u for u in labels if u in m.values()]
        if s.name not in keys:
            out.append([(s.task, own)])
            continue
        key = keys[s.name]
        spec = tasks[key]
        if not isinstance(spec, dict) or not spec:
            raise ValueError(f"--tasks: {key!r} must map task names to label lists, e.g. "
                             f'{{"{key}": {{"organs": ["liver"], "tumours": ["liver tumor"]}}}}')
        by_name = {name.lower(): m[code] for name, code, _ in s.labels}
        per = []
        for task, names in spec.items():
            if not isinstance(names, list) or not names:
                raise ValueError(f"--tasks: task {task!r} of {s.name} must list its labels (a non-empty list)")
            unified = []
            for name in names:
                u = by_name.get(str(name).lower()) or voc.canonical(str(name), s)
                if u not in own:
                    raise ValueError(f"--tasks: task {task!r} of {s.name} lists {name!r}, which {s.json_path} does "
                                     f"not annotate (its labels: {own})")
                unified.append(u)
            per.append((str(task), [u for u in labels if u in unified]))
        missing = [u for u in own if not any(u in ls for _, ls in per)]
        if missing:
            raise ValueError(f"--tasks: the labels {missing} of {s.name} are in none of its tasks, so they would "
                             "never be trained; add them to a task")
        out.append(per)
    return out


def _load_tasks(path: str) -> dict:
    try:
        data = read_json_or_yaml(path)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"--tasks: {e}; expected " + '{"DatasetXXX_Name": {"task name": ["label", ...], ...}}') from None
    if not isinstance(data, dict):
        raise ValueError(f'--tasks {path}: expected an object {{"DatasetXXX_Name": {{"task name": ["label", ...]}}}}')
    return data


def source_label_codes(raw_root, source: str, dataset_json: dict) -> dict[int, str]:
    """{code in the source dataset's own label maps: unified label} as the merge mapped them (the synonyms it
    used are recorded in the merged dataset.json)."""
    meta = dataset_json.get(METADATA_KEY) or {}
    src = _load_source(Path(raw_root), source)
    voc = _Vocabulary(meta.get("synonyms") or None)
    return {code: voc.canonical(text, src) for _, code, text in src.labels}


def _load_synonyms(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--synonyms {p}: no such file")
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--synonyms {p}: not valid JSON ({e}); expected "
                         '{"canonical name": ["alias", ...], "__part_of__": {"part": "parent"}}') from None
    if not isinstance(data, dict):
        raise ValueError(f'--synonyms {p}: expected a JSON object {{"canonical name": ["alias", ...]}}')
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="nnunet-textguided merge", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge partially labelled nnU-Net raw datasets into one universal dataset (CDPDNet-style "
                    "partial-label training): a unified label vocabulary, one sigmoid channel per label "
                    "(nnU-Net regions), per-case task metadata in dataset.json.",
        epilog="example:\n  nnunet-textguided merge -d 11 12 -o 200 --name Universal\n"
               "  nnUNetv2_plan_and_preprocess -d 200 --verify_dataset_integrity\n\n"
               'synonyms file: {"canonical name": ["alias", "DatasetXXX_Name:alias scoped to one source"], '
               '"__part_of__": {"part": "parent" | null}}')
    p.add_argument("-d", nargs="+", required=True, metavar="DATASET", help="source dataset ids or names")
    p.add_argument("-o", type=int, required=True, metavar="ID", help="id of the merged dataset (1..999)")
    p.add_argument("--name", required=True, help="name of the merged dataset (DatasetXXX_NAME)")
    p.add_argument("--raw", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("--synonyms", default=None, metavar="FILE.json",
                   help='extra/overriding synonyms {"canonical": ["alias", ...]} and "__part_of__"')
    p.add_argument("--organ-prompt", default=DEFAULT_ORGAN_PROMPT,
                   help=f"per-label prompt template with {{label}} (default: {DEFAULT_ORGAN_PROMPT!r})")
    p.add_argument("--task-prompt", default=DEFAULT_TASK_PROMPT,
                   help=f"per-task prompt template with {{labels}} (default: {DEFAULT_TASK_PROMPT!r})")
    p.add_argument("--tasks", default=None, metavar="FILE.json|yaml",
                   help='several tasks per source dataset: {"DatasetXXX_Name": {"task name": ["label", ...], ...}} '
                   "(a source not listed has one task with all its labels)")
    p.add_argument("--default-task", default="auto", help="task used at inference unless told: 'auto' or a task name")
    p.add_argument("--overwrite", action="store_true", help="replace an existing merged dataset")
    a = p.parse_args(argv)
    try:
        synonyms = _load_synonyms(a.synonyms) if a.synonyms else None
        tasks = _load_tasks(a.tasks) if a.tasks else None
        merge_datasets(a.d, a.o, a.name, raw_root=a.raw, synonyms=synonyms, organ_prompt=a.organ_prompt,
                       task_prompt=a.task_prompt, default_task=a.default_task, overwrite=a.overwrite, tasks=tasks)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"nnunet-textguided merge: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
