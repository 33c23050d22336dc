"""Configuration presets: named configurations added to nnUNetPlans.json that inherit from nnU-Net's own, with
the methods' settings (``textguided`` block, see ``settings``).

nnU-Net looks planners up inside nnunetv2 only, so method configurations are not planned by a custom
planner but added as named configurations (nnU-Net keeps custom configurations and resolves
``inherits_from``). A preset gives patch size, batch size and features per stage; the pooling/convolution
topology for that patch is derived with nnU-Net's own ``get_pool_and_conv_props`` from the parent's spacing,
so the network fits the patch exactly as nnU-Net would plan it. The data identifier is inherited: a preset
trains on the parent's preprocessed data, no second preprocessing.

A preset also carries a ``textguided`` block keyed by the methods it is for (the paper presets: their method with
the paper's defaults; the tiny presets: every method of their dimensionality with tiny stand-in encoders, named,
for CPU tests and the demo). ``add_configuration`` writes it, with the user's ``--set`` values, under the user's
configuration name.
"""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from . import settings
from .io import atomic_write_json

#: CT foreground intensity statistics used for reference plans (abdominal CT, portal-venous phase, in HU)
_CT_INTENSITIES = {"max": 1500.0, "mean": 100.0, "median": 100.0, "min": -1000.0, "percentile_00_5": -150.0,
                   "percentile_99_5": 300.0, "std": 60.0}


def available_presets() -> dict[str, dict]:
    out = {}
    for f in resources.files("nnunet_textguided_plans").iterdir():
        if f.name.endswith(".json"):
            out[f.name[:-5]] = json.loads(f.read_text())
    return out


def configuration_from_preset(plans: dict, preset: dict) -> dict:
    """The configuration a preset adds. A preset either gives ``features_per_stage`` (nnU-Net's UNet, topology
    derived for the patch) or a complete ``architecture`` (e.g. nnFormer, whose crop is fixed) used as is."""
    parent = PlansManager(copy.deepcopy(plans)).get_configuration(preset["inherits_from"]).configuration
    spacing, patch = parent["spacing"], list(preset["patch_size"])
    if len(spacing) != len(patch):
        raise ValueError(f"preset patch {patch} does not match the {len(spacing)}D parent configuration")
    block = {"textguided": copy.deepcopy(preset["textguided"])} if preset.get("textguided") else {}
    if "architecture" in preset:
        out = {"inherits_from": preset["inherits_from"], "patch_size": patch, "batch_size": int(preset["batch_size"]),
               "architecture": copy.deepcopy(preset["architecture"])}
        if "deep_supervision" in preset:
            out["deep_supervision"] = bool(preset["deep_supervision"])
        return {**out, **block}
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
            "batch_size": int(preset["batch_size"]), "architecture": arch, **block}


def add_configuration(plans_file: str | Path, preset: str, name: str | None = None, method: str | None = None,
                      values: dict | None = None, force: bool = False, dry_run: bool = False,
                      batch_size: int | None = None) -> dict:
    """Add configuration ``name`` (default: the preset's name) to a plans file (atomic rewrite): a preset of
    plans/, or a configuration the plans already have (nnU-Net's 3d_fullres...: then the new one inherits from it),
    with ``values`` (typed, checked by ``settings``) written into its ``textguided.<method>`` block. Blocks of
    other methods already in that configuration are kept. A configuration that exists with other contents is
    replaced only with ``force``. ``dry_run``: check everything, write nothing. Returns {"configuration", "method",
    "changed", "block"}. ``batch_size`` replaces the configuration's nnU-Net batch size (global: nnUNetv2_train
    -num_gpus N splits it over the GPUs)."""
    plans_file = Path(plans_file)
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} does not exist: run nnUNetv2_plan_and_preprocess for this dataset first")
    plans = json.loads(plans_file.read_text())
    presets = available_presets()
    configurations = plans["configurations"]
    if preset in presets:
        parent = presets[preset]["inherits_from"]
        if parent not in configurations:
            raise ValueError(f"{plans_file} has no configuration '{parent}' for preset '{preset}' to inherit from "
                             "(nnU-Net skips 3d configurations for 2D data)")
        new = configuration_from_preset(plans, presets[preset])
    elif preset in configurations:
        new = copy.deepcopy(configurations[preset]) if (name or preset) == preset else {"inherits_from": preset}
        new.pop("textguided", None) if (name or preset) != preset else None
    else:
        raise KeyError(f"unknown preset '{preset}'; presets: {', '.join(sorted(presets))}; or a configuration of "
                       f"{plans_file.name}: {', '.join(configurations)}")
    name = name or preset
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise settings.SettingsError(f"--batch_size must be a positive integer, got {batch_size!r}")
        new["batch_size"] = batch_size
    block = dict(new.get("textguided") or {})
    old = configurations.get(name)
    old_block = dict((old or {}).get("textguided") or {}) if "method" not in ((old or {}).get("textguided") or {}) \
        else {}
    values = dict(values or {})
    if method is None and values:
        if len(block) != 1:
            raise settings.SettingsError(
                f"name the method of the settings with --method ({', '.join(settings.SCHEMAS)}): preset '{preset}' is "
                + (f"for {', '.join(block)}" if block else "for no method in particular"))
        method = next(iter(block))
    if method is not None:
        settings.schema(method)
        given = settings.check_values(method, {**block.get(method, {}), **values}, "add-config")
        block[method] = given
    for m, v in old_block.items():  # other methods' settings in this configuration stay as they are
        if m != method:
            block[m] = v
    for m in block:
        settings.schema(m)
        block[m] = settings.check_values(m, block[m], f"preset '{preset}'")
    if block:
        new["textguided"] = block
    else:
        new.pop("textguided", None)
    changed = old != new
    if changed and old is not None and not force:
        strip = lambda c: {k: v for k, v in c.items() if k != "textguided"}  # noqa: E731
        old_methods = (old.get("textguided") or {})
        same_rest = strip(old) == strip(new) and all(old_methods.get(m) == block.get(m) for m in old_methods)
        if not same_rest:
            raise FileExistsError(f"{plans_file} already has a different configuration '{name}'; pass --force to "
                                  "replace it, or --name another one (trained models keep their own copy in "
                                  "plans.json)")
    if changed and not dry_run:
        configurations[name] = new
        atomic_write_json(plans_file, plans, sort_keys=False)
    return {"configuration": name, "method": method, "changed": changed, "block": block}


def reference_plans(spacing: list[float], modality: str = "CT", name: str = "Dataset000_Reference") -> dict:
    """nnU-Net plans for a dataset that is only described (spacing, modality), not on disk.

    Used to build networks at a paper's configuration without the paper's data (parameter/FLOP reports,
    benchmarks): ``2d`` and ``3d_fullres`` configurations with nnU-Net's default PlainConvUNet settings, to
    which a preset is then applied exactly as ``add-config`` applies it to a real dataset's plans.
    """
    def configuration(dim: int) -> dict:
        sp = [float(s) for s in spacing[-dim:]]
        return {
            "data_identifier": f"nnUNetPlans_{dim}d", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": [64] * dim, "median_image_size_in_voxels": [256.0] * dim, "spacing": sp,
            "normalization_schemes": ["CTNormalization" if modality == "CT" else "ZScoreNormalization"],
            "use_mask_for_norm": [False], "batch_dice": dim == 2,
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 1, "features_per_stage": [32], "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
                    "kernel_sizes": [[3] * dim], "strides": [[1] * dim], "n_conv_per_stage": [2],
                    "n_conv_per_stage_decoder": [2], "conv_bias": True,
                    "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        }
    dims = (2, 3) if len(spacing) == 3 else (2,)
    return {
        "dataset_name": name, "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [256] * len(spacing), "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(range(len(spacing))), "transpose_backward": list(range(len(spacing))),
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(_CT_INTENSITIES)},
        "configurations": {("3d_fullres" if d == 3 else "2d"): configuration(d) for d in dims},
    }


def preset_plans(preset_name: str, reference: dict | None = None) -> tuple[dict, str]:
    """(plans, configuration name) of a preset applied to reference plans (the preset's own ``reference``
    description, else ``reference``: {spacing, modality})."""
    presets = available_presets()
    if preset_name not in presets:
        raise KeyError(f"unknown preset '{preset_name}'; available: {', '.join(sorted(presets))}")
    preset = presets[preset_name]
    ref = preset.get("reference") or reference
    if ref is None:
        raise ValueError(f"preset '{preset_name}' has no 'reference' description; pass one")
    plans = reference_plans(ref["spacing"], ref.get("modality", "CT"))
    plans["configurations"][preset_name] = configuration_from_preset(plans, preset)
    return plans, preset_name
