"""``scripts/gpu_check``: every method trains a few iterations and predicts one case, as nnUNetv2_train and
nnUNetv2_predict_textguided run them, and one table says how it went.

  scripts/gpu_check                      # the GPU: paper configurations, real-size encoders
  scripts/gpu_check --device cpu         # the CPU: tiny presets and tiny encoders (what the test runs)

For each method (BiCLIP, CDPDNet, RecLMIS, TGC-Net, MPTPN):

1. a small generated dataset of the method's kind (CT phantoms, a merged partial-label universal dataset, the
   2D referring images with notes), planned and preprocessed by stock ``nnUNetv2_plan_and_preprocess``;
2. the configuration ``add-config`` writes from the paper preset (``--device cuda``; each method's per-GPU
   batch) or the tiny preset (``--device cpu``). Every paper encoder whose weights are here is used as is; the
   others are replaced by real-size random-init stand-ins built from their configs (``encoders.standins``),
   so speed and memory are those of the real encoders and nothing is downloaded;
3. the trainer nnUNetv2_train builds, with nnU-Net's own decisions: ``torch.compile`` of the network (on CUDA
   unless ``nnUNet_compile`` says otherwise) and autocast (fp16 on CUDA), its own dataloaders and
   ``train_step``; two warm-up iterations (the first compiles), then the timed ones; peak memory is CUDA's
   ``max_memory_allocated`` during the timed iterations, on CPU the process's resident-set high-water mark;
4. the final checkpoint predicted on one test case by the predictor of ``nnUNetv2_predict_textguided`` (the
   sequential path, ``-npp 0 -nps 0``): preprocessing, the case's note or slice embeddings, sliding window
   with mirroring, export.

Each method runs in its own process (clean GPU state, its own memory high-water mark); one that fails is a row
saying why, and the command exits non-zero. MPTPN runs as ``MPTPNTrainer_noPretrain`` (Table 3's PPE*): the same
network and step without the stage-1 checkpoint, which only ``nnunet-textguided pretrain-ppe`` can produce.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .progress import run_logged

#: method -> (trainer, dataset kind, per-GPU batch at the paper configuration and where it comes from)
METHODS = {
    "BiCLIP": ("BiCLIPTrainer", "phantom", 8, "Synapse: 32 on 4 GPUs"),
    "CDPDNet": ("CDPDNetTrainer", "universal", 1, "1 per GPU on 8 GPUs"),
    "RecLMIS": ("RecLMISTrainer", "referring", 32, "the preset's"),
    "TGC-Net": ("TGCNetTrainer", "referring", 8, "the preset's"),
    "MPTPN": ("MPTPNTrainer_noPretrain", "referring", 8, "the preset's"),
}
DATASET_IDS = {"phantom": 931, "universal": 934, "referring": 935}
PARTIAL_IDS = (932, 933)
COLUMNS = ("method", "trainer", "configuration", "batch", "compile", "AMP", "setup s", "first it s", "s/it",
           "peak memory GiB", "predict s/case")


def _env(root: Path) -> dict:
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(root / name)
        (root / name).mkdir(parents=True, exist_ok=True)
    from .cli import trainers_folder
    env["nnUNet_extTrainer"] = trainers_folder()
    env.setdefault("nnUNet_n_proc_DA", str(min(os.cpu_count() or 1, 8)))
    return env


def _run(cmd: list[str], env: dict, log, timeout: float | None = None) -> None:
    """Run a step with its output in the log, a sign of life on the terminal (``progress.run_logged``)."""
    code = run_logged(cmd, env, log, echo=lambda line: print(line, flush=True), timeout=timeout)
    if code:
        raise RuntimeError(f"{Path(cmd[0]).name} ... exit code {code} (see {log.name})")


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def make_dataset(kind: str, env: dict, paper: bool, log) -> str:
    """Generate, plan and preprocess one small dataset of ``kind``; returns its id."""
    raw = Path(env["nnUNet_raw"])
    dataset = str(DATASET_IDS[kind])
    if kind == "phantom":
        from .data.synthetic import make_ct_phantom_dataset
        make_ct_phantom_dataset(raw, dataset_id=DATASET_IDS[kind], name="GpuCheckPhantom", n_train=2, n_test=1,
                                shape=(32, 128, 128) if paper else (24, 48, 48), seed=1)
    elif kind == "universal":
        from .data.synthetic import make_partial_phantom_datasets
        make_partial_phantom_datasets(raw, datasets={PARTIAL_IDS[0]: ("GpuCheckLiverSpleen", ["liver", "spleen"]),
                                                     PARTIAL_IDS[1]: ("GpuCheckKidneys", ["right kidney",
                                                                                          "left kidney"])},
                                      n_train=1, n_test=1, shape=(48, 96, 96) if paper else (16, 32, 32), seed=2)
        _run([_bin("nnunet-textguided"), "merge", "-d", *map(str, PARTIAL_IDS), "-o", dataset, "--name",
              "GpuCheckUniversal"], env, log)
    else:
        from .data.referring import make_referring_dataset
        make_referring_dataset(raw, dataset_id=DATASET_IDS[kind], name="GpuCheckReferring", n_train=4, n_test=1,
                               size=224 if paper else 64, seed=3, aux_fraction=0.5)
    configuration = "2d" if kind == "referring" else "3d_fullres"
    _run([_bin("nnUNetv2_plan_and_preprocess"), "-d", dataset, "-c", configuration, "-np", "2",
          "--verify_dataset_integrity"], env, log)
    return dataset


def encoder_settings(trainer, device: str, folder: Path, log, made: dict[str, str]) -> list[str]:
    """``--set`` items replacing each paper encoder whose weights are not here by a real-size stand-in (``made``:
    {spec: stand-in spec} built so far, shared by the methods)."""
    from .encoders.registry import EncoderUnavailableError, check_available
    from .encoders.standins import save_real_size_standin
    from .settings import encoder_keys
    defaults = trainer.resolve_settings({})
    items = []
    for key in encoder_keys(trainer.textguided_method):
        spec = getattr(defaults, key)
        if spec in made:
            items.append(f"{key}={made[spec]}")
            continue
        try:
            check_available(spec)
            log.write(f"{trainer.__name__}: {key} = {spec} (weights here)\n")
            continue
        except EncoderUnavailableError:
            pass
        t = time.time()
        made[spec] = save_real_size_standin(spec, folder / f"standin_{len(list(folder.glob('standin_*')))}", device)
        if device == "cuda":  # the methods train in other processes: give the GPU memory back
            import torch
            torch.cuda.empty_cache()
        log.write(f"{trainer.__name__}: {key} = {spec} absent; real-size stand-in {made[spec]} "
                  f"({time.time() - t:.0f} s)\n")
        items.append(f"{key}={made[spec]}")
    return items


def configure(method: str, dataset: str, paper: bool, env: dict, folder: Path, device: str, log,
              standins: dict[str, str]) -> str:
    """Write the method's check configuration into the dataset's plans; returns its name."""
    from .evaluation.params import trainer_class
    trainer_name, _, batch, _ = METHODS[method]
    trainer = trainer_class(trainer_name)
    name = f"gpucheck_{trainer.textguided_method}"
    if paper:
        items = encoder_settings(trainer, device, folder, log, standins)
        cmd = [_bin("nnunet-textguided"), "add-config", "-d", dataset, trainer.paper_preset, "--name", name,
               "--method", trainer.textguided_method, "--batch_size", str(batch)]
    else:
        items = []
        cmd = [_bin("nnunet-textguided"), "add-config", "-d", dataset, trainer.tiny_preset, "--name", name,
               "--method", trainer.textguided_method]
    _run(cmd + (["--set", *items] if items else []) + ["--force"], env, log)
    return name


# -- one method, in its own process -------------------------------------------------------------------------
def _peak_memory_gib(device) -> float:
    import resource

    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def run_one(method: str, dataset: str, configuration: str, device_name: str, iterations: int, out: str) -> None:
    """Train ``iterations`` timed iterations (after two warm-up ones) and predict one test case; writes the row
    as JSON to ``out``."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.paths import nnUNet_raw
    from .data.names import dataset_name

    from .conditioning.extract import build_trainer
    from .inference.predict import TextGuidedPredictor
    from .evaluation.benchmark import _sync
    device = torch.device(device_name)
    trainer_name = METHODS[method][0]
    row = {"method": method, "trainer": trainer_name, "configuration": configuration}
    started = time.perf_counter()
    tr = build_trainer(dataset, configuration, trainer_name, fold="all", device=device_name, for_extraction=False)
    tr.on_train_start()  # nnU-Net's: initialize (compile decision), dataloaders, paper-mode store
    row.update(batch=tr.batch_size, compile="on" if hasattr(tr.network, "_orig_mod") else "off",
               AMP=str(torch.get_autocast_dtype("cuda")).removeprefix("torch.") if device.type == "cuda"
               else "off (float32)")
    row["setup s"] = time.perf_counter() - started
    tr.on_train_epoch_start()
    times = []
    for i in range(2 + iterations):
        batch = next(tr.dataloader_train)
        if i == 2 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t = time.perf_counter()
        tr.train_step(batch)
        _sync(device)
        times.append(time.perf_counter() - t)
    row["first it s"] = times[0]
    row["s/it"] = sorted(times[2:])[len(times[2:]) // 2]
    row["peak memory GiB"] = _peak_memory_gib(device)
    tr.on_train_end()  # checkpoint_final.pth, dataloaders shut down
    del tr
    predictor = TextGuidedPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    model_folder = join(os.environ["nnUNet_results"], dataset_name(dataset),
                        f"{trainer_name}__nnUNetPlans__{configuration}")
    predictor.initialize_from_trained_model_folder(model_folder, ("all",), "checkpoint_final.pth")
    images = Path(nnUNet_raw) / dataset_name(dataset) / "imagesTs"
    ending = predictor.dataset_json["file_ending"]
    first = sorted(images.glob(f"*_0000{ending}"))[0]
    case = first.name[:-len(f"_0000{ending}")]
    files = sorted(str(p) for p in images.glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"))
    output = Path(out).with_suffix("")
    output.mkdir(parents=True, exist_ok=True)
    _sync(device)
    t = time.perf_counter()
    predictor.predict_from_files_sequential([files], [str(output / case)], save_probabilities=False, overwrite=True)
    _sync(device)
    row["predict s/case"] = time.perf_counter() - t
    if not (output / f"{case}{ending}").is_file():
        raise RuntimeError(f"the prediction of {case} was not written to {output}")
    Path(out).write_text(json.dumps(row))


# -- the table ----------------------------------------------------------------------------------------------
def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


def format_table(rows: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if c in ("method", "trainer", "configuration", "compile", "AMP") else "---:"
                            for c in COLUMNS) + "|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['trainer']} | FAILED: {row['error']} |")
        else:
            lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-device", "--device", dest="device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: paper configurations with real-size encoders; cpu: tiny presets and encoders")
    p.add_argument("--configurations", choices=["paper", "tiny"],
                   help="paper: the paper presets at each method's per-GPU batch, real-size encoders (default on "
                   "cuda); tiny: the tiny presets and encoders (default on cpu)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--iterations", type=int, help="timed iterations after two warm-up ones (default 3 on the GPU, "
                   "2 on the CPU)")
    p.add_argument("--work", help="working folder (default: a new temporary folder, removed afterwards)")
    p.add_argument("--timeout", type=int, default=600, help="seconds each method may take (default 600)")
    p.add_argument("--one", nargs=4, metavar=("METHOD", "DATASET", "CONFIGURATION", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    paper = (args.configurations or ("paper" if gpu else "tiny")) == "paper"
    iterations = args.iterations or (3 if gpu else 2)
    if args.one:
        method, dataset, configuration, out = args.one
        run_one(method, dataset, configuration, args.device, iterations, out)
        return 0

    import torch

    from .evaluation.benchmark import machine_description
    if gpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or with --device cpu (tiny presets)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        root = Path(args.work).resolve() if args.work else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        env = _env(root)
        os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
        rows, started = [], time.time()
        log_path = root / "gpu_check.log"
        with open(log_path, "a") as log:
            datasets, standins = {}, {}
            for method in args.methods:
                trainer_name, kind, _, _ = METHODS[method]
                row = {"method": method, "trainer": trainer_name}
                try:
                    if kind not in datasets:
                        print(f"[{time.time() - started:5.0f} s] {kind} dataset", flush=True)
                        datasets[kind] = make_dataset(kind, env, paper, log)
                    print(f"[{time.time() - started:5.0f} s] {method}: configuration", flush=True)
                    configuration = configure(method, datasets[kind], paper, env, root, args.device, log, standins)
                    print(f"[{time.time() - started:5.0f} s] {method}: training and prediction ({trainer_name})",
                          flush=True)
                    out = root / f"row_{trainer_name}.json"
                    _run([sys.executable, "-m", "nnunet_textguided.gpu_check", "--device", args.device,
                          "--iterations", str(iterations), "--one", method, datasets[kind], configuration, str(out)],
                         env, log, timeout=args.timeout)
                    row = json.loads(out.read_text())
                except subprocess.TimeoutExpired:
                    row["error"] = f"over {args.timeout} s"
                except Exception as e:  # noqa: BLE001 - one method's failure is its row; the others still run
                    log.write(f"{method}: {type(e).__name__}: {e}\n")
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                rows.append(row)
        if any("error" in r for r in rows) and not args.work:
            print("".join(log_path.read_text().splitlines(keepends=True)[-60:]), file=sys.stderr)
        print()
        print(format_table(rows, machine_description(torch.device(args.device))))
        print(f"\n{'Paper configurations (per-GPU batch), real-size encoders' if paper else 'Tiny presets and encoders'}"
              f"; s/it: median of {iterations} iterations after two warm-up ones (first it s: the first, which "
              f"compiles); total {time.time() - started:.0f} s; log: "
              f"{log_path if args.work else '(temporary: --work DIR keeps it)'}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
