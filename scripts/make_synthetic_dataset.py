#!/usr/bin/env python
"""Write synthetic contrast-enhanced abdominal CT phantoms as an nnU-Net v2 raw dataset (with text notes).

Thin command-line wrapper around nnunet_textguided.data.synthetic.make_ct_phantom_dataset.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_synthetic_dataset.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write synthetic contrast-enhanced abdominal CT phantoms as the nnU-Net v2 raw dataset\n"
            "<out>/DatasetXXX_Name: imagesTr/<CASE>_0000.nii.gz (int16 HU), labelsTr/<CASE>.nii.gz\n"
            "(0 background, 1 liver, 2 spleen, 3 kidneys), the same for imagesTs/labelsTs, and dataset.json\n"
            "(with label_descriptions). Beside every image lie <CASE>.txt, a clinical note generated from\n"
            "the case's findings (enlarged liver, enlarged/small/absent spleen, small left kidney), and\n"
            "<CASE>.aux.txt, a short generic description of where the organs lie. Case ids: phantom_000...,\n"
            "training cases first. Output is deterministic for a given --seed. Orientation: identity\n"
            "direction (LPS); patient's right is on the image left (liver left, spleen right)."),
        epilog=(
            "example:\n"
            "  export nnUNet_raw=/data/nnUNet_raw\n"
            "  python scripts/make_synthetic_dataset.py --id 990 --n-train 10 --n-test 3\n"
            "  nnUNetv2_plan_and_preprocess -d 990 --verify_dataset_integrity"),
    )
    p.add_argument("--out", default=os.environ.get("nnUNet_raw"),
                   help="nnU-Net raw folder to write into (default: $nnUNet_raw"
                        + (f", currently {os.environ['nnUNet_raw']}" if os.environ.get("nnUNet_raw") else
                           ", which is not set") + ")")
    p.add_argument("--id", type=int, default=990, help="dataset id, 1-999 (default: 990)")
    p.add_argument("--name", default="TextGuidedPhantom", help="dataset name (default: TextGuidedPhantom)")
    p.add_argument("--n-train", type=int, default=10, help="number of training cases (default: 10)")
    p.add_argument("--n-test", type=int, default=3, help="number of test cases (default: 3)")
    p.add_argument("--shape", type=int, nargs=3, default=(32, 64, 64), metavar=("Z", "Y", "X"),
                   help="volume size in voxels, z y x (default: 32 64 64)")
    p.add_argument("--spacing", type=float, nargs=3, default=(2.5, 1.25, 1.25), metavar=("Z", "Y", "X"),
                   help="voxel spacing in mm, z y x (default: 2.5 1.25 1.25)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed = identical dataset (default: 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DatasetXXX_Name folder (otherwise it is an error)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out:
        print("error: no output folder: pass --out or set nnUNet_raw", file=sys.stderr)
        return 2
    from nnunet_textguided.data.synthetic import make_ct_phantom_dataset

    t0 = time.perf_counter()
    try:
        folder = make_ct_phantom_dataset(args.out, dataset_id=args.id, name=args.name, n_train=args.n_train,
                                         n_test=args.n_test, shape=tuple(args.shape), spacing=tuple(args.spacing),
                                         seed=args.seed, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {folder} ({args.n_train} training + {args.n_test} test cases, shape {tuple(args.shape)}, "
          f"seed {args.seed}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
