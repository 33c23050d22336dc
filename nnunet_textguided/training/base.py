"""The one base trainer every text-guided trainer derives from.

What it adds to nnUNetTrainer:
- method settings read from the configuration's ``textguided`` block (``settings``: schema defaults < the trainer
  variant's < the configuration's, validated), checked before anything is built (every encoder's weights are
  here, no legacy environment variable), and written back resolved into the run's plans.json (nnU-Net copies it
  into the model folder), so prediction rebuilds exactly the trained network with the trained encoders;
- optimiser and schedule from the settings (``training.optimisation``; sgd + poly = nnU-Net's own);
- ``build_network_architecture`` = nnU-Net's backbone from the plans, wrapped by the method's builder, with
  the frozen encoders attached as an unregistered conditioner (absent from checkpoints and the optimizer);
- encoder identity checks: the weight hash of every encoder is recorded at training start; prediction and
  resuming refuse encoders whose spec or weights differ;
- short schedules for CPU tests and demos (``_Xepochs`` variants: they fix epochs and iterations).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable

import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.configuration import default_num_processes
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from .. import settings as settings_schema
from ..conditioning.slices import get_encoder
from ..encoders.registry import EncoderUnavailableError, check_available, is_untrained_spec
from .optimisation import build_optimizer_and_schedule

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
    """Load every encoder of ``settings['encoders']``; record its identity (weight sha256, embedding size, trained
    or not), or verify the recorded weight hash (EncoderMismatchError naming both hashes and where the weights
    were read)."""
    for spec, info in settings.get("encoders", {}).items():
        enc = get_encoder(spec)
        digest = enc.weight_hash()
        if info.get("weight_hash") and info["weight_hash"] != digest:
            raise EncoderMismatchError(
                f"encoder '{spec}' ({encoder_location(spec)}) has weights sha256 {digest} but the model was trained "
                f"with {info['weight_hash']} (recorded in {source}): another file sits behind the same name. Put the "
                f"training weights there (or point {settings_schema.WEIGHTS_ROOT_VARIABLE} at the root holding them), "
                "or retrain.")
        info.update(weight_hash=digest, embed_dim=enc.embed_dim, untrained=bool(enc.untrained))


def encoder_location(spec: str) -> str:
    """Where an encoder's weights are read from on this machine (for messages)."""
    from ..encoders.registry import resolved_parts
    try:
        kind, arg, _ = resolved_parts(spec)
    except (ValueError, OSError) as e:
        return f"not resolvable here: {e}"
    if kind.startswith("tiny-") or kind == "minilm":
        return "built in" if kind == "minilm" else "random init, untrained"
    return f"read from {arg.removeprefix('local-dir:')}"


def untrained_encoders(block: dict) -> list[str]:
    """Specs of the untrained (random-init) encoders a resolved block uses."""
    return sorted(spec for spec, rec in block.get("encoders", {}).items()
                  if rec.get("untrained", is_untrained_spec(spec)))


_WARNED_UNTRAINED: set[tuple[str, ...]] = set()


def warn_untrained(block: dict, what: str = "this model") -> None:
    """One stderr line per process and set of encoders: a model with untrained stand-in encoders says nothing
    about its method."""
    specs = tuple(untrained_encoders(block))
    if specs and specs not in _WARNED_UNTRAINED:
        _WARNED_UNTRAINED.add(specs)
        print(f"WARNING: {what} uses untrained (random-init) stand-in encoders {', '.join(specs)}: its results say "
              "nothing about the method (tests and demos only)", file=sys.stderr)


def compare_encoder_records(saved: dict, current: dict, where: str) -> None:
    if saved == current:
        return
    raise EncoderMismatchError(
        f"{where} was trained with encoders {describe_encoders(saved)} but this run uses "
        f"{describe_encoders(current)}. "
        "Use the same encoder settings (the configuration's textguided block) as the checkpoint, or start a new "
        "training under another configuration name.")


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


def _argument(argv: list[str], flag: str) -> str | None:
    """The value after ``flag`` in a command line, or None."""
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


class TextGuidedTrainer(nnUNetTrainer):
    #: key of NETWORK_BUILDERS and of ``settings.SCHEMAS``
    textguided_method: str = ""
    #: settings this trainer variant fixes (ablation switches, short schedules): its defaults on top of the
    #: schema's; a configuration setting one of them to another value is refused (``settings.resolve``)
    variant_settings: dict = {}
    #: a short schedule (``short_schedule``) of this base trainer, for CPU tests and demos
    schedule_of: type | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        settings_schema.check_environment("nnUNetv2_train")
        # everything is checked before nnU-Net's __init__ creates the output folder: a run that cannot start
        # leaves no trace
        pm = PlansManager(plans)
        cm = pm.get_configuration(configuration)
        where = (f"configuration '{configuration}' of {plans.get('dataset_name', 'the dataset')}'s "
                 f"{plans.get('plans_name', 'nnUNetPlans')}.json")
        s = self.resolve_settings(cm.configuration, where)
        self.check_configuration(cm, configuration)
        block = self.textguided_block(pm, cm, s, dataset_json)
        self.check_weights_available(s, block, cm, pm.dataset_name, configuration)
        if s.seed is not None:  # reproducible runs: weights, patch sampling and augmentation (with nnUNet_n_proc_DA=0)
            import random
            import numpy as np
            random.seed(s.seed)
            np.random.seed(s.seed)
            torch.manual_seed(s.seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":
            # a gloo process group on CPUs (the DDP tests, CPU clusters): nnU-Net assumes one GPU per rank
            self.device, self.grad_scaler = torch.device("cpu"), None
        self.settings = s
        self.num_epochs = s.epochs
        self.num_iterations_per_epoch = s.iterations_per_epoch
        self.num_val_iterations_per_epoch = s.val_iterations_per_epoch
        self.initial_lr, self.weight_decay = s.lr, s.weight_decay
        # a configuration may switch deep supervision off (nnFormer's ACDC setting)
        self.enable_deep_supervision = bool(self.configuration_manager.configuration.get("deep_supervision", True))
        # the same dict in both places: the plans (saved as the run's plans.json and, through my_init_kwargs,
        # inside every checkpoint) and the resolved configuration the network is built from
        self.plans_manager.plans["configurations"][configuration]["textguided"] = block
        self.configuration_manager.configuration["textguided"] = block

    # -- settings -------------------------------------------------------------------------------------------
    @classmethod
    def own_settings(cls) -> dict:
        """The variant settings of this class and its bases (nearest wins)."""
        out: dict = {}
        for k in reversed(cls.__mro__):
            out.update(k.__dict__.get("variant_settings", {}) or {})
        return out

    @classmethod
    def resolve_settings(cls, configuration: dict, where: str = "the configuration"):
        """This trainer's typed settings for a configuration dict (``settings.resolve``)."""
        return settings_schema.resolve(cls.textguided_method, configuration, cls.own_settings(), cls.__name__, where)

    @classmethod
    def textguided_block(cls, plans_manager, configuration_manager, settings=None, dataset_json=None) -> dict:
        """The resolved ``textguided`` block: method, every setting, and what the network builder derives from
        them for this configuration (encoder records to fill, streams, windows...)."""
        s = settings if settings is not None else cls.resolve_settings(configuration_manager.configuration)
        derived = cls.settings_for(plans_manager, configuration_manager, s, dataset_json)
        return {"method": cls.textguided_method, "settings": settings_schema.as_dict(s), **derived}

    @classmethod
    def check_weights_available(cls, settings, block: dict, configuration_manager, dataset: str,
                                configuration: str) -> None:
        """Every encoder's weights are here (a file, a folder, the hub cache or a reachable hub), checked in well
        under a second before anything is built or written: else one message naming the setting, what is
        missing, where to get it and where to put it."""
        for spec in block.get("encoders", {}):
            try:
                check_available(spec)
            except EncoderUnavailableError as e:
                names = [k for k in settings_schema.encoder_keys(cls.textguided_method) if getattr(settings, k) == spec]
                key = names[0] if names else "the encoder"
                raise EncoderUnavailableError(
                    f"{cls.__name__}, setting {key}: {e}. Or train with other weights: nnunet-textguided add-config "
                    f"-d {dataset} {configuration} --name NEW_CONFIGURATION --set {key}=SPEC (untrained tiny-* "
                    "stand-ins only for tests)") from None

    @classmethod
    def settings_for(cls, plans_manager, configuration_manager, settings, dataset_json: dict | None = None) -> dict:
        """What this method's network builder needs, derived from the typed ``settings`` for a configuration
        (must hold ``encoders``: {spec: {}} for every encoder used). ``dataset_json`` is the dataset's description
        (label vocabularies and tasks of universal datasets live there)."""
        raise NotImplementedError

    # -- to be provided by each method ---------------------------------------------------------------------
    #: the method's paper configuration: a preset in plans/ (with a ``reference`` dataset description) and the
    #: figures the paper reports (for ``nnunet-textguided params``); the paper's encoders are the schema's defaults
    paper_preset: str | None = None
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

    # -- optimiser ------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        """The settings' optimiser and schedule (sgd + poly: nnU-Net's own)."""
        return build_optimizer_and_schedule(self.optimised_parameters(), self.settings, self.num_epochs)

    def optimised_parameters(self):
        return self.network.parameters()

    # -- network --------------------------------------------------------------------------------------------
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        settings = configuration_manager.configuration.get("textguided")
        if settings is None:
            raise RuntimeError("this configuration has no 'textguided' settings: the model folder's plans.json was "
                               "not written by a nnunet-textguided trainer")
        if "method" not in settings:
            raise RuntimeError("this configuration's 'textguided' block holds unresolved settings: build the network "
                               "through a nnunet-textguided trainer (nnUNetv2_train), or predict from a model folder")
        if settings.get("notes") and _built_for_stock_predictor():
            from ..conditioning.notes import NOTES_REQUIRED, NotesRequiredError
            raise NotesRequiredError(NOTES_REQUIRED)  # before nnU-Net writes anything into the output folder
        if (settings.get("mode") == "offline" and settings.get("streams")) and _built_for_stock_predictor():
            from ..conditioning.slices import SliceTablesRequiredError, stock_predict_refusal
            from ..io import remove_empty_folder_made_by_this_process
            # nnUNetv2_predict made the output folder just before building the network: leave no trace
            remove_empty_folder_made_by_this_process(_argument(sys.argv, "-o"))
            raise SliceTablesRequiredError(stock_predict_refusal(sys.argv))
        settings_schema.check_environment("building a nnunet-textguided network")
        backbone = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                            num_output_channels, enable_deep_supervision)
        check_and_record_encoders(settings)
        warn_untrained(settings)
        builder = NETWORK_BUILDERS[settings["method"]]
        return builder(settings, backbone, plans_manager, configuration_manager, num_input_channels)

    def _do_i_compile(self) -> bool:
        """nnU-Net's decision, for every method (compiled on CUDA unless nnUNet_compile says otherwise). What is
        compiled is the trainable network, as one graph; the conditioner (frozen encoders, CoCa's captioning,
        store lookups, the notes and task routing handed over per batch) runs eagerly before it
        (``ConditionedNetwork.condition``). Said once in the log."""
        compiled = super()._do_i_compile()
        if compiled and not getattr(self, "_compile_logged", False):
            self._compile_logged = True
            encoders = ", ".join(sorted(self.textguided.get("encoders", {}))) or "none"
            self.print_to_log_file(
                "torch.compile: the trainable network is compiled (one graph); the frozen encoders "
                f"({encoders}) and the conditioning hand-over run eagerly before it, outside autocast, in their "
                "weights' dtype: caption generation is a token loop of data-dependent length, paper-mode models "
                "read stored embeddings, and online conditioning stays equal to the embeddings stored without "
                "autocast. nnUNet_compile=false switches compiling off")
        return compiled

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

    #: DDP(find_unused_parameters=...): True for networks that leave parameters unused in some steps (CDPDNet's
    #: task routing); without it DDP reduces no gradient at all in such a step and stops at the next
    ddp_find_unused_parameters: bool = False

    def initialize(self):
        if self.is_ddp:
            with _ddp_wrapper(self.device.type == "cpu", self.ddp_find_unused_parameters):
                super().initialize()
        else:
            super().initialize()
        untrained = untrained_encoders(self.textguided)
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
        changed = changed_settings(saved, self.textguided)
        if changed:
            raise RuntimeError(f"{where} was trained with other settings for {', '.join(changed)} ("
                               + "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in changed.items())
                               + "). Resume with the configuration's textguided settings the run started with, or "
                               "start a new training under another configuration name.")
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
        from ..evaluation.evaluate import block_record, compute_metrics_on_folder_extended
        lm = self.label_manager
        metrics = compute_metrics_on_folder_extended(
            join(self.preprocessed_dataset_folder_base, "gt_segmentations"), folder, join(folder, "summary.json"),
            self.plans_manager.image_reader_writer_class(), self.dataset_json["file_ending"],
            lm.foreground_regions if lm.has_regions else lm.foreground_labels, lm.ignore_label, chill=True,
            num_processes=default_num_processes, case_regions=self.validation_case_regions(),
            model={"trainer": type(self).__name__, **block_record(self.configuration_name, self.textguided)})
        fg = metrics["foreground_mean"]
        self.print_to_log_file("Validation (extended summary.json): " + ", ".join(
            f"{k} {fg[k]:.4f}" for k in ("Dice", "IoU", "HD95", "Precision", "Recall") if k in fg))
        return metrics

    def validation_case_regions(self) -> dict[str, list] | None:
        """{prediction file name: labels/regions to score} when cases are scored on subsets (partial labels)."""
        return None

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rot, dummy2d, initial, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if self.settings.mirror_axes is not None:
            mirror_axes = tuple(self.settings.mirror_axes)
            self.inference_allowed_mirroring_axes = mirror_axes or None  # nnU-Net's predictor: None = no mirroring
        return rot, dummy2d, initial, mirror_axes


@contextmanager
def _ddp_wrapper(cpu: bool, find_unused_parameters: bool):
    """nnU-Net's initialize wraps the network in SyncBatchNorm + DDP(network, device_ids=[rank]): here with the
    trainer's ``find_unused_parameters``, and on CPU ranks (gloo) without device ids and with BatchNorm
    statistics per rank (both are for GPU modules only)."""
    module = sys.modules[nnUNetTrainer.__module__]
    original, convert = module.DDP, torch.nn.SyncBatchNorm.__dict__["convert_sync_batchnorm"]

    def ddp(network, device_ids=None, **kwargs):
        return original(network, device_ids=None if cpu else device_ids,
                        find_unused_parameters=find_unused_parameters, **kwargs)
    module.DDP = ddp
    if cpu:
        torch.nn.SyncBatchNorm.convert_sync_batchnorm = staticmethod(lambda network, *args, **kwargs: network)
    try:
        yield
    finally:
        module.DDP = original
        torch.nn.SyncBatchNorm.convert_sync_batchnorm = convert


class CaseLoadHookDatasetClass:
    """Stands in for nnU-Net's dataset class during validation: ``load_case(k)`` also calls ``on_load(k)`` (nnU-Net
    loads each validation case just before its sliding window: a case's note or task routing is set there)."""

    def __init__(self, base_class, on_load):
        self.base_class, self.on_load = base_class, on_load

    def __call__(self, *args, **kwargs):
        dataset = self.base_class(*args, **kwargs)
        load = dataset.load_case

        def load_case(key):
            out = load(key)
            self.on_load(key)
            return out
        dataset.load_case = load_case
        return dataset

    def __getattr__(self, name):
        if name.startswith("__") or "base_class" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.base_class, name)


def changed_settings(saved: dict, current: dict) -> dict[str, tuple]:
    """{key: (saved, current)} of two resolved blocks, encoder records apart; the settings compared key by key."""
    out = {}
    for k in sorted(set(saved) | set(current)):
        if k == "encoders":
            continue
        a, b = saved.get(k), current.get(k)
        if k == "settings" and isinstance(a, dict) and isinstance(b, dict):
            out.update({f"settings.{n}": (a.get(n), b.get(n)) for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)})
        elif a != b:
            out[k] = (a, b)
    return out


def short_schedule(base: type, epochs: int, iterations: int, val_iterations: int,
                   mirror_axes: tuple[int, ...] | None = (0,), module: str | None = None) -> type:
    """nnU-Net's ``_Xepochs`` pattern with fewer iterations per epoch (for CPU tests and the demo): a variant that
    fixes epochs, iterations and (if given) the mirrored axes."""
    name = f"{base.__name__}_{epochs}epochs"
    fixed = {"epochs": epochs, "iterations_per_epoch": iterations, "val_iterations_per_epoch": val_iterations}
    # a warm-up keeps its share of the schedule (CDPDNet: 50 of 1000 epochs -> 2 of 40), rather than filling it
    full = settings_schema.resolve(base.textguided_method, {}, base.own_settings(), base.__name__)
    if full.warmup_epochs:
        fixed["warmup_epochs"] = round(full.warmup_epochs * epochs / full.epochs)
    if mirror_axes is not None:
        fixed["mirror_axes"] = tuple(mirror_axes)
    attrs = {"variant_settings": fixed, "schedule_of": base, "__module__": module or base.__module__,
             "__doc__": f"{base.__name__} with {epochs} epochs x {iterations} iterations (CPU tests / demo)."}
    return type(name, (base,), attrs)
