"""`nnunet-textguided`: the package's own command (everything else is nnU-Net's stock commands).

  list        trainers, encoder kinds and configuration presets
  env         print the `export nnUNet_extTrainer=…` line (use: eval "$(nnunet-textguided env)")
  add-config  add configuration presets (3d_tiny, 2d_tiny) to a dataset's nnUNetPlans.json
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
  merge       merge partially labelled raw datasets into one universal dataset (unified label vocabulary,
              one sigmoid channel per label, per-case task metadata) for CDPDNet-style training
  partial-phantoms
              generate two partially labelled CT phantom datasets (liver + spleen, right + left kidney)
  convert-lvit
              convert an LViT-format dataset (QaTa-COV19, MosMedData+, MoNuSeg) to nnU-Net raw 2D with notes
"""
from __future__ import annotations

import argparse
import os
import sys


def trainers_folder() -> str:
    import nnunet_textguided_trainers
    return os.path.abspath(list(nnunet_textguided_trainers.__path__)[0])


def cmd_env(args) -> int:
    folder = trainers_folder()
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p and p != folder]
    print(f"export nnUNet_extTrainer={os.pathsep.join([folder] + current)}")
    return 0


def cmd_list(args) -> int:
    from .encoders import list_encoder_kinds
    from .presets import available_presets
    from .training import trainer_classes
    print("Trainers (nnUNetv2_train DATASET CONFIG FOLD -tr NAME):")
    for t in trainer_classes():
        print(f"  {t.__name__:34s} {(t.__doc__ or '').strip().splitlines()[0]}")
    print("\nEncoder kinds (specs for nnUNet_textguided_*_encoder):")
    for kind, example, desc in list_encoder_kinds():
        print(f"  {kind:13s} {example:60s} {desc}")
    print("\nConfiguration presets (nnunet-textguided add-config -d DATASET NAME…):")
    for name, p in sorted(available_presets().items()):
        print(f"  {name:16s} {p.get('description', '')}")
    return 0


def cmd_add_config(args) -> int:
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from .presets import add_configurations
    if nnUNet_preprocessed is None:
        print("nnunet-textguided add-config: error: nnUNet_preprocessed is not set", file=sys.stderr)
        return 2
    plans_file = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(args.d), args.p + ".json")
    try:
        changed = add_configurations(plans_file, args.presets, force=args.force)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"nnunet-textguided add-config: error: {e}", file=sys.stderr)
        return 2
    print(f"{plans_file}: " + (f"added {', '.join(changed)}" if changed else "already up to date"))
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
    "merge": (".data.merge:main", "merge partially labelled raw datasets into one universal dataset"),
    "partial-phantoms": (".data.synthetic:partial_phantoms_main", "generate two partially labelled phantom datasets"),
    "pretrain-ppe": (".training.ppe_pretrain:main", "MPTPN stage 1: SimSiam-pretrain the prior prompt encoder on image-caption pairs"),
    "convert-lvit": (".data.lvit:main", "convert an LViT-format dataset (QaTa-COV19, MosMedData+, MoNuSeg) to nnU-Net raw 2D with notes"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nnunet-textguided", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="trainers, encoder kinds, presets").set_defaults(fn=cmd_list)
    sub.add_parser("env", help="print the nnUNet_extTrainer export line").set_defaults(fn=cmd_env)
    a = sub.add_parser("add-config", help="add configuration presets to nnUNetPlans.json")
    a.add_argument("-d", required=True, help="dataset name or id")
    a.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    a.add_argument("--force", action="store_true", help="replace a different configuration of the same name")
    a.add_argument("presets", nargs="+", help="preset names, e.g. 3d_tiny")
    a.set_defaults(fn=cmd_add_config)
    for name, (_, help_) in _DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        import importlib
        module, func = _DELEGATED[argv[0]][0].split(":")
        return getattr(importlib.import_module(module, __package__), func)(argv[1:])
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
