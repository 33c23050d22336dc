"""The one base trainer every text-guided trainer derives from.

What it adds to nnUNetTrainer:
- method settings (which encoders, which mode) written into the configuration as ``textguided`` — in the
  run's plans.json, so prediction rebuilds exactly the trained network with the trained encoders;
- ``build_network_architecture`` = nnU-Net's backbone from the plans, wrapped by the method's builder, with
  the frozen encoders attached as an unregistered conditioner (absent from checkpoints and the optimizer);
- encoder identity checks: the weight hash of every encoder is recorded at training start; prediction and
  resuming refuse encoders whose spec or weights differ;
- short-schedule knobs for CPU tests and demos (``_Xepochs`` variants).
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.configuration import default_num_processes
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..conditioning.slices import get_encoder

NetworkBuilder = Callable[..., torch.nn.Module]
NETWORK_BUILDERS: dict[str, NetworkBuilder] = {}


class EncoderMismatchError(RuntimeError):
    pass


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely (missing, truncated, not a checkpoint, or pickling arbitrary
    objects)."""


def _plain(value):
    """Numpy scalars (nnU-Net's logged metrics) -> Python numbers, recursively: checkpoints stay loadable with
    ``torch.load(weights_only=True)`` without allow-listing anything."""
    import numpy as np
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def load_checkpoint_file(path: str, map_location="cpu") -> dict:
    """A checkpoint read with ``torch.load(weights_only=True)`` (io.safe_torch_load): tensors, containers and numbers
    only, never arbitrary code. CheckpointError names the file and the fix."""
    from ..io import UnsafeCheckpointError, safe_torch_load
    try:
        checkpoint = safe_torch_load(path, map_location)
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CheckpointError(f"{path} is not an nnU-Net checkpoint (no network_weights)")
    return checkpoint


def register_network_builder(method: str):
    def deco(fn: NetworkBuilder) -> NetworkBuilder:
        NETWORK_BUILDERS[method] = fn
        return fn
    return deco


def check_and_record_encoders(settings: dict, source: str = "the run's plans.json") -> None:
    """Load every encoder of ``settings['encoders']``; record its weight hash, or verify the recorded one."""
    for spec, info in settings.get("encoders", {}).items():
        enc = get_encoder(spec)
        digest = enc.weight_hash()
        if info.get("weight_hash") and info["weight_hash"] != digest:
            raise EncoderMismatchError(
                f"encoder '{spec}' has weights {digest[:12]}… but the model was trained with "
                f"{info['weight_hash'][:12]}… (recorded in {source}). Point the spec at the weights used for "
                "training, or retrain.")
        info.update(weight_hash=digest, embed_dim=enc.embed_dim, untrained=bool(enc.untrained))


def compare_encoder_records(saved: dict, current: dict, where: str) -> None:
    if saved == current:
        return
    raise EncoderMismatchError(
        f"{where} was trained with encoders {describe_encoders(saved)} but this run uses "
        f"{describe_encoders(current)}. "
        "Use the same encoder specs (trainer settings / nnUNet_textguided_* environment variables) as the "
        "checkpoint, or start a new training.")


def describe_encoders(records: dict) -> str:
    return ", ".join(f"{s} ({(r.get('weight_hash') or '?')[:12]})" for s, r in sorted(records.items())) or "none"


def _built_for_stock_predictor() -> bool:
    """The network is being built by nnU-Net's own predictor (stock nnUNetv2_predict), not a note-aware one: the
    nearest ``initialize_from_trained_model_folder`` on the call stack belongs to a predictor without
    ``reads_notes``. nnU-Net builds the network before it writes into the output folder, so refusing here leaves
    an earlier run's output folder untouched."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "initialize_from_trained_model_folder" and "self" in frame.f_locals:
            return not getattr(frame.f_locals["self"], "reads_notes", False)
        frame = frame.f_back
    return False


class TextGuidedTrainer(nnUNetTrainer):
    #: key of NETWORK_BUILDERS
    textguided_method: str = ""
    #: short schedules for tests and demos (None = nnU-Net's defaults)
    short_iterations_per_epoch: int | None = None
    short_val_iterations_per_epoch: int | None = None
    short_epochs: int | None = None
    #: the method paper's number of epochs (None = nnU-Net's 1000)
    default_epochs: int | None = None
    #: restrict mirroring (training augmentation and test-time) to these axes; None = nnU-Net's choice
    mirror_axes_override: tuple[int, ...] | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        seed = os.environ.get("nnUNet_textguided_seed")
        if seed:  # reproducible runs: weights, patch sampling and augmentation (with nnUNet_n_proc_DA=0)
            import random
            import numpy as np
            random.seed(int(seed))
            np.random.seed(int(seed))
            torch.manual_seed(int(seed))
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = (self.short_epochs or int(self.setting("nnUNet_textguided_epochs", "0"))
                           or self.default_epochs or self.num_epochs)
        # a configuration may switch deep supervision off (nnFormer's ACDC setting)
        self.enable_deep_supervision = bool(self.configuration_manager.configuration.get("deep_supervision", True))
        if self.short_iterations_per_epoch is not None:
            self.num_iterations_per_epoch = self.short_iterations_per_epoch
        if self.short_val_iterations_per_epoch is not None:
            self.num_val_iterations_per_epoch = self.short_val_iterations_per_epoch
        self.check_configuration(self.configuration_manager, configuration)
        settings = self.settings_for(self.plans_manager, self.configuration_manager, dataset_json=self.dataset_json)
        # the same dict in both places: the plans (saved as the run's plans.json and, through my_init_kwargs,
        # inside every checkpoint) and the resolved configuration the network is built from
        self.plans_manager.plans["configurations"][configuration]["textguided"] = settings
        self.configuration_manager.configuration["textguided"] = settings

    # -- to be provided by each method ---------------------------------------------------------------------
    #: the method's paper configuration: a preset in plans/ (with a ``reference`` dataset description), the
    #: paper's encoder specs by role, and the figures the paper reports (for ``nnunet-textguided params``)
    paper_preset: str | None = None
    paper_encoders: dict[str, str] = {}
    paper_figures: dict[str, float] = {}
    #: the configuration preset of tests and the demo
    tiny_preset: str = "3d_tiny"

    #: 2 or 3: the patch dimensionality the method is built for (None: any)
    spatial_dims: int | None = 3
    configuration_hint: str = "3d_fullres, 3d_tiny"

    @classmethod
    def check_configuration(cls, configuration_manager, configuration: str = "") -> None:
        """Raise ValueError (naming the configurations to use) if this trainer cannot train the configuration."""
        patch = list(configuration_manager.patch_size)
        if cls.spatial_dims is not None and len(patch) != cls.spatial_dims:
            raise ValueError(f"{cls.__name__} is a {cls.spatial_dims}D method; configuration '{configuration}' has a "
                             f"{len(patch)}D patch {patch}. Train a {cls.spatial_dims}d configuration "
                             f"({cls.configuration_hint}).")

    @classmethod
    def settings_for(cls, plans_manager, configuration_manager, encoders: dict[str, str] | None = None,
                     dataset_json: dict | None = None) -> dict:
        """The ``textguided`` settings of this trainer for a configuration. ``encoders`` ({role: spec})
        replaces the trainer's encoder choice (paper configurations, counting); otherwise the trainer's
        attributes and their environment overrides apply. ``dataset_json`` is the dataset's description
        (label vocabularies and tasks of universal datasets live there)."""
        raise NotImplementedError

    @staticmethod
    def setting(env_name: str, default: str) -> str:
        """A trainer setting with an environment override (nnUNetv2_train has no free-form arguments)."""
        return os.environ.get(env_name, default)

    # -- network --------------------------------------------------------------------------------------------
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        settings = configuration_manager.configuration.get("textguided")
        if settings is None:
            raise RuntimeError("this configuration has no 'textguided' settings: the model folder's plans.json was "
                               "not written by a nnunet-textguided trainer")
        if settings.get("notes") and _built_for_stock_predictor():
            from ..conditioning.notes import NOTES_REQUIRED, NotesRequiredError
            raise NotesRequiredError(NOTES_REQUIRED)  # before nnU-Net writes anything into the output folder
        backbone = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                            num_output_channels, enable_deep_supervision)
        check_and_record_encoders(settings)
        builder = NETWORK_BUILDERS[settings["method"]]
        return builder(settings, backbone, plans_manager, configuration_manager, num_input_channels)

    def all_case_identifiers(self) -> list[str]:
        """Every case of the configuration's preprocessed data."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        folder = self.preprocessed_dataset_folder
        return sorted(infer_dataset_class(folder).get_identifiers(folder))

    def bare_network(self) -> torch.nn.Module:
        """The network without torch.compile / DDP wrappers."""
        net = self.network._orig_mod if hasattr(self.network, "_orig_mod") else self.network
        return net.module if hasattr(net, "module") else net

    @property
    def textguided(self) -> dict:
        return self.configuration_manager.configuration["textguided"]

    def initialize(self):
        super().initialize()
        untrained = [s for s, r in self.textguided.get("encoders", {}).items() if r.get("untrained")]
        if untrained:
            self.print_to_log_file(f"WARNING: encoders {untrained} are random-init test encoders (untrained); "
                                   "results say nothing about the method. See README for real encoders.")

    # -- training-only modules and checkpoints -------------------------------------------------------------
    #: trainable modules used only by the training losses (RecLMIS: interest MLPs, reconstructors): built by
    #: ``build_training_only_modules``, optimised with the network, saved in checkpoints under
    #: ``training_only_weights`` — never part of the network, so the predictor builds and loads the inference graph
    #: alone (``network_weights``)
    training_only: torch.nn.Module | None = None

    @classmethod
    def build_training_only_modules(cls, settings: dict, network: torch.nn.Module) -> torch.nn.Module | None:
        """The training-only modules for ``network`` (built from the same settings), or None."""
        return None

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint (same keys) plus ``training_only_weights``, written atomically: an interrupted
        save leaves the previous checkpoint intact instead of a truncated file. The dict mirrors
        nnUNetTrainer.save_checkpoint of nnunetv2 2.8.1: compare it when nnU-Net is upgraded."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        from ..io import atomic_torch_save
        checkpoint = {
            "network_weights": self.bare_network().state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": _plain(self.logger.get_checkpoint()),
            "_best_ema": _plain(self._best_ema),
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
        }
        if self.training_only is not None:
            checkpoint["training_only_weights"] = self.training_only.state_dict()
        atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint):
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = load_checkpoint_file(checkpoint, map_location=self.device)
        saved = checkpoint["init_args"]["plans"]["configurations"][self.configuration_name].get("textguided", {})
        where = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "the checkpoint"
        self.reconcile_saved_settings(saved)
        compare_encoder_records(saved.get("encoders", {}), self.textguided.get("encoders", {}), str(where))
        changed = sorted(k for k in set(saved) | set(self.textguided)
                         if k != "encoders" and saved.get(k) != self.textguided.get(k))
        if changed:
            raise RuntimeError(f"{where} was trained with other settings for {', '.join(changed)} ("
                               + "; ".join(f"{k}: {saved.get(k)!r} -> {self.textguided.get(k)!r}" for k in changed)
                               + "). Resume with the same nnUNet_textguided_* environment variables, or start a "
                               "new training.")
        if self.training_only is not None:
            if "training_only_weights" not in checkpoint:
                raise RuntimeError(f"{where} has no training_only_weights (the {type(self).__name__} losses' own "
                                   "modules): it was not written by this trainer; start a new training")
            self.training_only.load_state_dict(checkpoint["training_only_weights"])
        # nnU-Net 2.8.1's load_checkpoint only works with a file name (given a dict, it never binds it)
        super().load_checkpoint(filename_or_checkpoint)

    def reconcile_saved_settings(self, saved: dict) -> None:
        """Called by ``load_checkpoint`` with the checkpoint's ``textguided`` settings before they are compared
        with this run's: a trainer may adopt saved values that only mattered when the run started."""

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0:
            self.write_extended_summary(join(self.output_folder, "validation"))

    def write_extended_summary(self, folder: str) -> dict:
        """Re-evaluate ``folder`` with the papers' metrics (HD95, precision, recall, accuracy, both mIoU forms)
        and replace nnU-Net's summary.json there by the superset (same keys, more keys)."""
        from ..evaluation.evaluate import compute_metrics_on_folder_extended
        lm = self.label_manager
        metrics = compute_metrics_on_folder_extended(
            join(self.preprocessed_dataset_folder_base, "gt_segmentations"), folder, join(folder, "summary.json"),
            self.plans_manager.image_reader_writer_class(), self.dataset_json["file_ending"],
            lm.foreground_regions if lm.has_regions else lm.foreground_labels, lm.ignore_label, chill=True,
            num_processes=default_num_processes, case_regions=self.validation_case_regions())
        fg = metrics["foreground_mean"]
        self.print_to_log_file("Validation (extended summary.json): " + ", ".join(
            f"{k} {fg[k]:.4f}" for k in ("Dice", "IoU", "HD95", "Precision", "Recall") if k in fg))
        return metrics

    def validation_case_regions(self) -> dict[str, list] | None:
        """{prediction file name: labels/regions to score} when cases are scored on subsets (partial labels)."""
        return None

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rot, dummy2d, initial, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if self.mirror_axes_override is not None:
            mirror_axes = tuple(self.mirror_axes_override)
            self.inference_allowed_mirroring_axes = mirror_axes
        return rot, dummy2d, initial, mirror_axes


def short_schedule(base: type, epochs: int, iterations: int, val_iterations: int,
                   mirror_axes: tuple[int, ...] | None = (0,), module: str | None = None) -> type:
    """nnU-Net's ``_Xepochs`` pattern with fewer iterations per epoch (for CPU tests and the demo)."""
    name = f"{base.__name__}_{epochs}epochs"
    attrs = {"short_epochs": epochs, "short_iterations_per_epoch": iterations,
             "short_val_iterations_per_epoch": val_iterations, "mirror_axes_override": mirror_axes,
             "__module__": module or base.__module__,
             "__doc__": f"{base.__name__} with {epochs} epochs x {iterations} iterations (CPU tests / demo)."}
    return type(name, (base,), attrs)
