"""Side-by-side speed and memory of every trainer, measured in one run on the same data and preset.

Not a test: nothing is asserted; the output is a markdown table of ratios plus the machine it ran on. For each
trainer (each base trainer of each method; variants that only rename are skipped):

- **train s/it**: one training iteration (forward, deep-supervision CE loss, backward, SGD step) on a batch of
  the preset's patch size, vs **the same backbone without conditioning** (nnU-Net's plain network from the
  same plans), median of ``repeats``;
- **predict s/case**: nnU-Net's predictor on one raw case (preprocessing, sliding window, mirroring along the
  first axis for every model alike (the tiny trainers' axes), export to the original grid) — ``nnUNetPredictor`` as used by stock
  ``nnUNetv2_predict``, or the note-aware ``TextGuidedPredictor`` for models that need the whole case — vs the
  plain ``nnUNetTrainer`` network of the same plans, median of ``predict_repeats``;
- **extraction slices/s**: filling the embedding store (render + encoder, per stream) vs the raw batched
  encoder forward on already-rendered slices (the bound the store path can reach);
- **peak memory** of a training iteration above the memory held before it (parameters, gradients, optimizer
  state): CUDA ``max_memory_allocated``; on Linux CPUs the resident-set high-water mark (measured after all
  timings, with glibc set to return freed blocks to the OS).

The data is one generated CT phantom (``data.synthetic``), or for 2D presets (``--preset 2d_tiny`` /
``2d_reclmis_paper``) one image of the referring dataset with its note (note-guided models encode the note as
part of each prediction, like ``nnUNetv2_predict_textguided`` does for a new case); the plans are reference plans
with the chosen preset (``3d_tiny`` by default, ``--preset 3d_biclip_paper`` on a GPU). Models with training-only
modules (RecLMIS's reconstructors) train them in the measured step too.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns, repeats: int, device: torch.device) -> list[float]:
    """Median time of each of ``fns``, run round-robin ``repeats`` times after one warm-up round."""
    times = [[] for _ in fns]
    for r in range(repeats + 1):
        for i, fn in enumerate(fns):
            t = timed(fn, 1, device, warmup=0)
            if r:
                times[i].append(t)
    return [statistics.median(t) for t in times]


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _return_freed_memory_to_os() -> None:
    """Make RSS follow live memory: glibc keeps freed blocks resident for reuse (and, once its dynamic mmap
    threshold has grown, serves large tensors from that heap), so a step reusing them would not show in RSS.
    ``malloc_trim(0)`` hands every free page back (later reuse faults it in again, visibly), and a fixed mmap
    threshold of 64 KiB sends new tensor-sized blocks through mmap, unmapped on free."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn, device: torch.device) -> float:
    """Peak memory (MiB) of one call of ``fn`` above what was allocated before: the CUDA allocator's peak,
    or on Linux CPUs the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) after
    returning free memory to the OS. On CPU, call it only after all timings (it slows allocation down)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    try:
        _return_freed_memory_to_os()
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except (OSError, StopIteration):
        return float("nan")
    fn()
    return max(0, _status_kib("VmHWM") - base) / 1024


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} logical CPUs, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads)")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        desc += f", GPU {p.name} ({p.total_memory / 2 ** 30:.0f} GiB)"
    return desc


def default_trainers() -> list[type]:
    """Each method's base trainers, skipping pure renames (e.g. BiCLIPTrainer_Net4 = BiCLIPTrainer)."""
    from ..training import trainer_classes
    own = {"__module__", "__doc__", "__qualname__", "__firstlineno__", "__static_attributes__"}
    return [t for t in trainer_classes() if t.schedule_of is None and set(vars(t)) - own]


@dataclass
class Setup:
    """Plans, managers and one phantom case shared by every trainer of a run."""
    preset: str
    device: torch.device
    plans: dict = field(init=False)
    volume: np.ndarray = field(init=False)
    properties: dict = field(init=False)
    note: str = field(init=False)

    def __post_init__(self):
        from ..data.synthetic import generate_phantom_case
        from ..presets import preset_plans
        self.plans, self.configuration = preset_plans(self.preset, {"spacing": [2.5, 1.25, 1.25], "modality": "CT"})
        _, cm = self.managers()
        if len(cm.patch_size) == 2:  # 2D presets: one image of the referring dataset and its note
            from ..data.referring import generate_referring_case
            case = generate_referring_case(0, seed=0, size=max(cm.patch_size))
            self.volume = case.image[None, None].astype(np.float32)
            self.properties = {"spacing": [999.0, 1.0, 1.0]}
            self.note = case.note
        else:
            case = generate_phantom_case(0, seed=0, shape=(24, 48, 48))
            self.volume = case.image[None].astype(np.float32)
            self.properties = {"spacing": [2.5, 1.25, 1.25]}
            self.note = "An abdominal CT phantom."
        # a universal (merged, partial-label) description of the phantom's labels, so that every trainer,
        # CDPDNet's included, builds from it: one sigmoid output per label for every model alike
        from ..data.synthetic import phantom_universal_dataset_json
        self.dataset_json = phantom_universal_dataset_json()

    def managers(self):
        import copy

        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        pm = PlansManager(copy.deepcopy(self.plans))
        return pm, pm.get_configuration(self.configuration)


def build(trainer: type | None, setup: Setup):
    """(network, plans manager, configuration manager, label manager) on the device; ``None`` = nnUNetTrainer."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    pm, cm = setup.managers()
    lm = pm.get_label_manager(setup.dataset_json)
    if trainer is None:
        net = nnUNetTrainer.build_network_architecture(pm, cm, 1, lm.num_segmentation_heads, True)
    else:
        cm.configuration["textguided"] = trainer.textguided_block(pm, cm, None, setup.dataset_json)
        net = trainer.build_network_architecture(pm, cm, 1, lm.num_segmentation_heads, True)
    return net.to(setup.device), pm, cm, lm


def _input(net, setup: Setup, cm, batch: int) -> torch.Tensor:
    """A training batch as the network receives it (with positional channels and tables in paper mode; the
    setup's note for note-guided models)."""
    from ..conditioning.notes import NoteConditioner
    from ..conditioning.slices import TableSliceConditioner
    from ..data.position_channels import append_position_channels
    x = torch.randn(batch, 1, *cm.patch_size, device=setup.device)
    cond = getattr(net, "conditioner", None)
    if isinstance(cond, NoteConditioner):
        # TGC-Net reads an auxiliary note too: the same text stands in for it
        cond.set_notes(*cond.encode([(setup.note, setup.note)] if cond.aux else [setup.note], setup.device))
    if isinstance(cond, TableSliceConditioner):
        cond.set_tables({0: cond.compute_tables(setup.volume, device=setup.device)})
        pos = append_position_channels(np.zeros((1, *cm.patch_size), np.float32), 0)[1:]
        x = torch.cat((x, torch.as_tensor(pos, device=setup.device)[None].expand(batch, -1, *cm.patch_size)), 1)
    return x


def train_step_fn(net: nn.Module, x: torch.Tensor, num_classes: int, training_only: nn.Module | None = None):
    """One optimiser step of ``net``; with the trainer's ``training_only`` modules (RecLMIS's reconstructors) the
    step also computes their losses from the network's ``forward_features`` and updates them."""
    params = list(net.parameters()) + (list(training_only.parameters()) if training_only is not None else [])
    opt = torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True)
    deep_supervision = net.decoder.deep_supervision  # as built for training (the predictor switches it off)
    net.train()
    with torch.no_grad():
        outs = net(x)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    targets = [torch.randint(0, num_classes, (o.shape[0], *o.shape[2:]), device=x.device) for o in outs]

    tasks = getattr(net, "set_batch_tasks", None)  # universal models train on each sample's own task

    def step():
        net.train()
        net.decoder.deep_supervision = deep_supervision
        if tasks is not None:
            tasks(torch.arange(x.shape[0]) % net.num_tasks)
        opt.zero_grad(set_to_none=True)
        extra = 0.0
        if training_only is None:
            out = net(x)
        else:
            xc, cond = net.condition(x)
            out, features = net.forward_features(xc, cond["tokens"], cond["mask"])
            extra = sum(training_only(features).values())
        out = out if isinstance(out, (list, tuple)) else [out]
        (sum(nn.functional.cross_entropy(o, t) for o, t in zip(out, targets)) + extra).backward()
        opt.step()
    return step


def training_only_of(trainer: type | None, net: nn.Module, cm, device) -> nn.Module | None:
    if trainer is None:
        return None
    extra = trainer.build_training_only_modules(cm.configuration["textguided"], net)
    return extra.to(device) if extra is not None else None


def predict_fn(trainer: type | None, net: nn.Module, pm, cm, setup: Setup, mirror_axes):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from ..conditioning.notes import NoteConditioner
    from ..inference.predict import TextGuidedPredictor
    cls = TextGuidedPredictor if trainer is not None else nnUNetPredictor
    pred = cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=bool(mirror_axes), device=setup.device,
               perform_everything_on_device=setup.device.type == "cuda", verbose=False, verbose_preprocessing=False,
               allow_tqdm=False)
    pred.manual_initialization(net, pm, cm, [net.state_dict()], setup.dataset_json, (trainer or object).__name__,
                               tuple(mirror_axes))

    def predict():
        net.eval()  # training steps of the same network run in between (round-robin)
        net.decoder.deep_supervision = False
        if hasattr(net, "set_batch_tasks"):  # inference: every label under a task annotating it (2 passes here)
            net.set_batch_tasks(None)
        pred.predict_single_npy_array(setup.volume, setup.properties)
    if isinstance(getattr(net, "conditioner", None), NoteConditioner):
        def predict_with_note():  # a new case: its note is encoded, then the image predicted
            pred.set_note(setup.note)
            predict()
        return predict_with_note
    return predict


def extraction_rows(trainer: type, net, setup: Setup, repeats: int) -> list[tuple[str, float, float]]:
    """[(stream, store-path slices/s, raw encoder slices/s)] for the trainer's per-slice streams."""
    from ..conditioning.slices import render_slices, slice_table
    cond = getattr(net, "conditioner", None)
    streams, window = getattr(cond, "streams", []), getattr(cond, "window", None)
    rows = []
    n = setup.volume.shape[1] + 1
    for s in streams:
        enc = s.encoder_module(setup.device)
        vol = torch.as_tensor(setup.volume, device=setup.device)
        rendered = render_slices(torch.cat((torch.zeros_like(vol[0, :1]), vol[0]), 0), window)
        store = timed(lambda: slice_table(vol, s, window, device=setup.device), repeats, setup.device)
        raw = timed(lambda: getattr(enc, s.method)(rendered, batch_size=64), repeats, setup.device)
        rows.append((s.name, n / store, n / raw))
    return rows


def run(trainers: list[type], preset: str = "3d_tiny", device: str = "cpu", repeats: int = 5,
        predict_repeats: int = 3, batch: int | None = None) -> str:
    setup = Setup(preset, torch.device(device))
    _, cm0 = setup.managers()
    batch = batch or cm0.batch_size
    lines = [f"Machine: {machine_description(setup.device)}",
             f"Preset {preset}: patch {'x'.join(map(str, cm0.patch_size))}, batch {batch}; one "
             f"{'referring image (with its note)' if len(cm0.patch_size) == 2 else 'phantom case'} "
             f"{'x'.join(map(str, setup.volume.shape[1:]))}; medians of {repeats} (train) / {predict_repeats} "
             "(predict) runs; nnUNetTrainer = nnU-Net's plain network of these plans "
             f"({cm0.network_arch_class_name.rsplit('.', 1)[-1]}), no conditioning", ""]
    # all models side by side, repeats interleaved round-robin, so drift (thermal, caches, other load) hits
    # every model alike
    names, train_fns, predict_fns, extraction = [], [], [], {}
    usable = []
    for trainer in trainers:
        try:
            trainer.check_configuration(cm0, preset)
            usable.append(trainer)
        except ValueError:
            lines.insert(2, f"(skipped {trainer.__name__}: it does not train the {preset} configuration)")
    trainers = usable
    for trainer in [None] + list(trainers):
        torch.manual_seed(0)
        net, pm, cm, lm = build(trainer, setup)
        names.append(trainer.__name__ if trainer else "nnUNetTrainer")
        train_fns.append(train_step_fn(net, _input(net, setup, cm, batch), lm.num_segmentation_heads,
                                       training_only_of(trainer, net, cm, setup.device)))
        # 3D: mirroring along the first axis for every model alike; 2D: none (note-guided models never mirror)
        mirror = () if len(cm.patch_size) == 2 else \
            tuple(trainer.own_settings().get("mirror_axes") or (0,)) if trainer is not None else (0,)
        predict_fns.append(predict_fn(trainer, net, pm, cm, setup, mirror))
        if trainer is not None:
            extraction[names[-1]] = extraction_rows(trainer, net, setup, repeats)
    train = interleaved(train_fns, repeats, setup.device)
    predict = interleaved(predict_fns, predict_repeats, setup.device)
    results = {n: [t, None, p, extraction.get(n, [])] for n, t, p in zip(names, train, predict)}
    del train_fns, predict_fns
    # memory last: on CPU it changes the allocator's behaviour (see _return_freed_memory_to_os), which must not
    # touch the timings
    for trainer in [None] + trainers:
        torch.manual_seed(0)
        net, pm, cm, lm = build(trainer, setup)
        step = train_step_fn(net, _input(net, setup, cm, batch), lm.num_segmentation_heads,
                             training_only_of(trainer, net, cm, setup.device))
        step()  # gradients and optimizer state exist before the measured step: its peak is the activations
        results[trainer.__name__ if trainer else "nnUNetTrainer"][1] = peak_memory(step, setup.device)
        del net, step
    base_train, base_mem, base_pred, _ = results["nnUNetTrainer"]
    lines += ["| trainer | train s/it | × backbone | peak train MiB | × backbone | predict s/case | × nnUNetTrainer |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (train, mem, predict, _) in results.items():
        lines.append(f"| {name} | {train:.3f} | {train / base_train:.2f} | {mem:.0f} | "
                     f"{mem / base_mem if base_mem else float('nan'):.2f} | {predict:.2f} | {predict / base_pred:.2f} |")
    ext = [(name, *row) for name, r in results.items() for row in r[3]]
    if ext:
        lines += ["", "| trainer | stream | store path slices/s | raw encoder slices/s | raw / store |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {n} | {s} | {store:.1f} | {raw:.1f} | {raw / store:.2f} |" for n, s, store, raw in ext]
    return "\n".join(lines)


#: BiCLIP trainers compared with Net1 of the same backbone (``--biclip``): paper mode, then online (beyond the paper)
BICLIP_TRAINERS = ("BiCLIPTrainer_Net1", "BiCLIPTrainer_Net2", "BiCLIPTrainer_Net3", "BiCLIPTrainer",
                   "BiCLIPTrainer_Net2_online", "BiCLIPTrainer_Net3_online", "BiCLIPTrainer_online")
BICLIP_BACKBONES = {"3d_tiny": "nnU-Net's UNet", "3d_nnformer_tiny": "nnFormer"}
#: a Synapse (BTCV) test case after nnFormer's resampling: 512 x 512 slices, 85-198 per scan (the middle taken)
SYNAPSE_CASE = (140, 512, 512)


def step_flops(net: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one training forward + backward of ``net`` on ``x`` (torch's FlopCounterMode: matmuls,
    convolutions, attention; frozen encoders inside forward included), the work behind a train s/it."""
    from torch.utils.flop_counter import FlopCounterMode
    net.train()
    counter = FlopCounterMode(display=False)
    with counter:
        out = net(x)
        sum(o.float().sum() for o in (out if isinstance(out, (list, tuple)) else [out])).backward()
    net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def biclip_speed(device: str = "cpu", repeats: int = 5, predict_repeats: int = 3) -> list[str]:
    """Training step and prediction (nnUNetv2_predict_textguided's per-case extraction included) of every BiCLIP
    trainer as a ratio to Net1 on the same backbone and preset, all measured round-robin in this run, with each
    training step's FLOPs next to its time."""
    from .params import trainer_class
    lines = []
    for preset, backbone in BICLIP_BACKBONES.items():
        setup = Setup(preset, torch.device(device))
        _, cm0 = setup.managers()
        names, train_fns, predict_fns, flops = [], [], [], []
        for name in BICLIP_TRAINERS:
            trainer = trainer_class(name)
            torch.manual_seed(0)
            net, pm, cm, lm = build(trainer, setup)
            names.append(name)
            x = _input(net, setup, cm, cm0.batch_size)
            flops.append(step_flops(net, x))
            train_fns.append(train_step_fn(net, x, lm.num_segmentation_heads))
            predict_fns.append(predict_fn(trainer, net, pm, cm, setup, (0,)))
        train = interleaved(train_fns, repeats, setup.device)
        predict = interleaved(predict_fns, predict_repeats, setup.device)
        lines += ["", f"BiCLIP on {backbone} ({preset}: patch {'x'.join(map(str, cm0.patch_size))}, batch "
                  f"{cm0.batch_size}; one case {'x'.join(map(str, setup.volume.shape[1:]))}, mirroring along the "
                  "first axis; tiny stand-in encoders)", "",
                  "| trainer | mode | train GFLOP/it | × Net1 | train s/it | × Net1 | predict s/case | × Net1 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, f, t, p in zip(names, flops, train, predict):
            mode = "—" if name.endswith("Net1") else "online" if name.endswith("online") else "paper (offline)"
            lines.append(f"| {name} | {mode} | {f / 1e9:.2f} | {f / flops[0]:.3f} | {t:.3f} | {t / train[0]:.2f} | "
                         f"{p:.2f} | {p / predict[0]:.2f} |")
    return lines


#: the paper-size configuration of each backbone (``--biclip --paper-size``)
BICLIP_PAPER_SIZE = {"3d_biclip_paper": "nnU-Net's UNet", "3d_nnformer_synapse": "nnFormer"}


def biclip_paper_size_speed(device: str = "cpu", repeats: int = 3, batch: int | None = None) -> list[str]:
    """Paper-mode Net4 vs Net1 training step at the paper's patch and widths (both backbones). A paper-mode step
    reads tables and never runs an encoder, so 768-d tables from stand-in encoders give the paper's work; batch 2
    on CPU (a Synapse nnFormer patch holds ~4 GiB of activations), the preset's batch elsewhere."""
    from .params import trainer_class
    embed = {"image_encoder": "tiny-pmcclip?embed_dim=768", "caption_encoder": "tiny-coca?embed_dim=768"}
    lines = ["", "BiCLIP paper mode at the paper size (768-d slice tables; the encoders never run in a paper-mode "
             "step)", "", "| backbone | configuration | patch | batch | trainer | train GFLOP/it | × Net1 | train s/it "
             "| × Net1 |", "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for preset, backbone in BICLIP_PAPER_SIZE.items():
        setup = Setup(preset, torch.device(device))
        setup.plans["configurations"][preset].setdefault("textguided", {})["biclip"] = dict(embed)
        _, cm0 = setup.managers()
        b = batch or (cm0.batch_size if setup.device.type == "cuda" else 2)
        fns, flops = [], []
        for name in ("BiCLIPTrainer_Net1", "BiCLIPTrainer"):
            torch.manual_seed(0)
            net, pm, cm, lm = build(trainer_class(name), setup)
            x = _input(net, setup, cm, b)
            flops.append(step_flops(net, x))
            fns.append(train_step_fn(net, x, lm.num_segmentation_heads))
        times = interleaved(fns, repeats, setup.device)
        del fns
        for name, f, t in zip(("BiCLIPTrainer_Net1", "BiCLIPTrainer"), flops, times):
            lines.append(f"| {backbone} | {preset} | {'x'.join(map(str, cm0.patch_size))} | {b} | {name} | "
                         f"{f / 1e9:,.0f} | {f / flops[0]:.3f} | {t:.2f} | {t / times[0]:.2f} |")
    return lines


def biclip_encoder_flops(case_shape: tuple[int, int, int] = SYNAPSE_CASE) -> list[str]:
    """Analytic frozen-encoder FLOPs of BiCLIP (Net4) at the Synapse paper configuration, both modes: per training
    step (a batch of patches) and per predicted case (nnU-Net's sliding window, step 0.5, mirroring on all three
    axes), next to the network's own FLOPs."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    from .params import build_for_counting, count_built, count_plans, trainer_class
    trainer = trainer_class("BiCLIPTrainer")
    plans, name, dj = count_plans(trainer, "paper")
    built = build_for_counting(trainer, plans, name, dj)
    net, structures, cm, lm, n_in = built
    network = count_built(trainer, *built).network_gflops * 1e9  # one patch, forward
    patch, batch = tuple(cm.patch_size), cm.batch_size
    steps = compute_steps_for_sliding_window(case_shape, patch, 0.5)
    tiles, mirrors = int(np.prod([len(s) for s in steps])), 2 ** len(patch)
    streams = cm.configuration["textguided"]["streams"]
    rows = []
    for st in streams:
        enc = structures[st["encoder"]]
        per_slice = enc.flops(st["method"], 1)
        rows.append((st["name"], st["encoder"], per_slice * batch * patch[0], per_slice * tiles * mirrors * patch[0],
                     per_slice * (case_shape[0] + 1)))
    step_net, case_net = 3 * network * batch, network * tiles * mirrors  # backward ~ 2 forwards
    t = lambda f: f"{f / 1e12:,.2f}"
    lines = ["", f"Frozen-encoder TFLOPs of BiCLIPTrainer (Net4) at the Synapse paper configuration ({name}: patch "
             f"{'x'.join(map(str, patch))}, batch {batch}); a case of {'x'.join(map(str, case_shape))} is "
             f"{tiles} tiles x {mirrors} mirrors", "",
             "| stream | encoder | online: per step | paper: per step | online: per case | paper: per case |",
             "|---|---|---:|---:|---:|---:|"]
    for stream, spec, online_step, online_case, paper_case in rows:
        lines.append(f"| {stream} | `{spec}` | {t(online_step)} | 0 (read from the store) | {t(online_case)} | "
                     f"{t(paper_case)} |")
    total_step, total_case = sum(r[2] for r in rows), sum(r[3] for r in rows)
    paper_case = sum(r[4] for r in rows)
    lines += [f"| network (trainable) | — | {t(step_net)} | {t(step_net)} | {t(case_net)} | {t(case_net)} |",
              "", f"Encoders / network: online {total_step / step_net:.1f}x per step and {total_case / case_net:.1f}x "
              f"per case; paper mode 0x per step (each training case's {case_shape[0] + 1} slice rows are extracted "
              f"once) and {paper_case / case_net:.2f}x per case. CoCa's caption cost is a lower bound "
              "(KV-cached generation; see encoders.structure)."]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainers", nargs="+", help="trainer class names (default: every method's base trainers)")
    p.add_argument("--preset", default="3d_tiny", help="configuration preset (3d_tiny; 3d_biclip_paper on a GPU)")
    p.add_argument("-device", "--device", dest="device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--predict-repeats", type=int, default=3)
    p.add_argument("--batch", type=int, help="batch size (default: the preset's)")
    p.add_argument("--biclip", action="store_true", help="BiCLIP only: every trainer as a ratio to Net1 on both "
                   "backbones (tiny presets), and the analytic encoder FLOPs of both modes at the Synapse size")
    p.add_argument("--paper-size", action="store_true", help="with --biclip: also paper-mode Net4 vs Net1 training "
                   "steps at each backbone's paper-size configuration (CPU: ~10 min, 3 repeats)")
    a = p.parse_args(argv)
    if a.biclip:
        print(f"Machine: {machine_description(torch.device(a.device))}; medians of {a.repeats} (train) / "
              f"{a.predict_repeats} (predict) runs, interleaved")
        lines = biclip_speed(a.device, a.repeats, a.predict_repeats)
        if a.paper_size:
            lines += biclip_paper_size_speed(a.device, min(a.repeats, 3), a.batch)
        print("\n".join(lines + biclip_encoder_flops()))
        return 0
    from .params import trainer_class
    try:
        trainers = [trainer_class(t) for t in a.trainers] if a.trainers else default_trainers()
    except KeyError as e:
        p.error(str(e))
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    print(run(trainers, a.preset, a.device, a.repeats, a.predict_repeats, a.batch))
    return 0
