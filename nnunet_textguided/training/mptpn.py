"""MPTPN trainers (seed 003): a SimSiam-pretrained prior prompt encoder (stage 1) reused for note-guided 2D
segmentation with MSFF and UpAttention (stage 2).

| trainer                     | what it trains (paper Table 3)                                                 |
|-----------------------------|--------------------------------------------------------------------------------|
| MPTPNTrainer                | full model, PPE initialised from the stage-1 checkpoint (setting ``ppe_weights``) |
| MPTPNTrainer_noPretrain     | the same network from random initialisation (PPE* without stage 1)            |
| MPTPNTrainer_noDownViT      | no DownViT: patch embeddings only, the note does not enter (the authors' ablation) |
| MPTPNTrainer_noUpViT        | no UpViT: reconstruction from the DownViT outputs                               |
| MPTPNTrainer_noMSFF         | UpAttention on the PPE outputs directly                                         |
| MPTPNTrainer_noUpAttention  | MSFF outputs expanded to full size, concatenated, 1x1 head                      |

Two stages, two commands:

1. ``nnunet-textguided pretrain-ppe IMAGES_WITH_CAPTIONS_DIR -o ppe.pth`` (``training.ppe_pretrain``): SimSiam on
   image-caption pairs (COCO in the paper). Use the text encoder, ``--max-tokens`` and ``--base-channels`` of
   the stage-2 trainer (defaults: minilm, 10, 64 = the paper configuration's C).
2. ``nnunet-textguided add-config -d D 2d_mptpn_paper --set ppe_weights=ppe.pth``, then ``nnUNetv2_train D
   2d_mptpn_paper 0 -tr MPTPNTrainer``: when a new training is
   set up (``initialize``, before any data is read) the PPE's tensors (weights and BatchNorm statistics) are
   replaced by the stage-1 ones — the
   authors' released code loads the checkpoint and never applies it (and leaves the PPE out of the optimizer);
   here they initialise stage 2 and are fine-tuned with the rest. The checkpoint is checked against the trainer:
   same text encoder (spec and weights), max tokens, base channels and heads, else a clear error; another patch
   size or number of input channels is adapted (``networks.mptpn.adapt_ppe_state``, logged). The run records
   the checkpoint's path and sha256 in its plans; resuming (``--c``) and ``--val`` need neither (the run's
   checkpoint holds every weight), and prediction never reads it. ``-pretrained_weights`` replace the stage-1
   tensors they name (nnU-Net loads them after ``initialize``).

Network: ``networks.mptpn.MPTPN`` with C = ``features_per_stage[0]`` of the configuration (``2d_mptpn_paper``:
64 at 224 x 224; ``2d_tiny``: 8 at 64 x 64), 8 heads; patch sides must be multiples of 16. Notes: ``<CASE>.txt``
per image through the package's note store (``training.notes``), ``max_tokens`` 10 (the paper truncates to 10
BERT tokens); text encoder setting ``text_encoder`` (the paper's BERT-base, ``hf:bert-base-uncased``: a folder of that
name under the weights root, else the hub).

Loss: 0.5 WBCE + 0.5 WDice on the sigmoid of each foreground logit (``losses.mptpn``), no deep supervision.
Optimiser: Adam 1e-4 (the paper and code; settings ``optimizer``, ``lr``), no weight decay; schedule nnU-Net's poly
decay over nnU-Net's epochs (the paper states none; the code's warm restarts have eta_min = lr, a constant lr).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import settings as settings_schema
from ..conditioning.notes import NoteConditioner
from ..conditioning.store import file_sha256
from ..losses.mptpn import WeightedBCEDiceLoss
from ..networks.mptpn import MPTPN, PATCH_SIZES, adapt_ppe_state
from .base import register_network_builder, short_schedule
from .notes import NoteGuidedTrainer, token_dim

VARIANT_KEYS = ("down_vit", "up_vit", "msff", "up_attention")


class StageOneError(ValueError):
    """The stage-1 PPE checkpoint is missing or does not fit the trainer."""


@register_network_builder("mptpn")
def build_mptpn_network(settings, backbone, plans_manager, configuration_manager, num_input_channels):
    num_classes = backbone.decoder.seg_layers[-1].out_channels
    net = MPTPN(num_input_channels, num_classes, token_dim(settings), settings["max_tokens"],
                configuration_manager.patch_size, settings["base_channels"], settings["num_heads"],
                **settings["variant"])
    net.set_conditioner(NoteConditioner(settings["text_encoder"], settings["max_tokens"], token_dim(settings)))
    return net


class MPTPNTrainer(NoteGuidedTrainer):
    """MPTPN: stage-1 PPE (note tokens + image) -> MSFF -> UpAttention; one note per image."""
    textguided_method = "mptpn"
    configuration_hint = "2d, 2d_tiny, 2d_mptpn_paper"

    paper_preset = "2d_mptpn_paper"
    paper_figures: dict[str, float] = {}  # the paper reports no parameter count

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # one output

    @classmethod
    def check_configuration(cls, configuration_manager, configuration: str = "") -> None:
        super().check_configuration(configuration_manager, configuration)
        patch = list(configuration_manager.patch_size)
        if any(p % PATCH_SIZES[0] for p in patch):
            raise ValueError(f"MPTPN's PPE cuts patches into 16 x 16 tokens; configuration '{configuration}' has patch "
                             f"{patch}. Use a patch whose sides are multiples of 16 (2d_tiny, 2d_mptpn_paper)")

    @classmethod
    def settings_for(cls, plans_manager, configuration_manager, settings, dataset_json=None) -> dict:
        base = int(configuration_manager.network_arch_init_kwargs["features_per_stage"][0])
        if base % settings.num_heads:
            raise ValueError(f"MPTPN's PPE width C = features_per_stage[0] = {base} must be a multiple of its "
                             f"{settings.num_heads} attention heads (setting num_heads)")
        return {**cls.note_settings(settings), "base_channels": base, "num_heads": settings.num_heads,
                "variant": {k: getattr(settings, k) for k in VARIANT_KEYS}, "stage1": cls.stage1_reference(settings)}

    @staticmethod
    def stage1_reference(settings) -> dict | None:
        """{"path", "sha256"} of the stage-1 checkpoint of setting ``ppe_weights`` (path as stored: relative to the
        weights root when under it; None if unset or ``pretrained`` is false; sha256 None if the file is not
        here: only a fresh training needs it, and says so)."""
        if not settings.pretrained or not settings.ppe_weights:
            return None
        try:
            path = settings_schema.resolve_path(settings.ppe_weights, "stage-1 checkpoint")
        except settings_schema.SettingsError:
            path = None
        here = path is not None and path.is_file()
        return {"path": settings.ppe_weights, "sha256": file_sha256(path) if here else None}

    # -- stage 1 -> stage 2 ------------------------------------------------------------------------------
    def initialise_ppe_from_stage1(self) -> list[str]:
        """Replace the PPE's tensors by the stage-1 checkpoint's; returns what was adapted. Raises StageOneError
        (naming the checkpoint and the fix) when it is missing or was pretrained for another setting."""
        from .ppe_pretrain import load_ppe_checkpoint
        s, ref = self.textguided, self.textguided.get("stage1")
        if ref is None:
            raise StageOneError(
                f"{type(self).__name__} initialises its prompt encoder from MPTPN's stage 1 and no checkpoint is set: "
                f"run `nnunet-textguided pretrain-ppe IMAGES_WITH_CAPTIONS_DIR -o ppe.pth` (image-caption pairs, "
                f"--text-encoder {s['text_encoder']} --max-tokens {s['max_tokens']} --base-channels "
                f"{s['base_channels']}), then set it: nnunet-textguided add-config -d {self.plans_manager.dataset_name} "
                f"{self.configuration_name} --name NEW_CONFIGURATION --set ppe_weights=ppe.pth; or train "
                "MPTPNTrainer_noPretrain")
        path = str(settings_schema.resolve_path(ref["path"], "stage-1 checkpoint"))
        if ref["sha256"] is None or file_sha256(Path(path)) != ref["sha256"]:
            raise StageOneError(f"setting ppe_weights: {path}: " + (
                                "no such file" if ref["sha256"] is None else
                                "the file changed since this training was set up") + ". Pretrain the prompt "
                                f"encoder first (nnunet-textguided pretrain-ppe IMAGES_WITH_CAPTIONS_DIR -o {path}), "
                                "then start the training again")
        ckpt = load_ppe_checkpoint(path)
        cfg = ckpt["config"]
        encoder = s["encoders"][s["text_encoder"]]
        wanted = {"text_encoder": s["text_encoder"], "text_weight_hash": encoder.get("weight_hash"),
                  "max_tokens": s["max_tokens"], "base_channels": s["base_channels"], "num_heads": s["num_heads"]}
        flags = {"text_encoder": "--text-encoder", "text_weight_hash": "--text-encoder", "max_tokens": "--max-tokens",
                 "base_channels": "--base-channels", "num_heads": "--num-heads"}
        differ = [k for k, v in wanted.items() if cfg.get(k) != v]
        if differ:
            again = {flags[k]: s["text_encoder"] if k == "text_weight_hash" else wanted[k] for k in differ}
            raise StageOneError(
                f"{path} was pretrained for another setting: " + "; ".join(
                    f"{k} {cfg.get(k)!r} (trainer: {wanted[k]!r})" for k in differ)
                + ". Pretrain again with " + " ".join(f"{f} {v}" for f, v in again.items())
                + " (the text encoder's weights must be the same too), or give the trainer the checkpoint's "
                "settings (text_encoder, max_tokens, num_heads, the configuration's features_per_stage[0])")
        ppe = self.bare_network().ppe
        state, notes = adapt_ppe_state(ckpt["ppe"], cfg, ppe)
        ppe.load_state_dict(state, strict=True)
        last = ckpt["history"][-1] if ckpt.get("history") else {}
        self.print_to_log_file(
            f"stage 1: PPE initialised from {path} (sha256 {ref['sha256'][:12]}…, {ckpt['epoch']} SimSiam epochs on "
            f"{cfg['data']['images']} image-caption pairs, final loss {last.get('loss', float('nan')):.4f})"
            + "".join(f"; {n}" for n in notes))
        return notes

    # -- nnU-Net hooks ------------------------------------------------------------------------------------
    def _build_loss(self):
        if self.label_manager.has_regions:
            raise ValueError("MPTPN's sigmoid head predicts labels, not nnU-Net regions; use a dataset with labels")
        return WeightedBCEDiceLoss(ignore_label=self.label_manager.ignore_label)

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # a single output

    #: True while load_checkpoint runs (--c, --val): the run's weights then all come from its checkpoint
    _restoring = False

    def initialize(self):
        """nnU-Net's initialize, then stage 1 into the PPE — unless a checkpoint is being loaded. Runs before any
        data is touched, so a missing or unfit stage 1 stops the run at once. (``-pretrained_weights`` are
        loaded by nnU-Net after this and replace every tensor they name, the PPE's included.)"""
        super().initialize()
        if self._restoring:
            return
        if self.settings.pretrained:
            self.initialise_ppe_from_stage1()
        else:
            self.print_to_log_file("stage 1: none (MPTPNTrainer_noPretrain): the PPE starts from random weights")

    def load_checkpoint(self, filename_or_checkpoint):
        self._restoring = True
        try:
            super().load_checkpoint(filename_or_checkpoint)
        finally:
            self._restoring = False

    def reconcile_saved_settings(self, saved: dict) -> None:
        """A resumed run keeps the stage-1 reference it started from: its trained PPE is in the checkpoint, so
        setting ``ppe_weights`` may be unset, stale or name another file (which is then ignored, with a note)."""
        current, recorded = self.textguided.get("stage1"), saved.get("stage1")
        if current is not None and recorded is not None and current["sha256"] not in (None, recorded["sha256"]):
            self.print_to_log_file(f"note: ppe_weights={current['path']} is not the stage-1 checkpoint this run "
                                   f"started from ({recorded['path']}); resuming takes every weight from the run's "
                                   "checkpoint")
        self.textguided["stage1"] = recorded
        saved_settings = saved.get("settings", {})
        for k in ("ppe_weights",):  # only mattered when the run started
            if k in saved_settings:
                self.textguided["settings"][k] = saved_settings[k]

def _variant(name: str, doc: str, **changes) -> type:
    return type(name, (MPTPNTrainer,), {"variant_settings": changes, "__doc__": doc, "__module__": __name__})


class MPTPNTrainer_noPretrain(MPTPNTrainer):
    """MPTPN without stage 1: the PPE starts from random weights (Table 3, PPE* ✗)."""
    variant_settings = {"pretrained": False}


VARIANTS = [
    MPTPNTrainer_noPretrain,
    _variant("MPTPNTrainer_noDownViT", "MPTPN without DownViT (Table 3): patch embeddings only; the note does not "
             "enter (the authors' ablation).", down_vit=False),
    _variant("MPTPNTrainer_noUpViT", "MPTPN without UpViT (Table 3).", up_vit=False),
    _variant("MPTPNTrainer_noMSFF", "MPTPN without MSFF (Table 3): UpAttention on the PPE outputs.", msff=False),
    _variant("MPTPNTrainer_noUpAttention", "MPTPN without UpAttention (Table 3): MSFF outputs expanded and "
             "concatenated.", up_attention=False),
]
BASE_TRAINERS = [MPTPNTrainer] + VARIANTS
SHORT_TRAINERS = [short_schedule(t, e, it, vit, mirror_axes=()) for t in BASE_TRAINERS
                  for e, it, vit in ((2, 4, 2), (40, 25, 4))]
ALL_TRAINERS = BASE_TRAINERS + SHORT_TRAINERS
globals().update({t.__name__: t for t in ALL_TRAINERS})
__all__ = [t.__name__ for t in ALL_TRAINERS]
