"""TGC-Net trainers (seed 001): frozen CLIP towers + SSE, DATE, VLCM and a cost-aggregating decoder (2D, notes).

| trainer                          | variant (paper table)                                                     |
|----------------------------------|---------------------------------------------------------------------------|
| TGCNetTrainer                    | full model: SSE + DATE + VLCM (Table 3 a)                                 |
| TGCNetTrainer_noSSE              | CLIP ViT only, no CNN branch / deformable attention (3 b; 4 "ViT-only")   |
| TGCNetTrainer_noDATE             | primary note only (3 d; 5 "Main Text Only"): auxiliary notes not read    |
| TGCNetTrainer_noVLCM             | no alignment module (3 c; 6 "No Prior Alignment")                         |
| TGCNetTrainer_none               | none of the three (3 e)                                                   |
| TGCNetTrainer_CNNonly            | no CLIP image tower (4 "CNN-only"): none loaded or needed at prediction  |
| TGCNetTrainer_auxOnly            | auxiliary note only (5 "Auxiliary Text Only"; no aux dropout)            |
| TGCNetTrainer_singleCA           | one cross-attention, image -> text, instead of VLCM (6)                   |
| TGCNetTrainer_biCA               | bidirectional cross-attention instead of VLCM (6)                         |

Network: ``networks.tgcnet.TGCNet``. Notes: ``<CASE>.txt`` and the optional auxiliary note ``<CASE>.aux.txt``
(the paper generates it with an LLM offline; no LLM is reachable here, so users write or generate the sidecars)
encoded by the frozen text tower into the embedding store (``training.notes``). The frozen CLIP image tower runs
on each patch inside forward. Encoders (settings ``text_encoder``, ``image_encoder``): the paper's CLIP ViT-L/14@336,
both towers of one model; the ablations fix ``sse`` / ``text`` / ``alignment`` (``settings.TGCNetSettings``).

Widths come from the configuration (choice; the paper gives only the 10.3 M total): the CNN branch takes the
first five ``features_per_stage`` (``2d_tgcnet_paper``: 32..256), d_model = the last of them, capped at 256 (the
Deformable-DETR width); the decoder scales CAT-Seg's ViT-L widths with d_model (at 256: hidden 128, decoder 64 /
32, upsampling guidance 32 / 16) and keeps its appearance and text guidance projections at 128; two deformable encoder layers (Deformable-DETR
has six): with them the paper configuration has 10.04 M trainable parameters (paper: 10.3 M; three layers
would give 10.77 M). The 0.26 M is not a missing module: the paper counts the same set ("training only lightweight
modules, including the SSE, DATE, and VLCM, together with the decoder", §4.4.5) and gives none of their widths;
single open choices move the total by more than the gap (the deformable layers' FFN at 1280 instead of 1024:
10.30 M; the decoder's prompt axis P = 1 as CAT-Seg's ViT-L config instead of 77: -0.48 M). The CNN branch sees the patch resized to ``cnn_input_size`` (a setting; ``2d_tgcnet_paper``:
768 for 224 patches) or, by default, to 768/224 x the patch rounded up to a multiple of 32.

Training (the paper: batch 8, lr 2e-5 QaTa / 5e-4 MosMed / 2e-4 CT, optimiser and schedule unstated): AdamW
(CAT-Seg's) with weight decay 1e-4, lr 2e-4 (setting ``lr``), nnU-Net's poly schedule and epochs; loss
nnU-Net's Dice + CE on the background-fixed logits (= Dice + BCE for one class); no deep supervision; auxiliary
notes dropped for 10 % of the training samples (``aux_dropout``) so the primary-note-only rule is learnt.
"""
from __future__ import annotations

import math

import torch

from ..conditioning.dense import NoteImageConditioner
from ..conditioning.notes import NoteConditioner
from ..conditioning.slices import get_encoder, window_from_plans
from ..networks.tgcnet import TGCNet
from .base import register_network_builder, short_schedule
from .notes import NoteGuidedTrainer, token_dim

#: the paper's resize of QaTa's 224 x 224 images for the CNN branch (768) — the default ratio
CNN_INPUT_RATIO = 768 / 224
MAX_D_MODEL = 256


def image_geometry(settings: dict) -> tuple[int, int]:
    """(embed dim E, token grid g) of the CLIP image tower's dense tokens."""
    spec = settings["image_encoder"]
    unusable = ValueError(f"image encoder {spec!r} gives no dense patch tokens; TGC-Net needs a plain CLIP ViT image "
                          "tower: set image_encoder (nnunet-textguided add-config ... --set image_encoder=SPEC) to "
                          "e.g. 'openclip:ViT-L-14-336@openai', 'openclip:local-dir:<dir>' or 'tiny-clip'")
    if torch.get_default_device().type == "meta":  # counting: no encoder is loaded
        rec = settings["encoders"][spec]
        if not rec.get("patch_size"):
            raise unusable
        return int(rec["embed_dim"]), int(rec["image_size"]) // int(rec["patch_size"])
    enc = get_encoder(spec)
    if not getattr(enc, "supports_dense_tokens", False):
        raise unusable
    return int(enc.embed_dim), int(enc.image_size) // int(enc.patch_size)


@register_network_builder("tgcnet")
def build_tgcnet_network(settings, backbone, plans_manager, configuration_manager, num_input_channels):
    num_classes = backbone.decoder.seg_layers[-1].out_channels
    uses_clip = settings["image_encoder"] is not None
    clip_dim, grid = image_geometry(settings) if uses_clip else (0, 0)
    w, d = settings["widths"], settings["widths"]["d_model"]
    net = TGCNet(num_input_channels, num_classes, token_dim(settings), clip_dim, settings["max_tokens"],
                 configuration_manager.patch_size, settings["cnn_input"], w["cnn_features"], d,
                 msda_layers=w["msda_layers"], msda_ffn=4 * d, hidden=d // 2, decoder_dims=(d // 4, d // 8),
                 guidance_dims=(d // 8, d // 16), **settings["variant"])
    notes = (settings["text_encoder"], settings["max_tokens"], token_dim(settings))
    aux = bool(settings.get("aux_notes"))
    net.set_conditioner(NoteImageConditioner(*notes, settings["image_encoder"], settings["render_window"], grid,
                                             aux=aux) if uses_clip else NoteConditioner(*notes, aux=aux))
    return net


class TGCNetTrainer(NoteGuidedTrainer):
    """TGC-Net: frozen CLIP ViT + CNN (SSE), note + auxiliary note (DATE), VLCM, cost-aggregating decoder."""
    textguided_method = "tgcnet"
    configuration_hint = "2d, 2d_tiny, 2d_tgcnet_paper"

    paper_preset = "2d_tgcnet_paper"
    paper_figures = {"trainable params (M)": 10.3}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # one output

    @classmethod
    def reads_aux_notes(cls, settings) -> bool:
        return settings.text != "main"

    @classmethod
    def settings_for(cls, plans_manager, configuration_manager, settings, dataset_json=None) -> dict:
        st = settings
        s = cls.note_settings(st)
        image = None
        if st.sse != "cnn":  # CNN-only: no image tower is loaded, run or required at prediction
            image = st.image_encoder
            if image != st.text_encoder and not st.unaligned_towers:
                from ..settings import SettingsError
                raise SettingsError(
                    f"TGC-Net's text and image towers must be one CLIP model's (its cost volume compares them in "
                    f"CLIP's joint space): text_encoder is {st.text_encoder!r}, image_encoder {image!r}. Set both to "
                    "the same spec (the paper: openclip:ViT-L-14-336@openai), or --set unaligned_towers=true for "
                    "stand-ins and experiments")
            if image in s["encoders"]:
                s["encoder_use"][image] = {"role": "case notes + image tokens", "towers": ["text", "image"]}
            else:
                s["encoders"][image] = {}
                s["encoder_use"][image] = {"role": "image tokens", "towers": ["image"]}
        features = [int(f) for f in configuration_manager.network_arch_init_kwargs["features_per_stage"]]
        if len(features) < 5:
            raise ValueError(f"TGC-Net's CNN branch has five stages; this configuration has {len(features)} "
                             f"features_per_stage {features}. Train 2d (nnU-Net's), or add a preset: "
                             "nnunet-textguided add-config -d <ID> 2d_tgcnet_paper (or 2d_tiny)")
        patch = list(configuration_manager.patch_size)
        cnn_input = st.cnn_input_size or [32 * math.ceil(p * CNN_INPUT_RATIO / 32) for p in patch]
        widths = {"cnn_features": features[:5], "d_model": min(features[4], MAX_D_MODEL),
                  "msda_layers": st.msda_layers}
        # a variant reading no auxiliary note drops none; aux-only must not drop the only note it reads
        aux_dropout = st.aux_dropout if st.text == "date" else 0.0
        return {**s, "image_encoder": image, "variant": {"sse": st.sse, "text": st.text, "alignment": st.alignment},
                "aux_dropout": aux_dropout, "cnn_input": [int(c) for c in cnn_input], "widths": widths,
                "render_window": list(window_from_plans(plans_manager.plans, configuration_manager.configuration))}

    # -- nnU-Net hooks ------------------------------------------------------------------------------------
    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # a single output

    def _register_notes(self) -> None:
        super()._register_notes()
        if self.textguided.get("aux_notes"):
            n = sum(bool(mask[self.textguided["max_tokens"]:].any()) for _, mask in self._notes.values())
            self.print_to_log_file(f"auxiliary notes: {n} of {len(self._notes)} training cases have <CASE>.aux.txt")
            if n == 0:
                self.print_to_log_file(
                    f"WARNING: no training case has an auxiliary note ({self.notes_folder()}/<CASE>.aux.txt): "
                    "DATE's cross-attention is not trained, and auxiliary notes given at prediction would pass "
                    "through it untrained. Add the sidecars, or train TGCNetTrainer_noDATE (primary notes only).")

    def augment_notes(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop each sample's auxiliary note with probability ``aux_dropout`` (its half of the tokens)."""
        p = float(self.textguided["aux_dropout"])
        if p <= 0 or not self.textguided.get("aux_notes"):
            return tokens, mask
        n = tokens.shape[1] // 2
        keep = torch.rand(tokens.shape[0], device=tokens.device) >= p
        tokens, mask = tokens.clone(), mask.clone()
        tokens[~keep, n:] = 0
        mask[~keep, n:] = False
        return tokens, mask


def _variant(name: str, doc: str, **changes) -> type:
    return type(name, (TGCNetTrainer,), {"variant_settings": changes, "__doc__": doc, "__module__": __name__})


VARIANTS = [
    _variant("TGCNetTrainer_noSSE", "TGC-Net without SSE: CLIP ViT tokens only (Table 3 b, Table 4 ViT-only).",
             sse="vit"),
    _variant("TGCNetTrainer_noDATE", "TGC-Net without DATE: the primary note only (Table 3 d, Table 5).",
             text="main"),
    _variant("TGCNetTrainer_noVLCM", "TGC-Net without VLCM: no alignment (Table 3 c, Table 6).", alignment="none"),
    _variant("TGCNetTrainer_none", "TGC-Net without SSE, DATE and VLCM (Table 3 e).", sse="vit", text="main",
             alignment="none"),
    _variant("TGCNetTrainer_CNNonly", "TGC-Net without the CLIP image tower (Table 4 CNN-only).", sse="cnn"),
    _variant("TGCNetTrainer_auxOnly", "TGC-Net reading the auxiliary note only (Table 5).", text="aux"),
    _variant("TGCNetTrainer_singleCA", "TGC-Net with one cross-attention (image -> text) instead of VLCM (Table 6).",
             alignment="single"),
    _variant("TGCNetTrainer_biCA", "TGC-Net with bidirectional cross-attention instead of VLCM (Table 6).",
             alignment="bidirectional"),
]
BASE_TRAINERS = [TGCNetTrainer] + VARIANTS
SHORT_TRAINERS = [short_schedule(t, e, it, vit, mirror_axes=()) for t in BASE_TRAINERS
                  for e, it, vit in ((2, 4, 2), (40, 25, 4))]
ALL_TRAINERS = BASE_TRAINERS + SHORT_TRAINERS
globals().update({t.__name__: t for t in ALL_TRAINERS})
__all__ = [t.__name__ for t in ALL_TRAINERS]
