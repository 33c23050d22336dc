"""Dataset ids and names as the commands take them (``-d 27``, ``-d 027``, ``-d Dataset027_Name``).

nnU-Net's ``maybe_convert_to_dataset_name`` looks an id up in nnUNet_raw, nnUNet_preprocessed and nnUNet_results
and, for an unknown one, raises a multi-line message about environment variables. ``dataset_name`` follows the
same rules and says in one line what was looked for where, which datasets are there, and what to run.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["DatasetNotFoundError", "dataset_name", "datasets_in"]

ROOTS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


class DatasetNotFoundError(FileNotFoundError):
    pass


def datasets_in(folder) -> list[str]:
    """The ``DatasetXXX_Name`` folders in ``folder`` (none if it does not exist)."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and re.match(r"Dataset\d{3}_", p.name)) \
        if folder.is_dir() else []


def dataset_name(identifier, roots: tuple[str, ...] = ROOTS, hint: str = "run nnUNetv2_plan_and_preprocess -d "
                 "{id} first") -> str:
    """``DatasetXXX_Name`` of ``identifier`` (an id or a name) in the folders the environment variables ``roots``
    point at; DatasetNotFoundError (one line: where it looked, what is there, ``hint``) otherwise."""
    text = str(identifier).strip()
    folders = {r: os.environ.get(r) for r in roots}
    unset = [r for r, f in folders.items() if not f]
    if len(unset) == len(roots):
        raise DatasetNotFoundError(f"dataset {text!r}: {', '.join(roots)} {'is' if len(roots) == 1 else 'are'} not "
                                   "set; export them as for nnU-Net's own commands")
    present = sorted({n for f in folders.values() if f for n in datasets_in(f)})
    if text.startswith("Dataset"):
        if text in present:
            return text
        matches = []
    else:
        try:
            number = int(text)
        except ValueError:
            raise DatasetNotFoundError(f"dataset {text!r} is neither an id (e.g. 27) nor a name (Dataset027_Name)"
                                       ) from None
        matches = sorted({n for n in present if n.startswith(f"Dataset{number:03d}_")})
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise DatasetNotFoundError(f"dataset {text}: several datasets have this id ({', '.join(matches)}); give "
                                       "the full name")
    looked = ", ".join(f"{r}={f}" for r, f in folders.items() if f)
    there = ", ".join(present) if present else "none"
    raise DatasetNotFoundError(f"dataset {text} not found in {looked} (datasets there: {there}); "
                               + hint.format(id=text))
