"""Configuration presets: named configurations added to nnUNetPlans.json that inherit from nnU-Net's own.

nnU-Net looks planners up inside nnunetv2 only, so method configurations are not planned by a custom
planner but added as named configurations (nnU-Net keeps custom configurations and resolves
``inherits_from``). A preset gives patch size, batch size and features per stage; the pooling/convolution
topology for that patch is derived with nnU-Net's own ``get_pool_and_conv_props`` from the parent's spacing,
so the network fits the patch exactly as nnU-Net would plan it. The data identifier is inherited: a preset
trains on the parent's preprocessed data, no second preprocessing.
"""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from .io import atomic_write_json


def available_presets() -> dict[str, dict]:
    out = {}
    for f in resources.files("nnunet_textguided_plans").iterdir():
        if f.name.endswith(".json"):
            out[f.name[:-5]] = json.loads(f.read_text())
    return out


def configuration_from_preset(plans: dict, preset: dict) -> dict:
    parent = PlansManager(copy.deepcopy(plans)).get_configuration(preset["inherits_from"]).configuration
    spacing, patch = parent["spacing"], list(preset["patch_size"])
    if len(spacing) != len(patch):
        raise ValueError(f"preset patch {patch} does not match the {len(spacing)}D parent configuration")
    features = list(preset["features_per_stage"])
    _, pool, conv, patch, _ = get_pool_and_conv_props(spacing, patch, 4, 999999)
    n = min(len(features), len(pool))
    arch = copy.deepcopy(parent["architecture"])
    kw = arch["arch_kwargs"]
    kw.update(n_stages=n, features_per_stage=features[:n], kernel_sizes=[list(k) for k in conv[:n]],
              strides=[list(s) for s in pool[:n]])
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if key in kw:
            kw[key] = (list(kw[key]) + [kw[key][-1]] * n)[:n]
    if "n_conv_per_stage_decoder" in kw:
        kw["n_conv_per_stage_decoder"] = (list(kw["n_conv_per_stage_decoder"]) + [kw["n_conv_per_stage_decoder"][-1]] * n)[:n - 1]
    return {"inherits_from": preset["inherits_from"], "patch_size": [int(p) for p in patch],
            "batch_size": int(preset["batch_size"]), "architecture": arch}


def add_configurations(plans_file: str | Path, names: list[str], force: bool = False) -> list[str]:
    """Add the named presets to a plans file (atomic rewrite). Returns the names added or updated."""
    plans_file = Path(plans_file)
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} does not exist: run nnUNetv2_plan_and_preprocess for this dataset first")
    plans = json.loads(plans_file.read_text())
    presets = available_presets()
    changed = []
    for name in names:
        if name not in presets:
            raise KeyError(f"unknown preset '{name}'; available: {', '.join(sorted(presets))}")
        if presets[name]["inherits_from"] not in plans["configurations"]:
            raise ValueError(f"{plans_file} has no configuration '{presets[name]['inherits_from']}' for preset "
                             f"'{name}' to inherit from (nnU-Net skips 3d configurations for 2D data)")
        new = configuration_from_preset(plans, presets[name])
        old = plans["configurations"].get(name)
        if old == new:
            continue
        if old is not None and not force:
            raise FileExistsError(f"{plans_file} already has a different configuration '{name}'; pass --force to "
                                  "replace it (trained models keep their own copy in plans.json)")
        plans["configurations"][name] = new
        changed.append(name)
    if changed:
        atomic_write_json(plans_file, plans, sort_keys=False)
    return changed
