"""`nnunet-textguided demo`: the whole pipeline on a generated CT phantom dataset, on CPU.

generate data -> stock nnUNetv2_plan_and_preprocess -> add the 3d_tiny preset -> nnUNetv2_extract_textguided
-> stock nnUNetv2_train -tr <BiCLIP trainer> -> nnUNetv2_predict_textguided on imagesTs (stock nnUNetv2_predict for
online or Net1 trainers) -> nnU-Net's evaluation
-> one PNG overlay. Everything lands under --out; the nnU-Net folders are set for the child processes only.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from .progress import run_logged

DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID:03d}_TextGuidedPhantom"


def demo_env(out: Path) -> dict:
    from .cli import trainers_folder
    env = dict(os.environ)
    env.update(nnUNet_raw=str(out / "nnUNet_raw"), nnUNet_preprocessed=str(out / "nnUNet_preprocessed"),
               nnUNet_results=str(out / "nnUNet_results"), nnUNet_extTrainer=trainers_folder(),
               nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "2"), nnUNet_def_n_proc=env.get("nnUNet_def_n_proc", "1"),
               nnUNet_compile="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run(cmd: list[str], env: dict, log, epochs: int | None = None) -> None:
    """Run one step: its output goes to the log; epochs, progress bars and a sign of life at least every 20 s
    reach the terminal (``progress.run_logged``)."""
    t = time.time()
    print(f"$ {shlex.join(cmd)}", flush=True)
    code = run_logged(cmd, env, log, epochs, echo=lambda line: print(line, flush=True))
    if code:
        raise SystemExit(f"demo: step failed (exit {code}): {shlex.join(cmd)}\n      see {log.name}")
    print(f"  done in {time.time() - t:.0f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nnunet-textguided demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", help="working folder (default ./demo_output)")
    p.add_argument("-tr", default="BiCLIPTrainer_40epochs", help="trainer (default BiCLIPTrainer_40epochs: "
                   "BiCLIP Net4 in the paper's offline mode, tiny encoders)")
    p.add_argument("--n-train", type=int, default=10)
    p.add_argument("--n-test", type=int, default=3)
    args = p.parse_args(argv)

    from .data.synthetic import make_ct_phantom_dataset
    from .evaluation.overlay import preview_folder

    out = Path(args.out).resolve()
    if (out / "nnUNet_raw" / DATASET_NAME).exists():
        raise SystemExit(f"demo: {out} already holds a demo run; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    env = demo_env(out)
    t0 = time.time()
    from .evaluation.params import trainer_class
    try:
        resolved = trainer_class(args.tr).resolve_settings({})
    except KeyError as e:
        raise SystemExit(f"demo: {e.args[0]}")
    paper = getattr(resolved, "mode", "") == "offline" and bool(resolved.streams)  # the store and its predictor
    with open(out / "demo.log", "w") as log:
        print(f"[1/7] generating {args.n_train}+{args.n_test} CT phantoms with notes", flush=True)
        folder = make_ct_phantom_dataset(out / "nnUNet_raw", dataset_id=DATASET_ID, n_train=args.n_train,
                                         n_test=args.n_test)
        print("[2/7] nnU-Net planning and preprocessing (stock command)", flush=True)
        run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2",
             "--verify_dataset_integrity"], env, log)
        from .presets import available_presets
        stand_ins = ", ".join(available_presets()["3d_tiny"]["textguided"]["biclip"].values())
        print(f"[3/7] adding the 3d_tiny configuration preset: a small UNet and the untrained stand-in encoders "
              f"{stand_ins} (a CPU demo of the pipeline, not of the method; the README's GPU section trains the "
              "paper's encoders)", flush=True)
        run(["nnunet-textguided", "add-config", "-d", str(DATASET_ID), "3d_tiny"], env, log)
        if paper:
            print("[4/7] extracting per-slice embeddings into the store (paper mode)", flush=True)
            run(["nnUNetv2_extract_textguided", "-d", str(DATASET_ID), "-c", "3d_tiny", "-tr", args.tr], env, log)
        else:
            print(f"[4/7] no store to fill: {args.tr} embeds slices online", flush=True)
        print(f"[5/7] training {args.tr} on CPU (stock nnUNetv2_train)", flush=True)
        run(["nnUNetv2_train", str(DATASET_ID), "3d_tiny", "0", "-tr", args.tr, "-device", "cpu"], env, log,
            epochs=resolved.epochs)
        pred = out / "predictions"
        predict = "nnUNetv2_predict_textguided" if paper else "nnUNetv2_predict"
        print(f"[6/7] predicting imagesTs ({predict})", flush=True)
        run([predict, "-i", str(folder / "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID), "-c", "3d_tiny",
             "-f", "0", "-tr", args.tr, "-device", "cpu", "-npp", "1", "-nps", "1"], env, log)
        print("[7/7] evaluation (nnU-Net's summary.json + HD95, precision, recall, mIoU) and preview PNGs", flush=True)
        run(["nnUNetv2_evaluate_folder_textguided", str(folder / "labelsTs"), str(pred), "-djfile",
             str(folder / "dataset.json"),
             "-pfile", str(out / "nnUNet_preprocessed" / DATASET_NAME / "nnUNetPlans.json"), "-np", "1"], env, log)
    summary = json.loads((pred / "summary.json").read_text())
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    names = {v: k for k, v in labels.items()}
    previews = preview_folder(pred, folder / "imagesTs", out / "previews", reference_folder=folder / "labelsTs",
                              dataset_json=folder / "dataset.json", n_cases=args.n_test)
    fg = summary["foreground_mean"]
    print(f"\nimagesTs, mean over foreground labels: Dice {fg['Dice']:.3f}  HD95 {fg['HD95']:.1f} mm  "
          f"precision {fg['Precision']:.3f}  recall {fg['Recall']:.3f}")
    for k, v in summary["mean"].items():
        print(f"  {names.get(int(k), k):10s} Dice {v['Dice']:.3f}  HD95 {v['HD95']:6.1f} mm")
    print(f"\nraw data:       {folder}\npreprocessed:   {out / 'nnUNet_preprocessed' / DATASET_NAME}"
          f"\nembedding store: {out / 'nnUNet_preprocessed' / DATASET_NAME / 'nnUNetPlans_3d_fullres' / 'textguided'}"
          f"\nmodel:          {out / 'nnUNet_results' / DATASET_NAME}\npredictions:    {pred}"
          f"\nevaluation:     {pred / 'summary.json'}\npreviews:       {previews[0].parent}"
          f"\nlog:            {out / 'demo.log'}"
          f"\ntotal time:     {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
