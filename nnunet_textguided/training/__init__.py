"""Trainers: one base (TextGuidedTrainer) and thin method classes. User-facing names: see trainers/."""
from __future__ import annotations

import importlib

#: modules holding the trainer classes of each method (each defines ALL_TRAINERS)
METHOD_MODULES = ("biclip", "cdpdnet", "reclmis", "tgcnet", "mptpn")


def trainer_classes() -> list[type]:
    """Every trainer class of the package (base schedules and their short variants)."""
    out = []
    for m in METHOD_MODULES:
        out += importlib.import_module(f".{m}", __name__).ALL_TRAINERS
    return out
