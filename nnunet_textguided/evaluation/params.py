"""`nnunet-textguided params TRAINER`: parameter counts and forward FLOPs of a trainer's network.

Why a command: the papers compare methods by trainable parameters, FLOPs and what is kept at inference
(RecLMIS: 23.7 M / 24.1 GFLOPs at inference, 74.2 M in training; TGC-Net: 10.3 M trainable). Counting needs
no data and no weights:

- the network is built exactly as ``nnUNetv2_train`` builds it (nnU-Net's backbone from the plans + the
  method's builder), from plans of three kinds: ``paper`` (the method's paper preset on reference plans that
  describe the paper's dataset), ``tiny`` (the CPU test preset) or ``plans`` (a dataset's own plans);
- paper-size networks and encoders are built on the *meta* device, so nothing is allocated; frozen
  encoders come from their configs without weights (``encoders.structure``);
- FLOPs are torch's ``FlopCounterMode`` counts (a multiply-add = 2 FLOPs) for one forward of one patch
  (batch 1) in inference mode, with the conditioning replaced by zero tensors of the right shapes; the frozen
  encoders' FLOPs for that forward are counted separately from their own structures.

Then the estimated training memory of one GPU at the configuration's batch (``training_memory``: weights,
gradients and optimiser state, frozen encoders, and the activations one training forward saves for backward,
measured on the meta device in float32 and in half precision).

Columns: *trainable* (optimised), *training-only* (trainable modules dropped at inference: listed by the
network's ``training_only_modules``, or built beside the network by the trainer's
``build_training_only_modules`` — RecLMIS's reconstructors), *frozen* (encoders and frozen network parts), *inference* = trainable −
training-only + frozen.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

CONFIG_KINDS = ("paper", "tiny", "plans")


@dataclass
class ParamReport:
    trainer: str
    config: str
    configuration: str
    patch_size: list[int]
    num_classes: int
    trainable: int
    training_only: int
    frozen_in_network: int
    encoders: dict[str, dict] = field(default_factory=dict)  # spec -> {params, gflops_per_forward, roles}
    network_gflops: float = 0.0
    paper_figures: dict[str, float] = field(default_factory=dict)

    @property
    def frozen(self) -> int:
        return self.frozen_in_network + sum(e["params"] for e in self.encoders.values())

    @property
    def inference(self) -> int:
        """Without encoders whose outputs live in the model (label prompts embedded into buffers)."""
        return self.trainable - self.training_only + self.frozen - sum(
            e["params"] for e in self.encoders.values() if not e.get("at_inference", True))

    @property
    def inference_gflops(self) -> float:
        return self.network_gflops + sum(e["gflops_per_forward"] for e in self.encoders.values())

    def as_dict(self) -> dict:
        return {**asdict(self), "frozen": self.frozen, "inference": self.inference,
                "inference_gflops": self.inference_gflops}


def trainer_class(name: str):
    from ..training import trainer_classes
    classes = {t.__name__: t for t in trainer_classes()}
    if name not in classes:
        raise KeyError(f"unknown trainer '{name}'; `nnunet-textguided list` shows the trainers of this package")
    return classes[name]


def count_plans(trainer, config: str, dataset: str | None = None, configuration: str | None = None,
                plans_identifier: str = "nnUNetPlans", preset: str | None = None) -> tuple[dict, str, dict]:
    """(plans, configuration name, dataset_json) for a config kind. ``preset`` picks another paper preset than the
    trainer's own (e.g. nnFormer's ACDC configuration). The paper kind counts the schema's defaults (the paper's
    encoders); the tiny kind the tiny preset's stand-ins."""
    from ..presets import preset_plans
    if config == "plans":
        if dataset is None or configuration is None:
            raise ValueError("--config plans needs -d DATASET and -c CONFIGURATION")
        from batchgenerators.utilities.file_and_folder_operations import join, load_json
        from nnunetv2.paths import nnUNet_preprocessed
        from ..data.names import dataset_name
        folder = join(nnUNet_preprocessed, dataset_name(dataset, ("nnUNet_preprocessed",)))
        return load_json(join(folder, plans_identifier + ".json")), configuration, \
            load_json(join(folder, "dataset.json"))
    if config == "paper":
        preset = preset or trainer.paper_preset
        if preset is None:
            raise ValueError(f"{trainer.__name__} has no paper configuration; pass --preset")
        plans, name = preset_plans(preset)
        ref = plans_reference(preset)
        if "universal" in ref:  # a partial-label method: the paper's label vocabulary and tasks
            from ..data.merge import universal_dataset_json
            u = ref["universal"]
            dj = universal_dataset_json(u["labels"], u.get("part_of", {}), u["tasks"], {"0": ref["modality"]},
                                        ".nii.gz", "Dataset000_Reference")
            return plans, name, dj
        return plans, name, _dataset_json(ref["num_classes"])
    if config == "tiny":
        plans, name = preset_plans(trainer.tiny_preset, {"spacing": [2.5, 1.25, 1.25], "modality": "CT"})
        if getattr(trainer, "universal", False):  # trains on merged partial-label datasets
            from ..data.synthetic import phantom_universal_dataset_json
            return plans, name, phantom_universal_dataset_json()
        return plans, name, _dataset_json(4)
    raise ValueError(f"--config must be one of {', '.join(CONFIG_KINDS)}")


def plans_reference(preset: str) -> dict:
    from ..presets import available_presets
    return available_presets()[preset]["reference"]


def _dataset_json(num_classes: int) -> dict:
    labels = {"background": 0, **{f"label_{i}": i for i in range(1, num_classes)}}
    return {"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz", "numTraining": 0}


def build_for_counting(trainer, plans: dict, configuration: str, dataset_json: dict, device: str = "meta",
                       deep_supervision: bool = False):
    """The trainer's network (inference mode; deep supervision as asked) and {spec: EncoderStructure}."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from ..encoders.structure import encoder_structure
    from ..training.base import NETWORK_BUILDERS

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    trainer.check_configuration(cm, configuration)
    block = cm.configuration.get("textguided")
    if isinstance(block, dict) and "method" in block and "settings" in block:  # a trained model's plans
        settings = json.loads(json.dumps(block))
    else:
        settings = trainer.textguided_block(pm, cm, None, dataset_json)
    structures = {spec: encoder_structure(spec) for spec in settings.get("encoders", {})}
    for spec, st in structures.items():
        settings["encoders"][spec] = {"embed_dim": st.embed_dim, "image_size": st.image_size,
                                      "patch_size": st.patch_size}
    cm.configuration["textguided"] = settings
    lm = pm.get_label_manager(dataset_json)
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    with torch.device(device):
        backbone = nnUNetTrainer.build_network_architecture(pm, cm, n_in, lm.num_segmentation_heads,
                                                            deep_supervision)
        net = NETWORK_BUILDERS[settings["method"]](settings, backbone, pm, cm, n_in)
    return net.eval(), structures, cm, lm, n_in


def count(trainer, config: str = "paper", dataset: str | None = None, configuration: str | None = None,
          plans_identifier: str = "nnUNetPlans", preset: str | None = None) -> ParamReport:
    plans, cfg_name, dataset_json = count_plans(trainer, config, dataset, configuration, plans_identifier, preset)
    device = "meta" if config == "paper" else "cpu"
    built = build_for_counting(trainer, plans, cfg_name, dataset_json, device)
    report = count_built(trainer, *built, device=device)
    report.config, report.configuration = config, cfg_name
    if config == "paper":
        report.paper_figures = dict(trainer.paper_figures)
    return report


def count_built(trainer, net, structures, cm, lm, n_in, device: str = "meta") -> ParamReport:
    """Parameters and forward FLOPs of a network from ``build_for_counting``."""
    params = dict(net.named_parameters())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    frozen_net = sum(p.numel() for p in params.values() if not p.requires_grad)
    training_only = sum(p.numel() for name in getattr(net, "training_only_modules", ())
                        for p in net.get_submodule(name).parameters() if p.requires_grad)
    with torch.device(device):  # modules the trainer optimises beside the network, for its losses only
        extra = trainer.build_training_only_modules(cm.configuration["textguided"], net)
    if extra is not None:
        n_extra = sum(p.numel() for p in extra.parameters() if p.requires_grad)
        trainable, training_only = trainable + n_extra, training_only + n_extra

    x = torch.empty(1, n_in, *cm.patch_size, device=device)
    cond = getattr(net, "conditioner", None)
    dims = {spec: st.embed_dim for spec, st in structures.items()}
    calls = cond.encoder_calls(tuple(x.shape)) if cond is not None else []  # (spec, method, n[, image_size])
    if hasattr(net, "set_label_tasks"):  # universal models: one task's pass (auto routing may run several)
        net.set_label_tasks([0] * net.num_labels)
    with _placeholder_conditioning(net, dims), torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x)
    settings = cm.configuration["textguided"]
    enc_rows = {}
    for spec, st in structures.items():
        use = settings.get("encoder_use", {}).get(spec, {})  # {"role", "towers", "at_inference"} if given
        enc_rows[spec] = {"params": st.num_parameters(use.get("towers")),
                          "gflops_per_forward": sum(st.flops(*c[1:]) for c in calls if c[0] == spec) / 1e9,
                          "roles": [use["role"]] if "role" in use else
                          [r["name"] for r in settings.get("streams", ()) if r["encoder"] == spec],
                          "at_inference": use.get("at_inference", True)}
    return ParamReport(trainer.__name__, "", "", list(cm.patch_size), lm.num_segmentation_heads, trainable, training_only, frozen_net, enc_rows,
                       fc.get_total_flops() / 1e9, {})


#: optimiser state per trainable parameter, in parameter copies (Adam / AdamW: two moments; SGD: momentum)
OPTIMIZER_STATES = {"sgd": 1, "adam": 2, "adamw": 2}
GIB = 2 ** 30


@dataclass
class MemoryEstimate:
    """Training memory of one GPU at a configuration's batch, in GiB (see ``training_memory``)."""
    batch: int
    weights: float           # trainable parameters + gradients + optimiser state, float32
    frozen_encoders: float   # every frozen encoder's weights, float32 (loaded on the GPU when run online)
    activations_fp32: float  # tensors saved for backward by one training forward, float32
    activations_half: float  # the same with every floating tensor in half precision

    @property
    def total_fp32(self) -> float:
        return self.weights + self.frozen_encoders + self.activations_fp32

    @property
    def total_half(self) -> float:
        return self.weights + self.frozen_encoders + self.activations_half


def training_memory(trainer, plans: dict, configuration: str, dataset_json: dict,
                    batch: int | None = None) -> MemoryEstimate:
    """Estimated GPU memory of training at the configuration's batch size (or ``batch``), from one training-mode forward (deep
    supervision on, training-only modules included) on the meta device: nothing is allocated or computed.

    Activations are the tensors autograd saves for backward (each storage once), measured twice: in float32,
    and with the network's floating tensors in half precision. nnU-Net's mixed precision (autocast) keeps
    some tensors in float32, so it lies between the two. Not counted: the CUDA context and allocator slack
    (roughly 0.5-1 GiB), cuDNN workspaces, and the transient peak of the backward pass."""
    report_net, structures, cm, lm, n_in = build_for_counting(trainer, plans, configuration, dataset_json, "meta",
                                                              deep_supervision=True)
    settings = cm.configuration["textguided"]
    batch = batch or cm.batch_size
    # training-only modules (RecLMIS's reconstructors) on the CPU: their masking counts tokens (data-dependent),
    # so they run on real (small) token tensors of the features' shapes
    extra = trainer.build_training_only_modules(settings, report_net)
    trainable = [p for m in (report_net, extra) if m is not None for p in m.parameters() if p.requires_grad]
    states = OPTIMIZER_STATES[settings["settings"].get("optimizer", "sgd")]
    weights = sum(p.numel() for p in trainable) * 4 * (2 + states)
    frozen = sum(st.num_parameters(settings.get("encoder_use", {}).get(spec, {}).get("towers")) for spec, st in
                 structures.items()) * 4
    dims = {spec: st.embed_dim for spec, st in structures.items()}
    activations = {}
    for dtype in (torch.float32, torch.bfloat16):
        if dtype != torch.float32:  # not net.to(): that would move (load) the frozen encoders too
            for m in (report_net, extra):
                if m is not None:
                    torch.nn.Module._apply(m, lambda t: t.to(dtype) if t.is_floating_point() else t)
        activations[dtype] = _saved_activation_bytes(report_net, extra, dims, batch, n_in, cm.patch_size, dtype)
    return MemoryEstimate(batch, weights / GIB, frozen / GIB, activations[torch.float32] / GIB,
                          activations[torch.bfloat16] / GIB)


def _saved_activation_bytes(net, extra, dims, batch: int, n_in: int, patch, dtype) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward (meta device)."""
    storages: dict[int, int] = {}
    # weights saved for backward (a conv's weight) are counted with the weights, not as activations
    own = {t.untyped_storage()._cdata for m in (net, extra) if m is not None
           for t in [*m.parameters(), *m.buffers()]}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage._cdata not in own:
            storages[storage._cdata] = storage.nbytes()
        return t

    net.train()
    if extra is not None:
        extra.train()
    x = torch.empty(batch, n_in, *patch, device="meta", dtype=dtype)
    if hasattr(net, "set_batch_tasks"):  # universal models train each sample under its own task
        net.set_batch_tasks(torch.zeros(batch, dtype=torch.long, device="meta"))
    try:
        with _placeholder_conditioning(net, dims), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if extra is not None:  # RecLMIS: the losses' reconstructors read the network's features
                _, features = net(x, with_features=True)
                extra({k: _materialised(v) for k, v in features.items()})
            else:
                net(x)
    finally:
        if hasattr(net, "set_batch_tasks"):
            net.set_batch_tasks(None)
        net.eval()
    return sum(storages.values())


def _materialised(t):
    """A CPU tensor of a meta tensor's shape and dtype (all-true masks, random values), grad-tracked as it was."""
    if not torch.is_tensor(t) or t.device.type != "meta":
        return t
    if t.dtype == torch.bool:
        return torch.ones(t.shape, dtype=torch.bool)
    return torch.randn(t.shape, dtype=t.dtype).requires_grad_(t.requires_grad)


def format_memory(m: MemoryEstimate) -> str:
    per_sample = (m.activations_fp32 / m.batch, m.activations_half / m.batch)
    return "\n".join([
        f"Training memory of one GPU at batch {m.batch} (estimate; under DDP each GPU holds its share of the batch):",
        "", "| part | float32 | half precision |", "|---|---:|---:|",
        f"| weights, gradients, optimiser state | {m.weights:.2f} GiB | {m.weights:.2f} GiB |",
        f"| frozen encoders (float32 weights) | {m.frozen_encoders:.2f} GiB | {m.frozen_encoders:.2f} GiB |",
        f"| activations saved for backward | {m.activations_fp32:.2f} GiB | {m.activations_half:.2f} GiB |",
        f"| **total** | **{m.total_fp32:.2f} GiB** | **{m.total_half:.2f} GiB** |", "",
        f"Activations per sample: {per_sample[0]:.2f} GiB (float32) / {per_sample[1]:.2f} GiB (half). nnU-Net's "
        "mixed precision lies between the two columns; add the CUDA context and allocator slack (about "
        "0.5-1 GiB). Measured on the meta device from one training forward (nothing allocated)."])


@contextlib.contextmanager
def _placeholder_conditioning(net, dims: dict[str, int]):
    cond = getattr(net, "conditioner", None)
    if cond is None:
        yield
        return
    net.set_conditioner(lambda x: cond.placeholder(x, dims))
    try:
        yield
    finally:
        net.set_conditioner(cond)


def _m(n: int | float) -> str:
    return f"{n / 1e6:.2f} M"


def format_report(r: ParamReport) -> str:
    lines = [f"{r.trainer} — config {r.config} ({r.configuration}: patch {'x'.join(map(str, r.patch_size))}, "
             f"{r.num_classes} output channels)", "",
             "| part | parameters | GFLOPs / forward (1 patch) |", "|---|---:|---:|",
             f"| network, trainable | {_m(r.trainable)} | {r.network_gflops:.2f} |",
             f"| of which training-only | {_m(r.training_only)} | |"]
    if r.frozen_in_network:
        lines.append(f"| network, frozen parts | {_m(r.frozen_in_network)} | |")
    offline, built_in = [], []
    for spec, e in r.encoders.items():
        flops = f"{e['gflops_per_forward']:.2f}"
        if not e.get("at_inference", True):
            flops, built_in = "— ²", built_in + [spec]
        elif not e["gflops_per_forward"]:
            flops, offline = "— ¹", offline + [spec]
        roles = f" ({', '.join(e['roles'])})" if e.get("roles") else ""
        lines.append(f"| frozen encoder `{spec}`{roles} | {_m(e['params'])} | {flops} |")
    lines.append(f"| **at inference** (network − training-only + frozen{' − ²' if built_in else ''}) | "
                 f"**{_m(r.inference)}** | **{r.inference_gflops:.2f}** |")
    if offline:
        lines += ["", "¹ not run per forward: this model reads embeddings computed once per case (embedding store / "
                  "nnUNetv2_predict_textguided)"]
    if built_in:
        lines += ["", "² embeds the label / task prompts when the network is built; the checkpoint carries the "
                  "results as buffers, so it does no work per forward and is left out of the inference total "
                  "(prediction still loads it once, to check its weight hash)"]
    if r.paper_figures:
        lines += ["", "Paper: " + ", ".join(f"{k} {v:g}" for k, v in r.paper_figures.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nnunet-textguided params", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trainer", help="trainer class name, e.g. BiCLIPTrainer")
    p.add_argument("--config", choices=CONFIG_KINDS, default="paper",
                   help="paper: the method's paper configuration (default); tiny: the CPU test preset; "
                        "plans: a dataset's plans (-d, -c)")
    p.add_argument("-d", help="dataset name or id (--config plans)")
    p.add_argument("-c", help="configuration (--config plans)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (--config plans)")
    p.add_argument("--preset", help="with --config paper: another paper preset than the trainer's own, e.g. "
                                    "3d_nnformer_acdc (see nnunet-textguided list)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    try:
        trainer = trainer_class(a.trainer)
        report = count(trainer, a.config, a.d, a.c, a.p, a.preset)
        memory = training_memory(trainer, *count_plans(trainer, a.config, a.d, a.c, a.p, a.preset))
    except (KeyError, ValueError, OSError, RuntimeError) as e:  # RuntimeError: nnU-Net's unset paths/unknown id
        print(f"nnunet-textguided params: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({**report.as_dict(), "training_memory_gib": {
            **asdict(memory), "total_fp32": memory.total_fp32, "total_half": memory.total_half}}, indent=2))
    else:
        print(format_report(report) + "\n\n" + format_memory(memory))
    return 0
