"""CDPDNet trainers (seed 002): one network for several partially labelled CT datasets.

Data: a universal dataset written by ``nnunet-textguided merge`` — nnU-Net regions (one sigmoid channel per
vocabulary label, organs and their tumours overlapping) and, in dataset.json, the label vocabulary, the
tasks (source datasets) with the labels each annotates, and every case's task.

| trainer                        | CLIP-EVA (text FiLM) | DINOv2-DFE | TTPG |
|--------------------------------|:---:|:---:|:---:|
| CDPDNetTrainer                 |  x  |  x  |  x  |
| CDPDNetTrainer_Baseline        |     |     |     |  (CNN encoder + decoder: the paper's baseline)
| CDPDNetTrainer_CLIPEVA / _DINO / _TTPG / _CLIPEVA_DINO / _CLIPEVA_TTPG / _DINO_TTPG  (Table V)

Optimiser: the paper's AdamW (lr 4e-4, weight decay 1e-5, beta1 0.9) with a 50-epoch linear warm-up and cosine
annealing, stepped per epoch; ``CDPDNetTrainer_nnUNetSGD`` trains the same network with nnU-Net's SGD + poly.

Training: each sample's loss covers only the labels annotated in its source dataset (BCE + soft Dice,
``losses.partial``), and its own task prompt is selected (per sample). Label and task prompts are embedded
once with the text encoder when the network is built and kept as buffers (in the checkpoint). DINOv2 runs
frozen inside forward on the patch's slices, so stock ``nnUNetv2_predict`` is exact.

Inference: every label of the vocabulary is predicted under a task that annotated it (``default_task
"auto"``: the fewest tasks covering all labels, greedy; the encoder runs once, TTPG + decoder once per task),
or under one named task (``default_task`` in the merge, or ``--task`` of ``nnUNetv2_predict_textguided``);
``--labels`` there selects labels by free text.

Settings (``settings.CDPDNetSettings``, the configuration's ``textguided.cdpdnet`` block): ``text_encoder`` and
``dino_encoder`` default to the paper's CLIP ViT-B/32 text tower and DINOv2-base (``hf:facebook/dinov2-base``: a
folder of that name under the weights root, else the hub); the ablations fix ``use_alignment`` / ``use_dino`` /
``use_ttpg``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from ..conditioning.dense import DenseSliceConditioner
from ..conditioning.slices import get_encoder, window_from_plans
from ..data.merge import load_universal, route_labels
from ..losses.partial import PartialLabelLoss
from ..networks.cdpdnet import CDPDNet
from .. import settings as settings_schema
from ..io import atomic_path, atomic_write_json
from .base import CaseLoadHookDatasetClass, TextGuidedTrainer, register_network_builder, short_schedule
from .sampling import dataloaders_with_sampling, describe_probabilities, group_balanced_probabilities

#: what the paper leaves open, as settings (see METHODS.md / README):
#: - DINOv2 sees each slice resized to 98 px (7 x 7 tokens), [0, 1] without ImageNet normalisation, rendered
#:   with the fixed CT window of the plans; the last k blocks' hidden states feed the k fused stages;
#: - fused stages = the (up to) three stages above the bottleneck, never the first one;
#: - slices are pooled by 14 along the slice axis (fewer if the patch has fewer slices);
#: - text features 256-d, fusion window 3^3 with 4 heads and 2 blocks (regular + shifted windows);
#: - identity_init: FiLM starts at gamma ~ 1 and the fusion branches at zero (networks/cdpdnet.py: with the
#:   authors' initialisation small organs start learning 3x later on the phantom merge).
OPEN_CHOICE_KEYS = ("dino_image_size", "dino_normalize", "slice_pool", "text_dim", "fusion_window", "fusion_heads",
                    "fusion_depth", "identity_init")


class PartialLabelError(ValueError):
    """A training case's label map holds label codes that its task (source dataset) does not annotate, or the
    preprocessed data has cases the merged dataset.json does not list."""


def label_values(seg) -> list[int]:
    """The distinct values of a label map (numpy array or nnU-Net's blosc2 array), sorted. Integer maps of up to
    16 bits are counted with ``bincount`` in slabs (no sort, bounded temporary memory)."""
    a = np.ascontiguousarray(seg[...])
    if a.dtype.kind in "iu" and a.dtype.itemsize <= 2:
        u = a.reshape(-1).view(f"u{a.dtype.itemsize}")
        present = np.zeros(1 << (8 * a.dtype.itemsize), bool)
        step = 1 << 24
        for i in range(0, u.size, step):
            present |= np.bincount(u[i:i + step], minlength=present.size) > 0
        return sorted(int(v) for v in np.flatnonzero(present).astype(u.dtype).view(a.dtype))
    return [int(v) if float(v).is_integer() else float(v) for v in np.unique(a).tolist()]


def _preprocessed_seg_file(folder: str, case: str) -> str:
    for name in (f"{case}_seg.b2nd", f"{case}_seg.npy", f"{case}.npz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return os.path.join(folder, f"{case}_seg.b2nd")


def fused_stages(n_stages: int) -> list[int]:
    """Encoder stages that get DINOv2 fusion: the paper's 6-stage encoder fuses 2, 3, 4."""
    return list(range(max(1, n_stages - 4), n_stages - 1))


def embed_prompts(spec: str, texts: list[str], dim: int) -> torch.Tensor:
    """Text embeddings (n, E) of the prompts; zeros on the meta device (parameter counting builds no encoders)."""
    if torch.get_default_device().type == "meta":
        return torch.zeros(len(texts), dim)
    return get_encoder(spec).embed_texts(texts).float().cpu()


@register_network_builder("cdpdnet")
def build_cdpdnet_network(settings, backbone, plans_manager, configuration_manager, num_input_channels):
    patch = list(configuration_manager.patch_size)
    if len(patch) != 3:
        raise ValueError(f"CDPDNet is a 3D method; configuration has a {len(patch)}D patch {patch}. "
                         "Train a 3d configuration (3d_fullres, 3d_tiny).")
    encoder = backbone.encoder
    stages = settings.get("dino_stages") or fused_stages(len(encoder.output_channels))
    text_dim = settings["encoders"][settings["text_encoder"]]["embed_dim"]
    dino = settings.get("dino_encoder") if settings["use_dino"] else None
    net = CDPDNet(encoder, len(settings["labels"]),
                  embed_prompts(settings["text_encoder"], settings["organ_prompts"], text_dim),
                  embed_prompts(settings["text_encoder"], settings["task_prompts"], text_dim),
                  use_alignment=settings["use_alignment"], use_dino=bool(dino), use_ttpg=settings["use_ttpg"],
                  text_dim=settings["text_dim"],
                  dino_dim=settings["encoders"][dino]["embed_dim"] if dino else 768,
                  dino_stages=tuple(stages), slice_pool=min(int(settings["slice_pool"]), patch[0]),
                  fusion_window=tuple(settings["fusion_window"]), fusion_heads=settings["fusion_heads"],
                  fusion_depth=settings["fusion_depth"], patch_size=tuple(patch),
                  identity_init=settings.get("identity_init", False))
    # the authors He-initialise every convolution of the CNN path (nnU-Net did the encoder's already)
    for part in (net.decoder, net.ttpg):
        if part is not None:
            part.apply(InitWeights_He(1e-2))
    if dino:
        net.set_conditioner(DenseSliceConditioner(dino, tuple(settings["window"]), len(stages),
                                                  settings["dino_image_size"], settings["dino_normalize"]))
    net.set_label_tasks(list(settings["label_tasks"]))
    return net


class CDPDNetTrainer(TextGuidedTrainer):
    """CDPDNet: CLIP-EVA text alignment + DINOv2 dense features + TTPG task prompts, partial-label loss."""

    textguided_method = "cdpdnet"
    #: trains on universal datasets (``nnunet-textguided merge``): label vocabulary and tasks in dataset.json
    universal = True

    paper_preset = "3d_cdpdnet_paper"
    tiny_preset = "3d_tiny"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # the paper's decoder has a single output
        # a partially labelled case carries few annotated structures: centre 2 of 3 patches on annotated
        # foreground (a pos:neg = 2:1 crop), per sample at random — nnU-Net's deterministic scheme rounds 0.66
        # and its default 0.33 to the same one sample in a batch of 2
        self.oversample_foreground_percent = self.settings.oversample_foreground
        self.probabilistic_oversampling = True
        self.universal = load_universal(dataset_json)
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        u = self.universal
        if regions is None or [r[0] for r in regions] != [u.codes[l] for l in u.labels] or \
                list(dataset_json.get("regions_class_order", [])) != [u.codes[l] for l in u.labels]:
            raise ValueError("CDPDNet trains one sigmoid output per label, channel k = label k of the vocabulary: "
                             "dataset.json must be the one `nnunet-textguided merge` wrote (labels as regions in "
                             "vocabulary order, regions_class_order = their codes; a JSON writer that sorts keys "
                             f"breaks this). Found regions {regions} for the vocabulary {u.labels} (codes "
                             f"{u.codes}); re-run the merge and the preprocessing")

    @classmethod
    def settings_for(cls, plans_manager, configuration_manager, settings, dataset_json=None) -> dict:
        if dataset_json is None:
            raise ValueError(f"{cls.__name__} needs the dataset's dataset.json (label vocabulary and tasks)")
        u = load_universal(dataset_json)
        s = settings
        specs = {"text": s.text_encoder, "dino": s.dino_encoder}
        task_labels = [list(labels) for _, labels in u.tasks]
        label_tasks = route_labels(task_labels, list(u.labels),
                                   preferred=None if u.default_task == "auto" else u.task_index(u.default_task))
        used = [specs["text"]] + ([specs["dino"]] if s.use_dino else [])
        use = {specs["text"]: {"role": "label/task prompts", "towers": ["text"], "at_inference": False}}
        if s.use_dino:
            use[specs["dino"]] = {"role": "dense slice features"}
        return {"encoders": {e: {} for e in used}, "encoder_use": use,
                "text_encoder": specs["text"], "dino_encoder": specs["dino"] if s.use_dino else None,
                "use_alignment": s.use_alignment, "use_dino": s.use_dino, "use_ttpg": s.use_ttpg,
                "labels": list(u.labels), "tasks": [name for name, _ in u.tasks], "task_labels": task_labels,
                "organ_prompts": u.organ_prompts(), "task_prompts": u.task_prompts(),
                "default_task": u.default_task, "label_tasks": label_tasks,
                "window": list(window_from_plans(plans_manager.plans, configuration_manager.configuration)),
                **{k: settings_schema.as_dict(s)[k] for k in OPEN_CHOICE_KEYS}}

    # -- nnU-Net hooks --------------------------------------------------------------------------------------
    def on_train_start(self):
        self.check_partial_labels()  # before nnU-Net builds the network or writes anything
        super().on_train_start()

    def check_partial_labels(self) -> None:
        """Every preprocessed training case (what training reads) may contain only background 0, nnU-Net's -1
        (outside the cropped non-zero region), the ignore label if any, and the codes of the labels its task
        annotates; raise :class:`PartialLabelError` naming each offending file otherwise. Reads the label maps
        only (no image data), caches nothing."""
        from nnunetv2.paths import nnUNet_raw
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        u, folder = self.universal, self.preprocessed_dataset_folder
        cases = self.all_case_identifiers()
        missing = [c for c in cases if c not in u.cases]
        if missing:
            raise PartialLabelError(
                f"{len(missing)} of {len(cases)} preprocessed cases in {folder} are not in dataset.json's "
                f"textguided_universal.cases (first: {missing[0]}): the preprocessed data does not come from this "
                "merged dataset; re-run `nnunet-textguided merge` and nnUNetv2_plan_and_preprocess")
        base = {0, -1} | ({int(self.label_manager.ignore_label)} if self.label_manager.ignore_label is not None
                          else set())
        names = {code: label for label, code in u.codes.items()}
        raw = nnUNet_raw.get()
        fe = self.dataset_json.get("file_ending", "")
        dataset = self.plans_manager.dataset_name
        dataset_class = infer_dataset_class(folder)
        data = dataset_class(folder, list(cases))
        bad, sources = [], {}
        for case in cases:
            t = u.task_of(case)
            task = " + ".join(u.tasks[i][0] for i in u.tasks_of(case))
            annotated = u.labels_of(case)
            allowed = base | {u.codes[label] for label in annotated}
            values = label_values(data.load_case(case)[1])
            foreign = [v for v in values if v not in allowed]
            if not foreign:
                continue
            what = ", ".join(f"{v} = {names[v]!r}" if v in names else f"{v} = no label of dataset.json"
                             for v in foreign)
            labels = ", ".join(f"{u.codes[label]} = {label!r}" for label in annotated)
            where = ""
            if raw:
                meta = u.cases[case]
                where = f"; preprocessed from {os.path.join(raw, dataset, 'labelsTr', case + fe)}"
                if u.sources[t] and meta.get("source_case"):
                    split = "labelsTs" if meta.get("split") == "Ts" else "labelsTr"
                    where += f", merged from {os.path.join(raw, u.sources[t], split, meta['source_case'] + fe)}"
                    sources[u.sources[t]] = os.path.join(raw, u.sources[t], "dataset.json")
            bad.append(f"  {_preprocessed_seg_file(folder, case)} (case {case}, task {task!r}) contains the values "
                       f"{foreign} ({what}), which task {task!r} does not annotate (its labels: {labels}; besides "
                       f"them only background 0{' and the ignore label' if len(base) > 2 else ''} may occur){where}")
        if bad:
            shown = bad if len(bad) <= 10 else bad[:10] + [f"  ... and {len(bad) - 10} more"]
            declare = f" ({', '.join(sources.values())})" if sources else ""
            raise PartialLabelError(
                f"{len(bad)} of {len(cases)} training cases of {dataset} hold labels outside their task's annotated "
                "set; a partially labelled case may only contain the labels its source dataset annotates (the loss "
                "of every other label is masked, so these voxels would be trained on inconsistently):\n"
                + "\n".join(shown) + "\nFix: fix the label map and rerun `nnunet-textguided merge` and "
                "`nnUNetv2_plan_and_preprocess`, or declare the label in the source dataset.json" + declare + ".")

    def source_of(self, case: str) -> str:
        """The source dataset a case was merged from."""
        return self.universal.source_of(case)

    #: a batch trains only its samples' tasks and labels, so some task / label parameters get no gradient
    ddp_find_unused_parameters = True

    def get_dataloaders(self):
        if not self.settings.balanced_sampling:
            return super().get_dataloaders()

        def probabilities(identifiers: list[str]):
            p = group_balanced_probabilities(identifiers, self.source_of)
            self.print_to_log_file("dataset-balanced sampling (each source dataset drawn with equal probability, a "
                                   "case of it uniformly; balanced_sampling=false for nnU-Net's uniform draw):\n  "
                                   + "\n  ".join(describe_probabilities(identifiers, self.source_of, p)))
            return p
        return dataloaders_with_sampling(super().get_dataloaders, probabilities)

    def _build_loss(self):
        return _MaskedLoss(PartialLabelLoss())

    def _batch_partial(self, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """(task index (B,), annotated (B, K) bool) of the batch's cases."""
        missing = [k for k in keys if k not in self.universal.cases]
        if missing:
            raise KeyError(f"case {missing[0]} is not in dataset.json's textguided_universal.cases: the "
                           "preprocessed data does not come from this merged dataset; re-run "
                           "`nnunet-textguided merge` and nnUNetv2_plan_and_preprocess")
        # each sample is trained under one of its own tasks (its source's only task unless the merge gave the source
        # several: then one at random, and the loss covers that task's labels, the ones its prompt names)
        drawn = [int(np.random.choice(self.universal.tasks_of(k))) for k in keys]
        tasks = torch.tensor(drawn, device=self.device)
        annotated = torch.tensor([self.universal.annotated_mask(k, t) for k, t in zip(keys, drawn)],
                                 device=self.device)
        return tasks, annotated

    def train_step(self, batch: dict) -> dict:
        tasks, annotated = self._batch_partial(batch["keys"])
        net = self.bare_network()
        net.set_batch_tasks(tasks)
        self.loss.annotated = annotated
        try:
            return super().train_step(batch)
        finally:
            net.set_batch_tasks(None)
            self.loss.annotated = None

    def validation_step(self, batch: dict) -> dict:
        tasks, annotated = self._batch_partial(batch["keys"])
        net = self.bare_network()
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        net.set_batch_tasks(tasks)
        try:
            with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
                output = self.network(data)
                loss = self.loss.loss(output, target, annotated)
        finally:
            net.set_batch_tasks(None)
        # pseudo Dice over the annotated (sample, label) pairs only
        m = annotated.view(*annotated.shape, *([1] * (output.ndim - 2)))
        pred, ref = torch.sigmoid(output) > 0.5, target > 0.5
        axes = [0] + list(range(2, output.ndim))
        tp = (pred & ref & m).sum(axes).cpu().numpy()
        fp = (pred & ~ref & m).sum(axes).cpu().numpy()
        fn = (~pred & ref & m).sum(axes).cpu().numpy()
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's validation with each case predicted under its own tasks: the routing is set when nnU-Net loads
        the case (just before its sliding window) and written to validation/task_routing.json."""
        net, u = self.bare_network(), self.universal
        model_routing = list(self.textguided["label_tasks"])
        base = self.dataset_class
        self.dataset_class = CaseLoadHookDatasetClass(
            base, lambda case: net.set_label_tasks(u.case_label_tasks(case, model_routing)))
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = base
            net.set_label_tasks(model_routing)
        if self.local_rank == 0:  # every validation case (under DDP each rank predicted a share of them)
            atomic_write_json(join(self.output_folder, "validation", "task_routing.json"),
                              {"rule": "each validation case: every label its source dataset annotates predicted "
                                       "under the case's own task that annotates it (the label -> task map below); "
                                       "other labels are not scored",
                               "cases": {case: self.case_routing(case) for case in sorted(self.do_split()[1])}})

    def case_routing(self, case: str) -> dict[str, str]:
        """{label the case's source annotates: the task that predicts it for this case}."""
        u = self.universal
        assignment = u.case_label_tasks(case, list(self.textguided["label_tasks"]))
        return {label: u.tasks[t][0] for label, t in zip(u.labels, assignment) if label in u.labels_of(case)}

    def write_extended_summary(self, folder: str) -> dict:
        """The extended summary plus the mean Dice of each label per source dataset and per task."""
        metrics = super().write_extended_summary(folder)
        u, fe = self.universal, self.dataset_json["file_ending"]
        regions = {str(tuple(r) if isinstance(r, (list, tuple)) else r): label
                   for label, r in zip(u.labels, self.label_manager.foreground_regions)}
        groups: dict[str, dict[str, dict[str, list]]] = {"per_source": {}, "per_task": {}}
        for case in metrics["metric_per_case"]:
            name = os.path.basename(case["reference_file"])[:-len(fe)]
            if name not in u.cases:
                continue
            for region, values in case["metrics"].items():
                label = regions.get(str(region))
                dice = values.get("Dice")
                if label is None or dice is None or np.isnan(dice):
                    continue
                groups["per_source"].setdefault(u.source_of(name), {}).setdefault(label, []).append(dice)
                task = self.case_routing(name).get(label)  # the task that predicted it
                if task is not None:
                    groups["per_task"].setdefault(task, {}).setdefault(label, []).append(dice)
        dice_tables = {kind: {g: {label: float(np.mean(v)) for label, v in per.items()} for g, per in table.items()}
                       for kind, table in groups.items()}
        for kind, table in dice_tables.items():
            for g, per in table.items():
                self.print_to_log_file(f"Validation Dice, {kind.replace('per_', '')} {g}: " + ", ".join(
                    f"{label} {d:.4f}" for label, d in per.items()) + f" (mean {np.mean(list(per.values())):.4f})")
        metrics["textguided_universal_dice"] = dice_tables
        from nnunetv2.evaluation.evaluate_predictions import save_summary_json
        with atomic_path(join(folder, "summary.json"), suffix=".json") as tmp:
            save_summary_json(metrics, tmp)
        return metrics

    def validation_case_regions(self) -> dict[str, list]:
        """Validation cases are scored only on the labels their source dataset annotates."""
        return self.universal.scored_regions(self.label_manager.foreground_regions, self.dataset_json["file_ending"])


class _MaskedLoss(torch.nn.Module):
    """nnU-Net calls ``self.loss(output, target)``; the annotated mask of the batch is set around that call."""

    def __init__(self, loss: PartialLabelLoss):
        super().__init__()
        self.loss = loss
        self.annotated: torch.Tensor | None = None

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.annotated is None:
            raise RuntimeError("partial-label loss called without the batch's annotated labels")
        return self.loss(output, target, self.annotated)


_SWITCHES = {"Baseline": (False, False, False), "CLIPEVA": (True, False, False), "DINO": (False, True, False),
             "TTPG": (False, False, True), "CLIPEVA_DINO": (True, True, False), "CLIPEVA_TTPG": (True, False, True),
             "DINO_TTPG": (False, True, True)}
ABLATION_TRAINERS = [
    type(f"CDPDNetTrainer_{name}", (CDPDNetTrainer,),
         {"variant_settings": {"use_alignment": a, "use_dino": d, "use_ttpg": t}, "__module__": __name__,
          "__doc__": f"CDPDNet ablation (Table V): CLIP-EVA {'on' if a else 'off'}, DINOv2 {'on' if d else 'off'}, "
                     f"TTPG {'on' if t else 'off'}."})
    for name, (a, d, t) in _SWITCHES.items()]

class CDPDNetTrainer_nnUNetSGD(CDPDNetTrainer):
    """CDPDNet with nnU-Net's optimiser and schedule instead of the paper's AdamW + warm-up cosine (ours, for the
    comparison): SGD with Nesterov momentum 0.99, lr 1e-2, weight decay 3e-5, poly, no warm-up."""

    variant_settings = {"optimizer": "sgd", "lr": 1e-2, "momentum": 0.99, "weight_decay": 3e-5,
                        "lr_schedule": "poly", "warmup_epochs": 0}


BASE_TRAINERS = [CDPDNetTrainer] + ABLATION_TRAINERS + [CDPDNetTrainer_nnUNetSGD]
# short schedules: _2epochs for smoke tests, _40epochs for the demo; CDPDNetTrainer_15epochs (15 x 50 = 750
# iterations) for the end-to-end test: on the 16x32x32 phantom merge every organ is segmented by then, while
# 500 iterations left the spleen at Dice ~0.05 in one of three runs
SHORT_TRAINERS = [short_schedule(t, e, it, vit) for t in BASE_TRAINERS for e, it, vit in ((2, 4, 2), (40, 25, 4))]
SHORT_TRAINERS += [short_schedule(t, 15, 50, 2) for t in (CDPDNetTrainer, CDPDNetTrainer_nnUNetSGD)]
ALL_TRAINERS = BASE_TRAINERS + SHORT_TRAINERS
globals().update({t.__name__: t for t in ALL_TRAINERS})
__all__ = [t.__name__ for t in ALL_TRAINERS]
