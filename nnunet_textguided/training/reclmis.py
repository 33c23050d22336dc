"""RecLMIS trainers (seed 004): cross-modal conditioned reconstruction for note-guided 2D segmentation.

| trainer              | what it trains                                                                      |
|----------------------|-------------------------------------------------------------------------------------|
| RecLMISTrainer       | UNet + PLAM, frozen text tokens -> Conv1d, CI; losses 1 CVR + 1 CLR + 0.2 CCL + 5 seg |
| RecLMISTrainer_noCLR / _noCVR | Table III (b) / (c): without CLR / without CVR                             |
| RecLMISTrainer_CI    | Table III (d): CI only (CCL kept, CVR / CLR weights 0)                              |
| RecLMISTrainer_noCI  | Table III (e): UNet + PLAM without text (no CI, no auxiliary losses)                |
| RecLMISTrainer_authorsCI | CI as the authors' code has it (V' attends to E', not to the note tokens)       |

Network (``networks.reclmis.RecLMIS``, the inference graph): the LViT-style UNet with PLAM on the skips, widths
and pooling from the configuration (``2d_reclmis_paper``: 224 x 224, 64..512; ``2d_tiny`` for CPU tests), the
note's frozen token states through a Conv1d, and the conditioned interaction (CI) at the bottleneck. The
interest MLPs (W_poi, W_woi), the probability-weighted masking, the CVR / CLR reconstructors and the
conditioned contrastive loss are training-only (``networks.reclmis.RecLMISAuxiliary``): the trainer owns and
optimises them beside the network and keeps them in the checkpoint under ``training_only_weights``; the
network's own weights — what ``nnUNetv2_predict_textguided`` loads — hold only the inference graph.

Loss: eq. 11, L = λ1 L_V2T + λ2 L_T2V + λ3 L_CCL + λ4 (L_Dice + L_CE) with λ = 1, 1, 0.2, 5
(``losses.reclmis.reclmis_objective``; settings ``loss_clr``, ``loss_cvr``, ``loss_ccl``, ``loss_seg``); L_Dice +
L_CE is nnU-Net's Dice + CE (softmax over background/foreground), summed as eq. 11 writes it (the authors' code
averages them, 0.5 Dice + 0.5 BCE, which halves λ4). Optimiser: Adam 3e-4 with a cosine schedule (the paper:
``optimizer``, ``lr``, ``lr_schedule``); no deep supervision (one output).

Notes: ``<CASE>.txt`` per image (``training.notes``). Text encoder: the paper's CLIP ViT-B/32 text tower
(``text_encoder`` = ``openclip:ViT-B-32@openai``, ``max_tokens`` 18; 10 for MoNuSeg).
"""
from __future__ import annotations


import numpy as np
import torch
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from ..conditioning.notes import NoteConditioner
from ..losses.distributed import average_gradients, broadcast_module
from ..losses.reclmis import reclmis_objective
from ..networks.reclmis import RecLMIS, RecLMISAuxiliary
from .base import register_network_builder, short_schedule
from .notes import NoteGuidedTrainer, token_dim

#: what the paper leaves open or where paper and code differ (README / METHODS.md), as settings:
#: - CVR reconstructs V' (the CI output, as the code does); CLR reconstructs the frozen token states;
#: - reconstruction MSE weighted by W (eq. 8 / 10) with W detached; CCL weights used once (the code softmaxes twice);
#: - 3 conditioned decoder layers (the paper's text; the QaTa code config uses 4), FFN 1024, 4 heads;
#: - image mask rate 0.5 (QaTa in the paper; 0.3 in the MosMed code config), text mask rate 0.3;
#: - CI as the paper writes it: V' attends to the text features E (eq. 1's counterpart, Sec. III-B1) and E' only
#:   feeds W_woi, so it is training-only (Sec. III-E keeps just the text-to-vision encoder at inference). The
#:   authors' code lets V' attend to E' instead ("text_ci", RecLMISTrainer_authorsCI), which leaves the note no
#:   direct path to the decoder and learns the referring task far more slowly (networks/reclmis.py).
OPEN_CHOICE_KEYS = ("num_heads", "dropout", "reconstructor_layers", "reconstructor_ffn", "image_mask_rate",
                    "text_mask_rate", "temperature", "ci_image_reads", "condition_placement", "use_ci", "conditions",
                    "mask_strategy", "ci_attention", "reconstruction_attention", "augmentation")
AUX_LOSSES = ("cvr", "clr", "ccl")


def paper_pipeline(nnunet_transforms):
    """nnU-Net's training transforms (a ComposeTransforms) with RecLMIS's augmentation: the spatial transform only
    crops (rotation and scaling probabilities 0), nnU-Net's random intensity transforms are replaced by the
    paper's; everything else (label removal, regions, deep-supervision targets) is kept in order."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    from ..data.augmentation import reclmis_paper_intensity_transforms

    intensity = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform, ContrastTransform,
                 SimulateLowResolutionTransform, GammaTransform)
    out, inserted = [], False
    for t in nnunet_transforms.transforms:
        if isinstance(t, RandomTransform) and isinstance(t.transform, intensity):
            continue
        out.append(t)
        if isinstance(t, SpatialTransform):
            t.p_rotation, t.p_scaling, t.p_elastic_deform = 0.0, 0.0, 0.0
            out += reclmis_paper_intensity_transforms()
            inserted = True
    if not inserted:
        raise RuntimeError("nnU-Net's training transforms have no SpatialTransform to follow: this nnU-Net version "
                           "builds its pipeline differently; use augmentation=nnunet")
    return ComposeTransforms(out)


def stage_strides(configuration_manager) -> list:
    kw = configuration_manager.network_arch_init_kwargs
    return [list(s) if isinstance(s, (list, tuple)) else s for s in kw["strides"]]


@register_network_builder("reclmis")
def build_reclmis_network(settings, backbone, plans_manager, configuration_manager, num_input_channels):
    """RecLMIS's own UNet (LViT-style, PLAM on the skips) with the configuration's widths, pooling and patch;
    nnU-Net's backbone only tells the number of output channels."""
    kw = configuration_manager.network_arch_init_kwargs
    num_classes = backbone.decoder.seg_layers[-1].out_channels
    net = RecLMIS(num_input_channels, num_classes, token_dim(settings), features=tuple(kw["features_per_stage"]),
                  strides=stage_strides(configuration_manager), patch_size=tuple(configuration_manager.patch_size),
                  num_heads=settings["num_heads"], dropout=settings["dropout"],
                  image_reads=settings.get("ci_image_reads", "text"), use_ci=settings.get("use_ci", True),
                  ci_attention=settings.get("ci_attention", "cross"))
    net.set_conditioner(NoteConditioner(settings["text_encoder"], settings["max_tokens"], token_dim(settings)))
    return net


class RecLMISTrainer(NoteGuidedTrainer):
    """RecLMIS: UNet + PLAM, note tokens -> CI, training-only CVR/CLR reconstructors and CCL (one note per image)."""
    textguided_method = "reclmis"

    paper_preset = "2d_reclmis_paper"
    paper_figures = {"inference params (M)": 23.7, "training params (M)": 74.2, "inference GFLOPs": 24.1}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # one output
        self.weights = self.textguided["loss_weights"]
        self._components: list[dict[str, float]] = []

    @classmethod
    def settings_for(cls, plans_manager, configuration_manager, settings, dataset_json=None) -> dict:
        s = settings
        weights = {"cvr": s.loss_cvr, "clr": s.loss_clr, "ccl": s.loss_ccl, "seg": s.loss_seg}
        return {**cls.note_settings(s), **{k: getattr(s, k) for k in OPEN_CHOICE_KEYS}, "loss_weights": weights}

    @classmethod
    def build_training_only_modules(cls, settings: dict, network: torch.nn.Module) -> torch.nn.Module | None:
        """The training-only modules, or None when every auxiliary loss is switched off (RecLMISTrainer_CI)."""
        if not any(settings["loss_weights"][k] for k in AUX_LOSSES):
            return None
        if not network.use_ci:
            raise ValueError("RecLMIS without CI (use_ci=false, Table III (e)) has no conditioned features for CVR, "
                             "CLR or CCL: set loss_cvr, loss_clr and loss_ccl to 0 (RecLMISTrainer_noCI does)")
        return RecLMISAuxiliary(network.bottleneck_channels, network.text_dim, num_heads=settings["num_heads"],
                                layers=settings["reconstructor_layers"], ffn_dim=settings["reconstructor_ffn"],
                                image_mask_rate=settings["image_mask_rate"], text_mask_rate=settings["text_mask_rate"],
                                temperature=settings["temperature"], dropout=settings["dropout"],
                                vision_to_text=not network.interaction.computes_text_ci,
                                condition_placement=settings.get("condition_placement", "logits"),
                                conditions=tuple(settings.get("conditions", AUX_LOSSES)),
                                mask_strategy=settings.get("mask_strategy", "interest"),
                                reconstruction_attention=settings.get("reconstruction_attention", "cross"))

    # -- nnU-Net hooks ------------------------------------------------------------------------------------
    def configure_optimizers(self):
        self.training_only = self.build_training_only_modules(self.textguided, self.bare_network())
        if self.training_only is not None:
            self.training_only = self.training_only.to(self.device)
            if self.is_ddp:
                # outside the network's DDP wrapper: rank 0's initial weights everywhere (what DDP does for the
                # network), BatchNorm synchronised on GPUs (as nnU-Net converts the network's); gradients are
                # averaged in the step (distributed.average_gradients)
                if self.device.type == "cuda":
                    self.training_only = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.training_only)
                broadcast_module(self.training_only)
        return super().configure_optimizers()  # Adam 3e-4 without weight decay, cosine: the settings' defaults

    def optimised_parameters(self):
        params = list(self.network.parameters())
        return params + (list(self.training_only.parameters()) if self.training_only is not None else [])

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # a single output

    # -- augmentation (setting ``augmentation``) ----------------------------------------------------------------
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy2d, initial, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if self.textguided.get("augmentation") == "paper":  # no spatial transform: crop the patch itself
            return (0.0, 0.0), dummy2d, tuple(self.configuration_manager.patch_size), mirror_axes
        return rotation, dummy2d, initial, mirror_axes

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's pipeline, or with ``augmentation="paper"`` the paper's: nnU-Net's crop without rotation or
        scaling, the blur / contrast / saturation / hue distortions of ``data.augmentation`` in place of nnU-Net's
        intensity transforms, then nnU-Net's label handling unchanged."""
        transforms = super().get_training_transforms(*args, **kwargs)
        if self.textguided.get("augmentation") != "paper":
            return transforms
        return paper_pipeline(transforms)

    def _average_training_only_gradients(self) -> None:
        """Under DDP the network's gradients are averaged by its wrapper; the training-only modules' here."""
        if self.is_ddp and self.training_only is not None:
            average_gradients(self.training_only.parameters())

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.training_only is not None:
            self.training_only.train()

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        if self.training_only is not None:
            self.training_only.eval()

    def _clip_gradients(self) -> None:
        # nnU-Net's clipping of the network at norm 12, and of the training-only modules on their own: a joint
        # norm would let the reconstructors' gradients shrink the segmentation network's steps
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        if self.training_only is not None:
            torch.nn.utils.clip_grad_norm_(self.training_only.parameters(), 12)

    def train_step(self, batch: dict) -> dict:
        with self.case_notes(batch["keys"]):
            return self._train_step(batch)

    def _train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = target[0] if isinstance(target, list) else target
        target = target.to(self.device, non_blocking=True)
        w = self.weights
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            logits, features = self.network(data, with_features=True)  # compiled / DDP-wrapped as nnU-Net built it
            seg = self.loss(logits, target)  # L_Dice + L_CE: nnU-Net's DC_and_CE_loss, both weights 1
            aux = {}
            if self.training_only is not None:
                aux = {k: v for k, v in self.training_only(features).items() if w[k]}
            total = reclmis_objective({"seg": seg, **aux}, w)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self._average_training_only_gradients()
            self.grad_scaler.unscale_(self.optimizer)
            self._clip_gradients()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            self._average_training_only_gradients()
            self._clip_gradients()
            self.optimizer.step()
        self._components.append({"seg": float(seg.detach()), **{k: float(v.detach()) for k, v in aux.items()}})
        return {"loss": total.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self._components:
            keys = self._components[0].keys()
            self.print_to_log_file("loss parts: " + ", ".join(
                f"{k} {np.mean([c[k] for c in self._components]):.4f}" for k in keys))
        self._components = []

class RecLMISTrainer_noCLR(RecLMISTrainer):
    """RecLMIS ablation, Table III (b): CI (with CCL) + CVR, no conditioned language reconstruction."""
    variant_settings = {"loss_clr": 0.0}


class RecLMISTrainer_noCVR(RecLMISTrainer):
    """RecLMIS ablation, Table III (c): CI (with CCL) + CLR, no conditioned vision reconstruction."""
    variant_settings = {"loss_cvr": 0.0}


class RecLMISTrainer_CI(RecLMISTrainer):
    """RecLMIS ablation, Table III (d): CI only — CVR and CLR off; CCL stays, as part of the CI module (Sec.
    III-B2 is a subsection of III-B, the conditioned interaction)."""
    variant_settings = {"loss_cvr": 0.0, "loss_clr": 0.0}


class RecLMISTrainer_noCI(RecLMISTrainer):
    """RecLMIS ablation, Table III (e): the baseline, UNet + PLAM without text (no CI, so no CCL, CVR or CLR).
    The note is still read by the conditioner (the same dataset and commands) but never reaches the network."""
    variant_settings = {"use_ci": False, "loss_cvr": 0.0, "loss_clr": 0.0, "loss_ccl": 0.0}


class RecLMISTrainer_authorsCI(RecLMISTrainer):
    """RecLMIS with CI as in the authors' code: V' attends to E' (the note after attending to the image)."""
    variant_settings = {"ci_image_reads": "text_ci"}


BASE_TRAINERS = [RecLMISTrainer, RecLMISTrainer_noCLR, RecLMISTrainer_noCVR, RecLMISTrainer_CI, RecLMISTrainer_noCI,
                 RecLMISTrainer_authorsCI]
# short schedules: _2epochs for smoke tests, _40epochs for the demo-size runs; _30epochs (30 x 50) for the
# text-dependence test on the synthetic referring dataset
SHORT_TRAINERS = [short_schedule(t, e, it, vit, mirror_axes=()) for t in BASE_TRAINERS
                  for e, it, vit in ((2, 4, 2), (40, 25, 4))]
ALL_TRAINERS = BASE_TRAINERS + SHORT_TRAINERS
globals().update({t.__name__: t for t in ALL_TRAINERS})
__all__ = [t.__name__ for t in ALL_TRAINERS]
