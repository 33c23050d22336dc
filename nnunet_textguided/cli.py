"""`nnunet-textguided`: the package's own command (everything else is nnU-Net's stock commands).

  list        trainers, encoder kinds, configuration presets and the trained models in nnUNet_results
  env         print the `export nnUNet_extTrainer=…` line (use: eval "$(nnunet-textguided env)")
  add-config  add a configuration to a dataset's nnUNetPlans.json: a preset (or one of nnU-Net's configurations)
              with the method's settings (--method, --set KEY=VALUE, --settings FILE) under your own --name
  settings    every setting of a method: meaning, type, default, the paper's value and where the paper gives it
  info        a model folder (or -d -c -tr): method, settings, encoders with hashes, parameters, training cases,
              the predict command
  extract     fill the embedding store (same as nnUNetv2_extract_textguided)
  demo        the whole pipeline on a generated CT phantom dataset, on CPU, in minutes
  evaluate    nnUNetv2_evaluate_folder plus HD95, precision, recall, accuracy, both mIoU forms
              (same as nnUNetv2_evaluate_folder_textguided)
  params      trainable / frozen / inference parameters and forward FLOPs of a trainer (paper|tiny|plans)
  preview     PNG panels (image, reference, prediction, note) for a few cases of a prediction folder
  referring-dataset
              generate the synthetic 2D referring dataset (the note names which object is the target)
  text-dependence
              Dice of trained models with true vs shuffled notes (does the model use the text?)
  ablation    the paper's ablation rows of a method (trainer + settings + the paper's figures); with -d -c -o
              trains and scores any subset into one table
  merge       merge partially labelled raw datasets into one universal dataset (unified label vocabulary,
              one sigmoid channel per label, per-case task metadata) for CDPDNet-style training
  partial-phantoms
              generate two partially labelled CT phantom datasets (liver + spleen, right + left kidney)
  convert-lvit
              convert an LViT-format dataset (QaTa-COV19, MosMedData+, MoNuSeg) to nnU-Net raw 2D with notes
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys


def user_error_types() -> tuple[type, ...]:
    """Exceptions that are the user's to fix (settings, missing weights, mismatched encoders, stage-1 files,
    partial labels): their message says what and how, so commands print that one line, not a traceback."""
    from .conditioning.slices import SliceTablesRequiredError
    from .encoders.base import EncoderSpecError
    from .settings import SettingsError
    from .training.base import CheckpointError, EncoderMismatchError
    from .training.cdpdnet import PartialLabelError
    from .training.mptpn import StageOneError
    return (SettingsError, EncoderSpecError, EncoderMismatchError, CheckpointError, StageOneError, PartialLabelError,
            SliceTablesRequiredError)


def install_one_line_errors() -> None:
    """For nnU-Net's own commands (nnUNetv2_train, nnUNetv2_predict), which import the package's trainers: an
    uncaught user error prints as ``<command>: error: <message>`` (exit status 1) instead of a traceback."""
    if getattr(sys.excepthook, "_textguided", False):
        return
    previous, types = sys.excepthook, user_error_types()

    def hook(kind, value, tb):
        if isinstance(value, types):
            print(f"{os.path.basename(sys.argv[0]) or 'nnunet-textguided'}: error: {value}", file=sys.stderr)
        else:
            previous(kind, value, tb)
    hook._textguided = True
    sys.excepthook = hook


def trainers_folder() -> str:
    import nnunet_textguided_trainers
    return os.path.abspath(list(nnunet_textguided_trainers.__path__)[0])


def cmd_env(args) -> int:
    folder = trainers_folder()
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p and p != folder]
    print(f"export nnUNet_extTrainer={os.pathsep.join([folder] + current)}")
    return 0


METHOD_NAMES = {"biclip": "BiCLIP", "cdpdnet": "CDPDNet", "reclmis": "RecLMIS", "tgcnet": "TGC-Net",
                "mptpn": "MPTPN"}


def cmd_list(args) -> int:
    from .encoders import list_encoder_kinds
    from .presets import available_presets
    from .training import trainer_classes
    trainers = trainer_classes()
    short = [t for t in trainers if t.schedule_of is not None]
    print("Trainers (nnUNetv2_train DATASET CONFIG FOLD -tr NAME), by method; each method's paper trainer first, "
          "then its ablations and variants:")
    for method, title in METHOD_NAMES.items():
        print(f"  {title}")
        for t in trainers:
            if t.textguided_method == method and (args.all or t.schedule_of is None):
                print(f"    {t.__name__:36s} {(t.__doc__ or '').strip().splitlines()[0]}")
    if not args.all:
        print(f"  (and {len(short)} short schedules for CPU tests and demos, e.g. {short[0].__name__}: "
              "nnunet-textguided list --all)")
    print("\nEncoder kinds (specs for the *_encoder settings: add-config --set image_encoder=SPEC):")
    for kind, example, desc in list_encoder_kinds():
        print(f"  {kind:13s} {example:60s} {desc}")
    print("\nConfiguration presets (nnunet-textguided add-config -d DATASET PRESET [--name CONFIGURATION]):")
    for name, p in sorted(available_presets().items()):
        print(f"  {name:20s} {', '.join(p.get('textguided', {})) or '-':22s} {p.get('description', '')}")
    from .evaluation.info import trained_models
    models = trained_models()
    if models:
        print("\nTrained models (nnunet-textguided info FOLDER):")
        for m in models:
            mark = f"  UNTRAINED ENCODERS: {', '.join(m['untrained_encoders'])}" if m["untrained_encoders"] else ""
            print(f"  {m['folder']}  [{m['method']}]{mark}")
    return 0


def parse_set_arguments(method: str | None, items: list[str]) -> tuple[str | None, dict]:
    """``--set KEY=VALUE`` items -> typed values (``settings.parse_text``); the method must be known."""
    from . import settings
    values = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise settings.SettingsError(f"--set {item!r}: write KEY=VALUE"
                                         + (f". {settings._valid_keys(method)}" if method else ""))
        values[key.strip()] = text
    if values and method is None:
        return None, values  # typed once the method is known (from the preset)
    return method, {k: settings.parse_text(method, k, v) for k, v in values.items()}


def cmd_add_config(args) -> int:
    from . import settings
    from .data.names import dataset_name
    from .encoders.registry import portable_spec
    from .presets import add_configuration, available_presets
    prog = "nnunet-textguided add-config"
    try:
        settings.check_environment(prog)
        preprocessed = os.environ.get("nnUNet_preprocessed")
        if not preprocessed:
            raise FileNotFoundError("nnUNet_preprocessed is not set: export it as for nnUNetv2_plan_and_preprocess")
        dataset = dataset_name(args.d, ("nnUNet_preprocessed",))
        plans_file = os.path.join(preprocessed, dataset, args.p + ".json")
        method = args.method
        values: dict = {}
        if args.settings:
            method, values = settings.read_settings_file(args.settings, method)
        if method is None and (values or args.set):
            preset = available_presets().get(args.preset, {})
            methods = list(preset.get("textguided", {}))
            if len(methods) == 1:
                method = methods[0]
        if method is None and (values or args.set):
            raise settings.SettingsError(f"name the method of the settings: --method "
                                         f"{'|'.join(settings.SCHEMAS)} (preset '{args.preset}' is for "
                                         f"{', '.join(available_presets().get(args.preset, {}).get('textguided', {})) or 'no method in particular'})")
        _, typed = parse_set_arguments(method, args.set or [])
        values = {**values, **typed}
        for key in settings.encoder_keys(method) if method else ():
            if isinstance(values.get(key), str):
                values[key] = portable_spec(values[key])
        planned = add_configuration(plans_file, args.preset, args.name, method, values, args.force, dry_run=True,
                                    batch_size=args.batch_size)
        check_block_available(planned["block"], method)  # before anything is written
        result = add_configuration(plans_file, args.preset, args.name, method, values, force=args.force,
                                   batch_size=args.batch_size)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:  # SettingsError, EncoderSpecError
        print(f"{prog}: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    name = result["configuration"]
    print(f"{plans_file}: configuration '{name}' " + ("written" if result["changed"] else "already up to date"))
    for m, block in result["block"].items():
        shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in block.items()) or "the paper's defaults"
        print(f"  {m}: {shown}")
    trainers = {"biclip": "BiCLIPTrainer", "cdpdnet": "CDPDNetTrainer", "reclmis": "RecLMISTrainer",
                "tgcnet": "TGCNetTrainer", "mptpn": "MPTPNTrainer"}
    for m in result["block"]:
        print(f"  train: nnUNetv2_train {args.d} {name} FOLD -tr {trainers[m]}")
    return 0


def check_block_available(block: dict, method: str | None) -> None:
    """Every encoder and weights file the configured methods would use is here (EncoderUnavailableError /
    SettingsError otherwise): the same check nnUNetv2_train makes, before anything is written."""
    from . import settings
    from .encoders.registry import check_available
    for m, values in block.items():
        if method is not None and m != method:
            continue
        s = settings.resolve(m, {"textguided": {m: values}})
        for key in settings.encoder_keys(m):
            spec = getattr(s, key)
            try:
                check_available(spec)
            except ValueError as e:
                raise type(e)(f"setting {key}: {e}") from None
        for key in settings.path_keys(m):
            if getattr(s, key) and not settings.resolve_path(getattr(s, key)).is_file():
                raise settings.SettingsError(f"setting {key}: {settings.resolve_path(getattr(s, key))} not found")


def cmd_settings(args) -> int:
    from . import settings
    methods = [args.method] if args.method else list(settings.SCHEMAS)
    try:
        texts = [settings.describe(m, markdown=args.markdown) for m in methods]
    except settings.SettingsError as e:
        print(f"nnunet-textguided settings: error: {e}", file=sys.stderr)
        return 2
    print("\n\n".join(texts))
    return 0


#: subcommands with their own parser: "module:function" (called with the remaining arguments) and help
_DELEGATED = {
    "extract": (".conditioning.extract:main", "fill the embedding store (nnUNetv2_extract_textguided)"),
    "demo": (".demo:main", "run the whole pipeline on generated data (CPU)"),
    "evaluate": (".evaluation.evaluate:main", "evaluate a prediction folder with the papers' metrics"),
    "params": (".evaluation.params:main", "parameter counts and FLOPs of a trainer"),
    "preview": (".evaluation.overlay:main", "PNG panels of a prediction folder"),
    "referring-dataset": (".data.referring:main", "generate the synthetic 2D referring dataset"),
    "text-dependence": (".evaluation.text_dependence:main", "Dice with true vs shuffled notes"),
    "ablation": (".evaluation.ablations:main", "list a paper's ablation rows (trainer + settings), or train and score "
                 "some of them into one table"),
    "merge": (".data.merge:main", "merge partially labelled raw datasets into one universal dataset"),
    "partial-phantoms": (".data.synthetic:partial_phantoms_main", "generate two partially labelled phantom datasets"),
    "info": (".evaluation.info:main", "describe a model folder: settings, encoders, parameters, predict command"),
    "evaluate-universal": (".evaluation.universal:main", "a universal model on each source dataset's own test set: "
                           "one summary per source, a label x dataset Dice table"),
    "pretrain-ppe": (".training.ppe_pretrain:main", "MPTPN stage 1: SimSiam-pretrain the prior prompt encoder on image-caption pairs"),
    "convert-lvit": (".data.lvit:main", "convert an LViT-format dataset (QaTa-COV19, MosMedData+, MoNuSeg) to nnU-Net raw 2D with notes"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nnunet-textguided", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="trainers by method, encoder kinds, presets, trained models")
    ls.add_argument("--all", action="store_true", help="also the short schedules (_2epochs, _40epochs ...) of tests "
                    "and demos")
    ls.set_defaults(fn=cmd_list)
    sub.add_parser("env", help="print the nnUNet_extTrainer export line").set_defaults(fn=cmd_env)
    a = sub.add_parser("add-config", help="add a configuration (a preset + a method's settings) to nnUNetPlans.json",
                       description="Writes configuration CONFIGURATION (default: the preset's name) into the dataset's "
                       "plans: the preset's patch, batch and network, and the method's settings in its textguided "
                       "block. Train it with nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER: the results "
                       "folder is named after the configuration, so each choice of settings gets its own. Keys: "
                       "nnunet-textguided settings [METHOD].")
    a.add_argument("-d", required=True, help="dataset name or id")
    a.add_argument("preset", help="a preset (nnunet-textguided list), e.g. 3d_nnformer_synapse, or a configuration "
                   "of the plans, e.g. 3d_fullres (the new configuration then inherits from it)")
    a.add_argument("--name", help="the configuration's name (default: the preset's)")
    a.add_argument("--method", help="the method the settings are for (default: the preset's, if it has one)")
    a.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="settings, e.g. --set image_encoder=pmcclip:pmc-clip/image_encoder(resnet50).pth epochs=300; "
                   "lists comma-separated, none for an empty value")
    a.add_argument("--settings", metavar="FILE", help="settings file, JSON or YAML: {key: value} or {method: {key: "
                   "value}}; --set values win")
    a.add_argument("--batch_size", type=int, help="nnU-Net's batch size of the configuration, replacing the preset's "
                   "(global: nnUNetv2_train -num_gpus N splits it), e.g. 2 where the paper's 32 does not fit")
    a.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    a.add_argument("--force", action="store_true", help="replace a different configuration of the same name")
    a.set_defaults(fn=cmd_add_config)
    st = sub.add_parser("settings", help="every setting of a method, with the paper's values")
    st.add_argument("method", nargs="?", help="biclip, cdpdnet, reclmis, tgcnet or mptpn (default: all)")
    st.add_argument("--markdown", action="store_true", help="markdown tables (docs/settings.md)")
    st.set_defaults(fn=cmd_settings)
    for name, (_, help_) in _DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)
    if hasattr(signal, "SIGPIPE"):  # `nnunet-textguided list | head` ends quietly, as other Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        import importlib
        module, func = _DELEGATED[argv[0]][0].split(":")
        return getattr(importlib.import_module(module, __package__), func)(argv[1:])
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
