"""BiCLIP trainers (seed 000) on nnU-Net's own backbone from the plans, or on nnFormer (3d_nnformer_* configurations).

| trainer                    | streams          | conditioning                                                     |
|----------------------------|------------------|------------------------------------------------------------------|
| BiCLIPTrainer_Net1         | none (backbone)  | —                                                                |
| BiCLIPTrainer_Net2         | image (PMC-CLIP) | paper mode: per-full-slice tables from the store (offline)       |
| BiCLIPTrainer_Net3         | caption (CoCa)   | paper mode                                                       |
| BiCLIPTrainer (= _Net4)    | image + caption  | paper mode                                                       |
| BiCLIPTrainer_online, _Net2_online, _Net3_online | as above | beyond the paper: the slices of each input patch embedded inside forward |

Paper mode (the paper: "the extraction of CLIP embeddings is performed offline", §3.1): every full slice of
every preprocessed case is embedded once into the embedding store (lazily at training start, or ahead with
``nnUNetv2_extract_textguided``); positional channels carry each patch slice's source slice through nnU-Net's
augmentation (``data.position_channels``). Predict with ``nnUNetv2_predict_textguided``, which embeds each test
case's slices once; stock ``nnUNetv2_predict`` stops at once with that command line.
Online mode needs no store and predicts with the stock command, but runs both frozen encoders on every slice of
every patch at every step, tile and mirror (``nnunet-textguided params``: ~50x the network at the Synapse size).

Settings (``settings.BiCLIPSettings``, in the configuration's ``textguided.biclip`` block): ``image_encoder`` /
``caption_encoder`` default to the paper's PMC-CLIP image tower (``pmc-clip/image_encoder(resnet50).pth`` under the
weights root) and CoCa ViT-L/14; the ablations fix ``streams``, the paper mode fixes ``mode``; ``nnformer_weights``
starts an nnFormer backbone from a checkpoint. The tiny presets name tiny stand-in encoders for CPU tests.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from tqdm import tqdm

from ..conditioning.slices import (OnlineSliceConditioner, SliceStream, TableSliceConditioner, slice_table,
                                   slice_table_identity, window_from_plans)
from ..conditioning.store import EmbeddingStore, case_data_files, extract_command
from ..data.position_channels import PositionAwareTransforms, PositionedDataset
from ..networks.biclip import BiCLIPNetwork
from .. import settings as settings_schema
from .base import TextGuidedTrainer, check_and_record_encoders, register_network_builder, short_schedule

STREAM_METHODS = {"image": "embed_images", "caption": "embed_captions"}
NNFORMER_CLASS = "nnunet_textguided.networks.nnformer.NnFormer"
#: what the paper leaves open (METHODS.md); settings ``num_attention_blocks``, ``combine``, ``fusion_hidden``:
#: - two fused global self-attention layers that *follow* the bottleneck (its own layers stay), built like its
#:   last layer and starting from its weights ("bottleneck"; "fresh" for backbones without attention layers);
#: - the CLIP maps of the two streams are summed pixel-wise ("sum" | "mean");
#: - the concatenation takes the bottleneck *after* its norm (norm3: what nnFormer's decoder receives);
#: - fusion MLP 2C -> C -> C (fusion_hidden None = C); LayerNorm after the adapters' Conv1d (SliceEmbeddingAdapter);
#: - slices rendered with a fixed window (``window``) and resized by each encoder to its own input size;
#:   CoCa generation settings are part of the caption encoder's spec (``?generation=greedy&seq_len=...``).


def bottleneck_geometry(configuration_manager) -> tuple[tuple[int, int, int], int]:
    """Grid (D_b, H_b, W_b) and channels of the deepest encoder stage for the configuration's patch size."""
    kw = configuration_manager.network_arch_init_kwargs
    grid = np.array(configuration_manager.patch_size, dtype=float)
    for s in kw["strides"]:
        grid = np.ceil(grid / np.array(s if isinstance(s, (list, tuple)) else [s] * len(grid)))
    return tuple(int(g) for g in grid), int(kw["features_per_stage"][-1])


def streams_of(settings: dict) -> list[SliceStream]:
    return [SliceStream(**s) for s in settings["streams"]]


@register_network_builder("biclip")
def build_biclip_network(settings, backbone, plans_manager, configuration_manager, num_input_channels):
    patch = configuration_manager.patch_size
    if len(patch) != 3:
        raise ValueError(f"BiCLIP is a 3D method; configuration has a {len(patch)}D patch {patch}. "
                         "Train a 3d configuration (3d_fullres, 3d_tiny).")
    if hasattr(backbone, "grids"):  # nnFormer knows its own grids (its merges do not follow nnU-Net's strides)
        grid, channels = tuple(backbone.grids[-1]), int(backbone.channels[-1])
    else:
        grid, channels = bottleneck_geometry(configuration_manager)
    streams = streams_of(settings)
    dims = {s.name: settings["encoders"][s.encoder]["embed_dim"] for s in streams}
    net = BiCLIPNetwork(backbone, dims, num_slices=patch[0], bottleneck_grid=grid, bottleneck_channels=channels,
                        num_attention_blocks=settings.get("num_attention_blocks", 2),
                        attention_init=settings.get("attention_init", "fresh"),
                        fusion_hidden=settings.get("fusion_hidden"), combine=settings.get("combine", "sum"))
    window = tuple(settings["window"])
    if streams and settings["mode"] == "offline":
        net.set_conditioner(TableSliceConditioner(streams, window, num_input_channels))
    elif streams:
        net.set_conditioner(OnlineSliceConditioner(streams, window))
    return net


def uses_slice_tables(settings: dict) -> bool:
    """Paper mode with at least one stream: the network reads per-slice tables (positional input channels)."""
    return settings.get("method") == "biclip" and settings.get("mode") == "offline" and bool(settings.get("streams"))


class SliceTableStore(EmbeddingStore):
    """A stream's per-slice tables: (slices of the preprocessed volume + 1, embed dim), row 0 the zero slice."""

    def describe_mismatch(self, shape: tuple, expected: tuple) -> str:
        if len(shape) == len(expected) == 2 and expected[0] not in (None, shape[0]):
            return f"has {shape[0] - 1} slice rows but the preprocessed volume has {expected[0] - 1} slices"
        return super().describe_mismatch(shape, expected)


class BiCLIPTrainer(TextGuidedTrainer):
    """BiCLIP Net4 (both streams) in the paper's offline mode (setting ``mode``): per-full-slice tables from the
    embedding store, aligned to each augmented patch through positional channels."""

    textguided_method = "biclip"
    #: the paper trains nnFormer (BiCLIP-nnFormer); 500 epochs, SGD 1e-2, momentum 0.99, weight decay 3e-5 with
    #: nnU-Net's poly schedule are the schema's defaults
    paper_preset = "3d_nnformer_synapse"

    @classmethod
    def settings_for(cls, plans_manager, configuration_manager, settings, dataset_json=None) -> dict:
        specs = {"image": settings.image_encoder, "caption": settings.caption_encoder}
        streams = [{"name": n, "encoder": specs[n], "method": STREAM_METHODS[n]} for n in settings.streams]
        lo, hi = settings.ct_window_hu
        if not lo < hi:
            raise settings_schema.SettingsError(f"setting ct_window_hu: the lower bound must be below the upper "
                                                f"one, got [{lo}, {hi}]")
        return {"mode": settings.mode, "streams": streams,
                "encoders": {s["encoder"]: {} for s in streams},
                "window": list(window_from_plans(plans_manager.plans, configuration_manager.configuration,
                                                 (lo, hi))),
                "num_attention_blocks": settings.num_attention_blocks, "combine": settings.combine,
                "fusion_hidden": settings.fusion_hidden,
                # the paper's initialisation needs attention layers in the backbone's bottleneck (nnFormer)
                "attention_init": ("bottleneck" if configuration_manager.network_arch_class_name == NNFORMER_CLASS
                                   else "fresh")}


    # -- nnFormer backbone conventions --------------------------------------------------------------------
    @property
    def uses_nnformer(self) -> bool:
        return self.configuration_manager.network_arch_class_name == NNFORMER_CLASS

    def _build_loss(self):
        loss = super()._build_loss()
        if self.enable_deep_supervision and self.uses_nnformer:
            # nnFormer weights its outputs 1 : 1/2 : 1/4 (normalised); nnU-Net would drop the coarsest one
            w = np.array([0.5 ** i for i in range(len(loss.weight_factors))])
            loss.weight_factors = tuple(w / w.sum())
        return loss

    @classmethod
    def check_weights_available(cls, settings, block, configuration_manager, dataset, configuration) -> None:
        super().check_weights_available(settings, block, configuration_manager, dataset, configuration)
        weights = settings.nnformer_weights
        if weights and configuration_manager.network_arch_class_name != NNFORMER_CLASS:
            raise settings_schema.SettingsError(
                f"setting nnformer_weights={weights!r}, but configuration '{configuration}' is not an nnFormer "
                "configuration (3d_nnformer_synapse, 3d_nnformer_acdc, 3d_nnformer_tiny)")
        if weights and not settings_schema.resolve_path(weights, "nnFormer checkpoint").is_file():
            raise settings_schema.SettingsError(
                f"setting nnformer_weights: {settings_schema.resolve_path(weights)} not found. Put the nnFormer "
                "checkpoint there (nnFormer's release: https://github.com/282857341/nnFormer), or train from scratch "
                "(--set nnformer_weights=none)")

    def initialize(self):
        super().initialize()
        if self.uses_slice_tables:
            index = {c: i for i, c in enumerate(self.all_case_identifiers())}
            self.dataset_class = PositionedDatasetClass(self.dataset_class, index)
        if self.settings.nnformer_weights:
            self.load_nnformer_weights(str(settings_schema.resolve_path(self.settings.nnformer_weights)),
                                       self.settings.nnformer_weights_trusted)

    def load_nnformer_weights(self, path: str, trusted: bool = False) -> dict:
        """Initialise the nnFormer backbone from a local nnFormer checkpoint (setting ``nnformer_weights``); the
        fused attention layers then start from the loaded last bottleneck layer. Everything not loaded is
        reported in the log."""
        import torch

        from ..io import UnsafeCheckpointError, numpy_safe_globals, safe_torch_load
        from ..networks.nnformer import load_nnformer_checkpoint
        net = self.bare_network()
        if not trusted:
            try:
                safe_torch_load(path, what="nnFormer checkpoint")  # refuses pickled code before anything loads it
            except UnsafeCheckpointError as e:
                raise UnsafeCheckpointError(
                    f"{e}. nnFormer's own .model files pickle numpy objects: if you trust this file, set "
                    "nnformer_weights_trusted=true in the configuration to load it with full unpickling") from None
        with torch.serialization.safe_globals(numpy_safe_globals()):
            report = load_nnformer_checkpoint(net.backbone, path, weights_only=not trusted)
        net.reset_attention_from_bottleneck()
        self.print_to_log_file(
            f"nnFormer weights {path}: {report['matched']} tensors loaded; missing {report['missing']}; "
            f"unexpected {report['unexpected']}; shape mismatch {report['shape_mismatch']}", also_print_to_console=True)
        return report

    @property
    def uses_slice_tables(self) -> bool:
        return uses_slice_tables(self.textguided)

    # -- the store ----------------------------------------------------------------------------------------
    def slice_stores(self) -> list[tuple[SliceStream, SliceTableStore]]:
        s = self.textguided
        out = []
        for stream in streams_of(s):
            identity = slice_table_identity(stream, s["window"], s["encoders"])
            out.append((stream, SliceTableStore(self.preprocessed_dataset_folder, f"slices_{stream.name}", identity,
                                                command=extract_command(self))))
        return out

    def _dataset(self, cases):
        folder = self.preprocessed_dataset_folder
        return infer_dataset_class(folder)(folder, cases)

    @staticmethod
    def table_shape(data) -> tuple[int, None]:
        """Expected table shape of a preprocessed volume (C, D, H, W): the zero slice + one row per slice."""
        return data.shape[1] + 1, None

    def extract(self, cases=None, num_parts: int = 1, part_id: int = 0, progress: bool = True) -> dict:
        """Compute missing, stale or damaged per-slice tables. Returns counts {'computed', 'skipped'}."""
        if not self.uses_slice_tables:
            raise RuntimeError(f"trainer '{type(self).__name__}' needs no offline embeddings ("
                               + ("online mode: its encoders run inside forward)" if self.textguided["streams"]
                                  else "no embedding streams)"))
        check_and_record_encoders(self.textguided)
        cases = sorted(cases or self.all_case_identifiers())[part_id::num_parts]
        stores = self.slice_stores()
        dataset = self._dataset(cases)
        window = tuple(self.textguided["window"])
        counts = {"computed": 0, "skipped": 0}
        for case in tqdm(cases, desc="slice embeddings", disable=not progress):
            data = dataset.load_case(case)[0]
            source, shape = stores[0][1].source_hash(case), self.table_shape(data)
            todo = [(st, store) for st, store in stores if not store.is_current(case, source, shape)]
            counts["skipped"] += len(stores) - len(todo)
            if not todo:
                continue
            data = np.asarray(data[:], dtype=np.float32)
            tables = [slice_table(data, st, window, device=self.device).numpy() for st, _ in todo]
            for (st, _), table in zip(todo, tables):
                if not np.isfinite(table).all():
                    file = case_data_files(self.preprocessed_dataset_folder, case)[0]
                    raise ValueError(f"the {st.name} slice embeddings of case {case} are NaN/inf (computed from "
                                     f"{file}, {np.isfinite(data).mean():.2%} finite voxels); check the image {case} "
                                     "for NaN/inf voxels and run nnUNetv2_plan_and_preprocess again")
            for (_, store), table in zip(todo, tables):
                store.save(case, table, source)
                counts["computed"] += 1
        return counts

    def _register_tables(self) -> None:
        """Extract what is missing, stale or damaged, then hand every case's tables to the conditioner."""
        cases = self.all_case_identifiers()
        started = time.time()
        if not self.is_ddp or self.local_rank == 0:  # under DDP one process extracts, the others wait for it
            counts = self.extract(cases, progress=True)
            if counts["computed"]:
                self.print_to_log_file(f"embedding store incomplete: {counts['computed']} slice tables extracted "
                                       f"now ({time.time() - started:.0f} s)", also_print_to_console=True)
        if self.is_ddp:
            torch.distributed.barrier()
        dataset = self._dataset(cases)
        shapes = {c: self.table_shape(dataset.load_case(c)[0]) for c in cases}
        stores = self.slice_stores()
        tables = {i: {st.name: torch.from_numpy(store.load(c, shapes[c])) for st, store in stores}
                  for i, c in enumerate(cases)}
        self._conditioner().set_tables(tables)

    def _conditioner(self) -> TableSliceConditioner:
        return self.bare_network().conditioner

    # -- nnU-Net hooks (paper mode) -------------------------------------------------------------------------
    def on_train_start(self):
        super().on_train_start()
        if self.uses_slice_tables:
            self._register_tables()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.uses_slice_tables and not self._conditioner().tables:
            self._register_tables()
        super().perform_actual_validation(save_probabilities)

    def get_training_transforms(self, *args, **kwargs):
        transforms = super().get_training_transforms(*args, **kwargs)
        return PositionAwareTransforms(transforms) if self.uses_slice_tables else transforms

    def get_validation_transforms(self, *args, **kwargs):
        transforms = super().get_validation_transforms(*args, **kwargs)
        return PositionAwareTransforms(transforms) if self.uses_slice_tables else transforms


class BiCLIPTrainer_Net1(BiCLIPTrainer):
    """Ablation Net1: the backbone alone."""
    variant_settings = {"streams": ()}


class nnFormerTrainer(BiCLIPTrainer_Net1):
    """nnFormer alone (BiCLIP's Net1) on an nnFormer configuration, with the schedule BiCLIP used."""
    tiny_preset = "3d_nnformer_tiny"

    @classmethod
    def check_configuration(cls, configuration_manager, configuration: str = "") -> None:
        super().check_configuration(configuration_manager, configuration)
        if configuration_manager.network_arch_class_name != NNFORMER_CLASS:
            raise ValueError(f"{cls.__name__} trains nnFormer, but configuration '{configuration}' builds "
                             f"{configuration_manager.network_arch_class_name}. Add an nnFormer configuration "
                             "(nnunet-textguided add-config -d DATASET 3d_nnformer_synapse | 3d_nnformer_acdc | "
                             "3d_nnformer_tiny) and train that one.")


class BiCLIPTrainer_Net2(BiCLIPTrainer):
    """Ablation Net2: PMC-CLIP image-embedding stream only."""
    variant_settings = {"streams": ("image",)}


class BiCLIPTrainer_Net3(BiCLIPTrainer):
    """Ablation Net3: CoCa caption-embedding stream only."""
    variant_settings = {"streams": ("caption",)}


class BiCLIPTrainer_Net4(BiCLIPTrainer):
    """Ablation Net4: both streams (the full BiCLIP)."""


class BiCLIPTrainer_offline(BiCLIPTrainer):
    """BiCLIPTrainer under its former name (paper mode was a separate trainer): model folders trained under this
    name still load and predict."""


class BiCLIPTrainer_online(BiCLIPTrainer):
    """Beyond the paper: both encoders embed the slices of each input patch inside forward. No store, no
    misalignment under augmentation, exact under stock nnUNetv2_predict — at the cost of running both frozen
    encoders on every slice of every patch, tile and mirror (about 50x the network at the Synapse paper size)."""
    variant_settings = {"mode": "online"}


class BiCLIPTrainer_Net2_online(BiCLIPTrainer_online):
    """Net2 (image stream) in online mode (beyond the paper)."""
    variant_settings = {"mode": "online", "streams": ("image",)}


class BiCLIPTrainer_Net3_online(BiCLIPTrainer_online):
    """Net3 (caption stream) in online mode (beyond the paper)."""
    variant_settings = {"mode": "online", "streams": ("caption",)}


class PositionedDatasetClass:
    """Stands in for nnU-Net's dataset class: instances are wrapped in PositionedDataset; static helpers
    (unpack_dataset, get_identifiers, …) pass through."""

    def __init__(self, base_class, case_indices: dict[str, int]):
        self.base_class, self.case_indices = base_class, case_indices

    def __call__(self, *args, **kwargs):
        return PositionedDataset(self.base_class(*args, **kwargs), self.case_indices)

    def __getattr__(self, name):
        if name.startswith("__") or "base_class" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.base_class, name)


BASE_TRAINERS = [BiCLIPTrainer, BiCLIPTrainer_Net1, BiCLIPTrainer_Net2, BiCLIPTrainer_Net3, BiCLIPTrainer_Net4,
                 BiCLIPTrainer_offline, BiCLIPTrainer_online, BiCLIPTrainer_Net2_online, BiCLIPTrainer_Net3_online,
                 nnFormerTrainer]
# short schedules: _2epochs for smoke tests, _40epochs for the demo (see README for timings)
SHORT_TRAINERS = [short_schedule(t, e, it, vit) for t in BASE_TRAINERS for e, it, vit in ((2, 4, 2), (40, 25, 4))]
globals().update({t.__name__: t for t in SHORT_TRAINERS})
ALL_TRAINERS = BASE_TRAINERS + SHORT_TRAINERS
__all__ = [t.__name__ for t in ALL_TRAINERS] + ["BiCLIPTrainer"]
