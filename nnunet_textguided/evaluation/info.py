"""`nnunet-textguided info MODEL_FOLDER` (or ``-d D -c C -tr T``): what a model is, from its own folder.

A model folder holds everything but weight files: nnU-Net's copy of plans.json with the resolved ``textguided``
block (method, every setting, encoder identities: spec, weight sha256, embedding size, trained or not) and
dataset.json. ``info`` reports the method, the configuration, every setting (with the paper's value, and whether it
differs from the trainer's default), the encoders with their hashes and where this machine finds their weights,
trainable / frozen / inference parameters (counted on the meta device: no weights are loaded), the training cases
and the exact predict command. Given ``-d -c -tr`` for a model not trained yet, it describes what
``nnUNetv2_train`` would train from the dataset's plans.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .. import settings as settings_schema

PROG = "nnunet-textguided info"


def trained_models(results: str | None = None) -> list[dict]:
    """[{folder, method, untrained_encoders}] of the package's trained models under ``nnUNet_results``."""
    results = results or os.environ.get("nnUNet_results")
    if not results or not os.path.isdir(results):
        return []
    out = []
    for plans_file in sorted(Path(results).glob("*/*__*__*/plans.json")):
        name = plans_file.parent.name.split("__")[-1]
        try:
            block = json.loads(plans_file.read_text())["configurations"][name]["textguided"]
        except (KeyError, TypeError, ValueError, OSError):
            continue
        if isinstance(block, dict) and "method" in block:
            out.append({"folder": str(plans_file.parent.relative_to(results)), "method": block["method"],
                        "untrained_encoders": sorted(s for s, r in block.get("encoders", {}).items()
                                                     if r.get("untrained"))})
    return out


def locate(model_folder: str | None, dataset: str | None, configuration: str | None, trainer: str | None,
           plans: str = "nnUNetPlans") -> dict:
    """{folder, trained, trainer, plans_name, configuration, plans, dataset_json} of a model folder, or of the
    dataset's plans when the model is not trained yet."""
    if model_folder:
        folder = Path(model_folder)
        if not (folder / "plans.json").is_file():
            raise FileNotFoundError(f"{folder} is not a model folder (no plans.json): give the folder "
                                    "nnUNetv2_train wrote, nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION")
        parts = folder.resolve().name.split("__")
        if len(parts) != 3:
            raise FileNotFoundError(f"{folder}: a model folder is named TRAINER__PLANS__CONFIGURATION")
        trainer, plans, configuration = parts
        return {"folder": str(folder), "trained": True, "trainer": trainer, "plans_name": plans,
                "configuration": configuration, "plans": json.loads((folder / "plans.json").read_text()),
                "dataset_json": json.loads((folder / "dataset.json").read_text())}
    if not (dataset and configuration and trainer):
        raise ValueError("give a MODEL_FOLDER, or -d DATASET -c CONFIGURATION -tr TRAINER")
    from ..data.names import dataset_name
    name = dataset_name(dataset)
    results = os.environ.get("nnUNet_results")
    folder = Path(results, name, f"{trainer}__{plans}__{configuration}") if results else None
    if folder is not None and (folder / "plans.json").is_file():
        return locate(str(folder), None, None, None)
    pre = os.environ.get("nnUNet_preprocessed")
    plans_file = Path(pre or "", name, plans + ".json")
    if not pre or not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    return {"folder": str(folder) if folder else None, "trained": False, "trainer": trainer, "plans_name": plans,
            "configuration": configuration, "plans": json.loads(plans_file.read_text()),
            "dataset_json": json.loads((plans_file.parent / "dataset.json").read_text())}


def describe_model(where: dict) -> dict:
    """Everything ``info`` prints, as a dict."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from ..encoders.registry import check_available, is_untrained_spec
    from ..training.base import encoder_location
    from .params import build_for_counting, count_built, trainer_class
    trainer = trainer_class(where["trainer"])
    pm = PlansManager(where["plans"])
    if where["configuration"] not in where["plans"]["configurations"]:
        raise KeyError(f"configuration '{where['configuration']}' is not in the plans; configurations: "
                       f"{', '.join(where['plans']['configurations'])}")
    cm = pm.get_configuration(where["configuration"])
    method = trainer.textguided_method
    s = trainer.resolve_settings(cm.configuration, f"configuration '{where['configuration']}'")
    values = settings_schema.as_dict(s)
    variant = settings_schema.check_values(method, trainer.own_settings())
    defaults = settings_schema.as_dict(settings_schema.schema(method)())
    rows = []
    for name, k in settings_schema.keys(method).items():
        expected = variant.get(name, defaults[name])
        rows.append({"key": name, "value": values[name], "trainer_default": expected,
                     "set": values[name] != expected, "paper": k.paper, "where": k.where})
    block = cm.configuration.get("textguided") if where["trained"] else None
    if not (isinstance(block, dict) and "method" in block):
        block = trainer.textguided_block(pm, cm, s, where["dataset_json"])
    encoders = []
    for spec, rec in block.get("encoders", {}).items():
        try:
            available = check_available(spec)
        except ValueError as e:
            available = f"missing: {e}"
        roles = [k for k in settings_schema.encoder_keys(method) if values.get(k) == spec]
        encoders.append({"spec": spec, "settings": roles, "weight_hash": rec.get("weight_hash"),
                         "embed_dim": rec.get("embed_dim"), "untrained": rec.get("untrained", is_untrained_spec(spec)),
                         "location": encoder_location(spec), "available": available})
    try:
        report = count_built(trainer, *build_for_counting(trainer, where["plans"], where["configuration"],
                                                          where["dataset_json"], device="meta"))
        params = {"trainable": report.trainable, "training_only": report.training_only, "frozen": report.frozen,
                  "inference": report.inference}
    except Exception as e:  # noqa: BLE001 - counting needs encoder configs that may be absent here
        params = {"error": f"{type(e).__name__}: {e}"}
    dj = where["dataset_json"]
    return {"folder": where["folder"], "trained": where["trained"], "trainer": where["trainer"], "method": method,
            "dataset": where["plans"].get("dataset_name"), "plans": where["plans_name"],
            "configuration": where["configuration"], "settings": rows, "encoders": encoders,
            "untrained_encoders": sorted(e["spec"] for e in encoders if e["untrained"]),
            "parameters": params, "training_cases": dj.get("numTraining"), "folds": folds_of(where),
            "predict": predict_command(where, block)}


def folds_of(where: dict) -> dict[str, list[str]]:
    if not where["trained"]:
        return {}
    folder = Path(where["folder"])
    return {d.name: sorted(f.name for f in d.glob("checkpoint_*.pth")) for d in sorted(folder.glob("fold_*"))}


def predict_command(where: dict, block: dict) -> str:
    """The predict command of this model, with the user's placeholders for input and output."""
    needs_case = bool(block.get("notes")) or (block.get("mode") == "offline" and bool(block.get("streams"))) or block.get("method") == "cdpdnet"
    command = "nnUNetv2_predict_textguided" if needs_case else "nnUNetv2_predict"
    folds = ",".join(f.removeprefix("fold_") for f in folds_of(where)) if where["trained"] else "0"
    cmd = (f"{command} -i INPUT_FOLDER -o OUTPUT_FOLDER -d {where['plans'].get('dataset_name')} -c "
           f"{where['configuration']} -tr {where['trainer']} -p {where['plans_name']} -f {' '.join(folds.split(','))}")
    if block.get("notes"):
        cmd += "   # reads <CASE>.txt beside each image" + (" (and <CASE>.aux.txt)" if block.get("aux_notes") else "")
    elif block.get("method") == "cdpdnet":
        cmd += "   # add --labels \"...\" / --task NAME to choose labels"
    return cmd


def format_info(d: dict) -> str:
    state = "trained" if d["trained"] else "not trained yet (what nnUNetv2_train would train)"
    lines = [f"{d['trainer']} ({d['method']}) — {d['dataset']}, configuration {d['configuration']}, plans "
             f"{d['plans']}: {state}"]
    if d["folder"]:
        lines.append(f"model folder: {d['folder']}")
    if d["untrained_encoders"]:
        lines.append(f"UNTRAINED ENCODERS: {', '.join(d['untrained_encoders'])} (random-init stand-ins: the "
                     "results say nothing about the method)")
    lines += ["", "settings (* = differs from the trainer's default):"]
    for r in d["settings"]:
        lines.append(f"  {'*' if r['set'] else ' '} {r['key']:26s} {json.dumps(r['value']):48s} paper: {r['paper']}")
    lines += ["", "encoders:"]
    for e in d["encoders"]:
        ok = "available" if e["available"] in ("local", "cache", "hub") else e["available"]
        lines.append(f"  {e['spec']}  ({', '.join(e['settings']) or 'derived'})")
        lines.append(f"      weights sha256 {e['weight_hash'] or '(recorded at training start)'}, embed dim "
                     f"{e['embed_dim'] or '?'}, {'UNTRAINED (random init)' if e['untrained'] else 'trained'}")
        lines.append(f"      here: {e['location']}; {ok}")
    p = d["parameters"]
    lines += [""]
    if "error" in p:
        lines.append(f"parameters: not counted here ({p['error']})")
    else:
        lines.append(f"parameters: trainable {p['trainable'] / 1e6:.2f} M (training-only {p['training_only'] / 1e6:.2f}"
                     f" M), frozen {p['frozen'] / 1e6:.2f} M, at inference {p['inference'] / 1e6:.2f} M")
    lines.append(f"training cases: {d['training_cases']} (dataset.json numTraining)")
    for fold, files in d["folds"].items():
        lines.append(f"  {fold}: {', '.join(files) or 'no checkpoint yet'}")
    lines += ["", f"predict: {d['predict']}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_folder", nargs="?", help="nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION")
    p.add_argument("-d", help="dataset name or id (instead of MODEL_FOLDER)")
    p.add_argument("-c", help="configuration")
    p.add_argument("-tr", help="trainer")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("--json", action="store_true", help="print JSON")
    a = p.parse_args(argv)
    try:
        d = describe_model(locate(a.model_folder, a.d, a.c, a.tr, a.p))
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        print(f"{PROG}: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(json.dumps(d, indent=2) if a.json else format_info(d))
    return 0
