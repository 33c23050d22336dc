"""BiCLIP trainers (seed 000) on nnU-Net's own backbone from the plans.

| trainer                   | streams          | conditioning                                              |
|---------------------------|------------------|-----------------------------------------------------------|
| BiCLIPTrainer_Net1        | none (backbone)  | —                                                         |
| BiCLIPTrainer_Net2        | image (PMC-CLIP) | online: slices of the input patch, inside forward         |
| BiCLIPTrainer_Net3        | caption (CoCa)   | online                                                    |
| BiCLIPTrainer (= Net4)    | image + caption  | online                                                    |
| BiCLIPTrainer_offline     | image + caption  | paper mode: per-full-slice tables from the store          |

Encoders: trainer attributes ``image_encoder`` / ``caption_encoder``, overridable with the environment
variables ``nnUNet_textguided_image_encoder`` / ``nnUNet_textguided_caption_encoder``. Defaults are the tiny
random test encoders (CPU demo); the paper's are e.g. ``pmcclip:/path/to/image_encoder(resnet50).pth`` and
``coca:coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k`` (see README).
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from tqdm import tqdm

from ..conditioning.slices import (OnlineSliceConditioner, SliceStream, TableSliceConditioner, slice_table,
                                   window_from_plans)
from ..conditioning.store import EmbeddingStore
from ..data.position_channels import PositionAwareTransforms, PositionedDataset
from ..networks.biclip import BiCLIPNetwork
from .base import TextGuidedTrainer, check_and_record_encoders, register_network_builder, short_schedule

STREAM_METHODS = {"image": "embed_images", "caption": "embed_captions"}


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
    grid, channels = bottleneck_geometry(configuration_manager)
    streams = streams_of(settings)
    dims = {s.name: settings["encoders"][s.encoder]["embed_dim"] for s in streams}
    net = BiCLIPNetwork(backbone, dims, num_slices=patch[0], bottleneck_grid=grid, bottleneck_channels=channels,
                        num_attention_blocks=settings.get("num_attention_blocks", 2))
    window = tuple(settings["window"])
    if settings["mode"] == "offline":
        net.set_conditioner(TableSliceConditioner(streams, window, num_input_channels))
    elif streams:
        net.set_conditioner(OnlineSliceConditioner(streams, window))
    return net


class BiCLIPTrainer(TextGuidedTrainer):
    """BiCLIP Net4 (both streams), online conditioning: exact under stock nnUNetv2_predict."""
    textguided_method = "biclip"
    streams: tuple[str, ...] = ("image", "caption")
    mode = "online"
    image_encoder = "tiny-pmcclip"
    caption_encoder = "tiny-coca"

    paper_preset = "3d_biclip_paper"
    paper_encoders = {"image": "pmcclip:image_encoder(resnet50).pth",
                      "caption": "coca:coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k"}

    @classmethod
    def settings_for(cls, plans_manager, configuration_manager, encoders=None) -> dict:
        specs = encoders or {"image": cls.setting("nnUNet_textguided_image_encoder", cls.image_encoder),
                             "caption": cls.setting("nnUNet_textguided_caption_encoder", cls.caption_encoder)}
        streams = [{"name": n, "encoder": specs[n], "method": STREAM_METHODS[n]} for n in cls.streams]
        return {"method": "biclip", "mode": cls.mode, "streams": streams,
                "encoders": {s["encoder"]: {} for s in streams},
                "window": list(window_from_plans(plans_manager.plans, configuration_manager.configuration)),
                "num_attention_blocks": 2}


class BiCLIPTrainer_Net1(BiCLIPTrainer):
    """Ablation Net1: the backbone alone."""
    streams = ()


class BiCLIPTrainer_Net2(BiCLIPTrainer):
    """Ablation Net2: PMC-CLIP image-embedding stream only."""
    streams = ("image",)


class BiCLIPTrainer_Net3(BiCLIPTrainer):
    """Ablation Net3: CoCa caption-embedding stream only."""
    streams = ("caption",)


class BiCLIPTrainer_Net4(BiCLIPTrainer):
    """Ablation Net4: both streams (the full BiCLIP)."""


class BiCLIPTrainer_offline(BiCLIPTrainer):
    """Paper mode: embeddings of every full slice computed offline into the store, aligned to each patch's
    source slices through positional channels. Predict with nnUNetv2_predict_textguided."""
    mode = "offline"

    # -- the store ----------------------------------------------------------------------------------------
    def slice_stores(self) -> list[tuple[SliceStream, EmbeddingStore]]:
        s = self.textguided
        out = []
        for stream in streams_of(s):
            identity = {"kind": "slice_table", "stream": stream.name, "encoder": stream.encoder,
                        "method": stream.method, "window": s["window"],
                        "weight_hash": s["encoders"][stream.encoder].get("weight_hash")}
            out.append((stream, EmbeddingStore(self.preprocessed_dataset_folder, f"slices_{stream.name}", identity)))
        return out

    def all_case_identifiers(self) -> list[str]:
        return sorted(infer_dataset_class(self.preprocessed_dataset_folder).get_identifiers(self.preprocessed_dataset_folder))

    def extract(self, cases=None, num_parts: int = 1, part_id: int = 0, progress: bool = True) -> dict:
        """Compute missing or stale per-slice tables. Returns counts {'computed', 'skipped'}."""
        check_and_record_encoders(self.textguided)
        cases = sorted(cases or self.all_case_identifiers())[part_id::num_parts]
        stores = self.slice_stores()
        dataset = infer_dataset_class(self.preprocessed_dataset_folder)(self.preprocessed_dataset_folder, cases)
        counts = {"computed": 0, "skipped": 0}
        for case in tqdm(cases, desc="slice embeddings", disable=not progress):
            source = stores[0][1].source_hash(case)
            todo = [(st, store) for st, store in stores if not store.is_current(case, source)]
            counts["skipped"] += len(stores) - len(todo)
            if not todo:
                continue
            data = np.asarray(dataset.load_case(case)[0][:], dtype=np.float32)
            window = tuple(self.textguided["window"])
            for st, store in todo:
                store.save(case, slice_table(data, st, window, device=self.device).numpy(), source)
                counts["computed"] += 1
        return counts

    def _register_tables(self) -> None:
        cases = self.all_case_identifiers()
        missing = [c for c in cases if not all(store.is_current(c) for _, store in self.slice_stores())]
        if missing:
            self.print_to_log_file(f"embedding store incomplete ({len(missing)} cases): extracting now")
            self.extract(missing)
        tables = {i: {st.name: torch.from_numpy(store.load(c)) for st, store in self.slice_stores()}
                  for i, c in enumerate(cases)}
        self._conditioner().set_tables(tables)

    def _conditioner(self) -> TableSliceConditioner:
        net = self.network._orig_mod if hasattr(self.network, "_orig_mod") else self.network
        return (net.module if hasattr(net, "module") else net).conditioner

    # -- nnU-Net hooks ------------------------------------------------------------------------------------
    def initialize(self):
        super().initialize()
        index = {c: i for i, c in enumerate(self.all_case_identifiers())}
        self.dataset_class = PositionedDatasetClass(self.dataset_class, index)

    def on_train_start(self):
        super().on_train_start()
        self._register_tables()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not self._conditioner().tables:
            self._register_tables()
        super().perform_actual_validation(save_probabilities)

    def get_training_transforms(self, *args, **kwargs):
        return PositionAwareTransforms(super().get_training_transforms(*args, **kwargs))

    def get_validation_transforms(self, *args, **kwargs):
        return PositionAwareTransforms(super().get_validation_transforms(*args, **kwargs))


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
                 BiCLIPTrainer_offline]
# short schedules: _2epochs for smoke tests, _40epochs for the demo (see README for timings)
SHORT_TRAINERS = [short_schedule(t, e, it, vit) for t in BASE_TRAINERS for e, it, vit in ((2, 4, 2), (40, 25, 4))]
globals().update({t.__name__: t for t in SHORT_TRAINERS})
ALL_TRAINERS = BASE_TRAINERS + SHORT_TRAINERS
__all__ = [t.__name__ for t in ALL_TRAINERS] + ["BiCLIPTrainer"]
