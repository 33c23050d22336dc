"""`nnUNetv2_extract_textguided`: fill the embedding store for a dataset/configuration/trainer.

Runs after `nnUNetv2_plan_and_preprocess` (and `nnunet-textguided add-config` for presets). Re-running
skips every case whose stored embeddings match its preprocessed data and the encoder identity; shard large
datasets across processes with -num_parts/-part_id like nnUNetv2_predict. Training extracts lazily what is
missing, so this command is optional — it lets the extraction run once, ahead, on a GPU machine.

Damaged entries (truncated, corrupt, of another encoder's dimension or another slice count) are recomputed with a
warning naming the file; errors (a failed write, NaN embeddings) exit with status 2 and leave the entries stored so
far unchanged.
"""
from __future__ import annotations

import argparse
import sys


def build_trainer(dataset: str, configuration: str, trainer_name: str, plans: str = "nnUNetPlans",
                  fold: int = 0, device: str = "cpu", for_extraction: bool = True, settings: dict | None = None):
    """The trainer nnUNetv2_train would build. ``settings`` ({key: value}) are merged into the configuration's
    ``textguided`` block for the trainer's method in memory only, as ``add-config --set`` would write them."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from ..data.names import dataset_name
    name = dataset_name(dataset, ("nnUNet_preprocessed",))
    folder = join(nnUNet_preprocessed, name)
    plans_file = join(folder, plans + ".json")
    if not isfile(plans_file):
        raise FileNotFoundError(f"{plans_file} not found: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    try:
        trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    except RuntimeError:  # nnU-Net's own lookup raises a multi-line message
        trainer_class = None
    if trainer_class is None:
        raise RuntimeError(f"trainer '{trainer_name}' not found: `nnunet-textguided list` shows the trainers; if it "
                           "is one of them, run `eval $(nnunet-textguided env)` so that nnUNet_extTrainer points at "
                           "the package's trainers folder")
    if for_extraction and not hasattr(trainer_class, "extract"):
        raise RuntimeError(f"trainer '{trainer_name}' needs no offline embeddings (its conditioning is computed "
                           "online or from label texts)")
    plans_dict = load_json(plans_file)
    if configuration not in plans_dict["configurations"]:
        raise ValueError(f"configuration {configuration!r} is not in {plans_file} (configurations: "
                         f"{', '.join(plans_dict['configurations'])}); add one with nnunet-textguided add-config")
    if settings:
        conf = plans_dict["configurations"][configuration]
        block = conf.setdefault("textguided", {})
        method = trainer_class.textguided_method
        block[method] = {**block.get(method, {}), **settings}
    plans_dict["continue_training"] = False  # nnunetv2 2.8 pops this from the plans in the trainer's __init__
    return trainer_class(plans=plans_dict, configuration=configuration, fold=fold,
                         dataset_json=load_json(join(folder, "dataset.json")), device=torch.device(device))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nnUNetv2_extract_textguided", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres or 3d_tiny")
    p.add_argument("-tr", default="BiCLIPTrainer", help="trainer whose conditioning to extract "
                   "(default: BiCLIPTrainer, BiCLIP's paper mode)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-num_parts", type=int, default=1)
    p.add_argument("-part_id", type=int, default=0)
    p.add_argument("-device", "--device", dest="device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    if not 0 <= args.part_id < args.num_parts:
        p.error("-part_id must be in [0, num_parts)")
    try:
        trainer = build_trainer(args.d, args.c, args.tr, args.p, device=args.device)
        counts = trainer.extract(num_parts=args.num_parts, part_id=args.part_id)
    except (OSError, RuntimeError, ValueError) as e:  # StoreWriteError (disk full, read-only) is an OSError
        print(f"nnUNetv2_extract_textguided: error: {e}", file=sys.stderr)
        return 2
    print(f"embeddings computed: {counts['computed']}, already current: {counts['skipped']} "
          f"(store under {trainer.preprocessed_dataset_folder}/textguided)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
