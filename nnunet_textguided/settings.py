"""Method settings as data: one typed schema per method, kept in nnU-Net's plans.

How a setting travels::

    nnunet-textguided add-config -d D PRESET --name C --set KEY=VALUE      (or --settings FILE, JSON / YAML)
      -> nnUNetPlans.json: configurations[C]["textguided"][method][KEY] = VALUE
      -> nnUNetv2_train D C F -tr Trainer: the trainer resolves its settings (schema default < trainer variant <
         configuration), writes the resolved block into the run's plans (configurations[C]["textguided"] =
         {"method", "settings", encoder records, derived values})
      -> nnU-Net copies that plans.json into the model folder (and into every checkpoint)
      -> the network builder, nnUNetv2_predict(_textguided) and `nnunet-textguided info` read it from there.

Every key of every method is declared once below (type, range, meaning, the paper's value and where the paper
gives it). A trainer variant (an ablation, a short schedule) only changes defaults (``variant_settings`` on the
trainer class); a configuration that sets such a key to another value is refused, since the results folder would
carry the variant's name for another model.

Environment variables give locations only, in the manner of ``nnUNet_results``: ``nnUNet_textguided_weights``
is the root under which encoder weights and start weights are found (relative paths in settings are relative to
it, so a model folder copied to another machine finds its weights under that machine's root). This is the only
module that reads ``nnUNet_textguided_*`` variables; the variables that used to choose model settings stop every
command with the ``--set`` line that replaces them.

This module imports nothing from the rest of the package (the encoders and every layer above read it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .io import read_json_or_yaml

#: the weights root: encoder weights and start weights named by relative paths live under it
WEIGHTS_ROOT_VARIABLE = "nnUNet_textguided_weights"
ENV_PREFIX = "nnUNet_textguided_"
#: variables of earlier versions that chose model settings -> the keys that replace them
LEGACY_VARIABLES: dict[str, tuple[str, ...]] = {
    "nnUNet_textguided_image_encoder": ("image_encoder",),
    "nnUNet_textguided_caption_encoder": ("caption_encoder",),
    "nnUNet_textguided_text_encoder": ("text_encoder",),
    "nnUNet_textguided_dino_encoder": ("dino_encoder",),
    "nnUNet_textguided_max_tokens": ("max_tokens",),
    "nnUNet_textguided_epochs": ("epochs",),
    "nnUNet_textguided_lr": ("lr",),
    "nnUNet_textguided_seed": ("seed",),
    "nnUNet_textguided_nnformer_weights": ("nnformer_weights",),
    "nnUNet_textguided_nnformer_weights_trusted": ("nnformer_weights_trusted",),
    "nnUNet_textguided_ppe": ("ppe_weights",),
    "nnUNet_textguided_loss_weights": ("loss_cvr", "loss_clr", "loss_ccl", "loss_seg"),
}


class SettingsError(ValueError):
    """Settings that cannot be used: unknown key, wrong type, out of range, a key of another method, a conflict
    with the trainer variant, or a legacy environment variable. The message names the valid keys or the fix."""


# -- environment: locations only ------------------------------------------------------------------------------
def weights_root() -> Path | None:
    """``$nnUNet_textguided_weights`` (None if unset)."""
    value = os.environ.get(WEIGHTS_ROOT_VARIABLE)
    return Path(value).expanduser() if value else None


def resolve_path(path: str, what: str = "file") -> Path:
    """A stored location -> an absolute path: absolute (or ``~``) paths as they are, relative ones under the
    weights root. SettingsError when a relative path is given and the root is not set."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    root = weights_root()
    if root is None:
        raise SettingsError(f"the {what} {path!r} is relative to the weights root, but {WEIGHTS_ROOT_VARIABLE} is "
                            f"not set: export {WEIGHTS_ROOT_VARIABLE}=/folder/holding/your/weights (like "
                            "nnUNet_results), so that it names <root>/" + path)
    return (root / p).absolute()


def portable_path(path: str) -> str:
    """A location as the user typed it -> as it is stored: a path to an existing file relative to the current
    folder, ``./``, ``../`` or ``~`` is made absolute; an absolute path under the weights root is stored relative
    to it (portable: another machine's root replaces this one's); any other relative path already is."""
    p = Path(path).expanduser()
    root = weights_root()
    if not p.is_absolute():
        in_root = root is not None and (root / p).exists()
        if not (path.startswith(("./", "../")) or (p.exists() and not in_root)):
            return p.as_posix()
        p = p.absolute()
    if root is not None:
        try:
            return p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return str(p)


def check_environment(command: str = "this command") -> None:
    """Refuse the variables that used to choose model settings (SettingsError with the ``--set`` line)."""
    found = {name: os.environ[name] for name in LEGACY_VARIABLES if os.environ.get(name)}
    if not found:
        return
    sets = []
    for name, value in found.items():
        keys = LEGACY_VARIABLES[name]
        values = value.split(",") if len(keys) > 1 else [value]
        if len(values) != len(keys):
            values = ["VALUE"] * len(keys)
        sets += [f"{k}={_shell(v)}" for k, v in zip(keys, values)]
    raise SettingsError(
        f"{', '.join(found)} {'is' if len(found) == 1 else 'are'} set, but model settings are no longer read from "
        f"environment variables ({command} would otherwise train or predict another model than the plans "
        f"describe). Unset {'it' if len(found) == 1 else 'them'} and write the setting into a configuration: "
        f"nnunet-textguided add-config -d DATASET PRESET --name CONFIGURATION --set {' '.join(sets)} "
        f"(then train that configuration; only {WEIGHTS_ROOT_VARIABLE}, a location, is read from the environment)")


def _shell(value: str) -> str:
    return value if all(c.isalnum() or c in "@:/._-,=+" for c in value) else "'" + value.replace("'", "'\\''") + "'"


# -- the schema -------------------------------------------------------------------------------------------------
def key(default: Any, meaning: str, paper: str = "silent", where: str = "", *, minimum: float | None = None,
        maximum: float | None = None, above: float | None = None, kind: str = "", ours: str = "") -> Any:
    """A documented setting: ``paper`` is the paper's value ("silent" if it states none), ``where`` the place in
    the paper (the sentence that leaves it open when silent), ``ours`` why the default differs, if it does.
    ``kind`` "encoder" (an encoder spec) or "path" (a weights file under the weights root)."""
    return field(default=default, metadata={"meaning": meaning, "paper": paper, "where": where, "minimum": minimum,
                                            "maximum": maximum, "above": above, "kind": kind, "ours": ours})


NNUNET = "nnU-Net's default"


@dataclass(frozen=True)
class CommonSettings:
    """Keys of every method: schedule, optimiser, mirroring, seed."""

    method: typing.ClassVar[str] = ""
    epochs: int = key(1000, "training epochs (of iterations_per_epoch iterations each)", minimum=1)
    iterations_per_epoch: int = key(250, "training iterations per epoch", NNUNET, minimum=1)
    val_iterations_per_epoch: int = key(50, "validation iterations per epoch (pseudo Dice)", NNUNET, minimum=1)
    optimizer: Literal["sgd", "adam", "adamw"] = key(
        "sgd", "sgd: SGD with Nesterov momentum (nnU-Net's); adam / adamw: torch's Adam / AdamW")
    lr: float = key(1e-2, "initial learning rate", above=0)
    momentum: float = key(0.99, "SGD momentum, or Adam's beta1", minimum=0, maximum=0.9999)
    weight_decay: float = key(3e-5, "weight decay (L2 for sgd / adam, decoupled for adamw)", minimum=0)
    lr_schedule: Literal["poly", "cosine"] = key(
        "poly", "poly: nnU-Net's (1 - epoch / epochs)^0.9; cosine: cosine annealing to 0 over the epochs")
    warmup_epochs: int = key(0, "epochs of linear warm-up from 0 to lr before the schedule", minimum=0)
    mirror_axes: tuple[int, ...] | None = key(
        None, "axes mirrored in training augmentation and at test time (none: nnU-Net's choice for the patch)",
        NNUNET)
    seed: int | None = key(None, "seed of weights, patch sampling and augmentation (exact with nnUNet_n_proc_DA=0); "
                           "none: nnU-Net's unseeded runs", "silent", "no paper states a seed", minimum=0)


BICLIP = "seed 000 (BiCLIP)"
BICLIP_IMPL = f"{BICLIP} §4.2 Implementation Details"


@dataclass(frozen=True)
class BiCLIPSettings(CommonSettings):
    method: typing.ClassVar[str] = "biclip"
    image_encoder: str = key("pmcclip:pmc-clip/image_encoder(resnet50).pth",
                             "encoder of the image stream (one embedding per axial slice)",
                             "PMC-CLIP's image encoder, 768-d (its architecture is not named: the PMC-OA release's "
                             "ResNet-50 tower)", f"{BICLIP} §3.1 3D CLIP Adapter", kind="encoder")
    caption_encoder: str = key("coca:coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k",
                               "captioner of the caption stream (text embedding of each slice's generated caption)",
                               "CoCa-CLIP, 768-d (model and weights not named: open_clip's 768-d CoCa ViT-L/14)",
                               f"{BICLIP} §1, §3.1", kind="encoder")
    streams: tuple[Literal["image", "caption"], ...] = key(
        ("image", "caption"), "embedding streams fused at the bottleneck: image (Net2), caption (Net3), both "
        "(Net4), none (Net1: the backbone alone)", "both (Net4)", f"{BICLIP} §4.4 Ablation")
    mode: Literal["online", "offline"] = key(
        "offline", "offline: embeddings of every full slice computed once per case into the store (training) or "
        "per test case (nnUNetv2_predict_textguided); online: the slices of each input patch embedded inside forward "
        "(the *_online trainers: beyond the paper)", "offline (\"the extraction of CLIP embeddings is performed "
        "offline\")", f"{BICLIP} Abstract, §3.1")
    ct_window_hu: tuple[float, float] = key(
        (-175.0, 250.0), "CT intensity window (HU) mapped to [0, 1] before a slice is replicated to 3 channels for the "
        "encoders (CT datasets; other modalities use z-score units [-2.5, 2.5])", "silent",
        f"{BICLIP} §3.1: \"we separate a scan to D slices along the depth dimension and replicate each slice three "
        "times\", no intensity mapping named", ours="the abdominal window W425/L37.5, i.e. [-175, 250] HU (CDPDNet's)")
    num_attention_blocks: int = key(2, "fused global self-attention layers after the bottleneck", "2, each built "
                                    "like nnFormer's last bottleneck layer and starting from its weights",
                                    f"{BICLIP} §3.2 Feature Fusion", minimum=1)
    combine: Literal["sum", "mean"] = key("sum", "how the two streams' CLIP maps are combined pixel-wise", "silent",
                                          f"{BICLIP} §3.2: the maps \"are combined at the pixel level\", no "
                                          "operation named")
    fusion_hidden: int | None = key(None, "hidden width of the fusion MLP (none: the bottleneck width C)", "silent",
                                    f"{BICLIP} §3.2: \"concatenated and fed into an MLP\", no width given",
                                    minimum=1)
    nnformer_weights: str | None = key(
        None, "nnFormer checkpoint the backbone starts from (nnFormer configurations); none: random initialisation",
        "nnFormer's pretrained weights", f"{BICLIP_IMPL}: \"initialized using the provided pre-trained "
        "configurations of nnFormer\"", kind="path",
        ours="none: the weights cannot be fetched by the package; give the local file")
    nnformer_weights_trusted: bool = key(False, "load nnformer_weights with full unpickling (nnFormer's own .model "
                                         "files pickle numpy objects): only for files you trust", "—", "")
    epochs: int = key(500, "training epochs", "500 (\"capped the maximum number of epochs ... at 500\")",
                      BICLIP_IMPL, minimum=1)
    optimizer: Literal["sgd", "adam", "adamw"] = key("sgd", "optimiser", "SGD", BICLIP_IMPL)
    lr: float = key(1e-2, "initial learning rate", "0.01", BICLIP_IMPL, above=0)
    momentum: float = key(0.99, "SGD momentum (Nesterov, nnFormer's)", "0.99", BICLIP_IMPL, minimum=0,
                          maximum=0.9999)
    weight_decay: float = key(3e-5, "weight decay", "3e-5", BICLIP_IMPL, minimum=0)
    lr_schedule: Literal["poly", "cosine"] = key(
        "poly", "learning-rate schedule", "silent", f"{BICLIP_IMPL}: \"The other hyperparameters remain consistent "
        "with those used in nnFormer\" (nnFormer: poly)")


CDPDNET = "seed 002 (CDPDNet)"
CDPDNET_IMPL = f"{CDPDNET} §IV-A2 Implementation Details"
#: the authors' released code
CDPDNET_CODE = "wujiong-hub/CDPDNet"


@dataclass(frozen=True)
class CDPDNetSettings(CommonSettings):
    method: typing.ClassVar[str] = "cdpdnet"
    text_encoder: str = key("openclip:ViT-B-32@openai", "text tower embedding the label and task prompts",
                            "CLIP ViT-B/32 text encoder", f"{CDPDNET} §III-C4", kind="encoder")
    dino_encoder: str = key("hf:facebook/dinov2-base", "frozen vision transformer of the dense slice features",
                            "DINOv2, last four layers (variant not named; the authors' code: dinov2-base)",
                            f"{CDPDNET} §III-C1", kind="encoder")
    use_alignment: bool = key(True, "CLIP-EVA: FiLM alignment of the features with the label prompts", "on",
                              f"{CDPDNET} Table V")
    use_dino: bool = key(True, "DINOv2 dense feature enhancement", "on", f"{CDPDNET} Table V")
    use_ttpg: bool = key(True, "text-guided task prompt generation", "on", f"{CDPDNET} Table V")
    dino_image_size: int = key(98, "side DINOv2 sees each slice resized to (a multiple of its patch)", "silent",
                               f"{CDPDNET} §III-C1: slices \"repeated three times\", no input size (the code: 98)",
                               minimum=14)
    dino_normalize: bool = key(False, "ImageNet mean/std normalisation of the DINOv2 input", "silent",
                               f"{CDPDNET} §III-C1: no normalisation is mentioned (the code: none)")
    slice_pool: int = key(14, "slices pooled into one along the slice axis before fusion", "silent",
                          f"{CDPDNET} §III-C1 (the code: 14)", minimum=1)
    text_dim: int = key(256, "width of the projected text features", "silent", f"{CDPDNET} §III-C4 (the code: 256)",
                        minimum=1)
    fusion_window: tuple[int, int, int] = key((3, 3, 3), "window of the DINOv2-CNN fusion attention", "silent",
                                              f"{CDPDNET} §III-C3 (the code: 3^3)", minimum=1)
    fusion_heads: int = key(4, "heads of the fusion attention", "silent", f"{CDPDNET} §III-C3 (the code: 4)",
                            minimum=1)
    fusion_depth: int = key(2, "fusion blocks per fused stage (regular + shifted windows)", "silent",
                            f"{CDPDNET} §III-C3 (the code: 2)", minimum=1)
    identity_init: bool = key(True, "FiLM starts at gamma ~ 1 and the fusion branches at zero", "silent",
                              f"{CDPDNET} §III: no initialisation is given",
                              ours="with the authors' initialisation small organs start learning 3x later")
    oversample_foreground: float = key(0.66, "share of patches centred on annotated foreground (per sample, at "
                                       "random)", "silent", f"{CDPDNET_IMPL}: patches drawn per dataset \"with equal "
                                       "probability\", foreground share not given", minimum=0, maximum=1)
    balanced_sampling: bool = key(True, "draw each training patch's source dataset with equal probability, then a "
                                  "case of it uniformly (else nnU-Net's uniform draw over cases)",
                                  "on: \"a uniform sampling strategy was utilized to extract patches from each "
                                  "dataset with equal probability\"", CDPDNET_IMPL)
    epochs: int = key(1000, "training epochs", "silent (only the 50 warm-up epochs; the code: 1000, "
                      f"{CDPDNET_CODE} train.py, --max_epoch)", CDPDNET_IMPL,
                      minimum=1)
    optimizer: Literal["sgd", "adam", "adamw"] = key("adamw", "optimiser", "AdamW", CDPDNET_IMPL)
    lr: float = key(4e-4, "initial learning rate", "lost in the seed text (\"an initial learning rate of ,\"); the "
                    f"code: 4e-4 ({CDPDNET_CODE} train.py, --lr)", CDPDNET_IMPL, above=0)
    momentum: float = key(0.9, "AdamW's beta1 (beta2 0.999)", "0.9", CDPDNET_IMPL, minimum=0, maximum=0.9999)
    weight_decay: float = key(1e-5, "decoupled weight decay", "lost in the seed text (\"a weight decay of ,\"); the "
                              f"code: 1e-5 ({CDPDNET_CODE} train.py, --weight_decay)", CDPDNET_IMPL, minimum=0)
    lr_schedule: Literal["poly", "cosine"] = key("cosine", "schedule after the warm-up", "cosine annealing",
                                                 CDPDNET_IMPL)
    warmup_epochs: int = key(50, "epochs of linear warm-up to lr (epoch e runs at lr (e + 1) / 50)", "50",
                             CDPDNET_IMPL, minimum=0)


@dataclass(frozen=True)
class NoteSettings(CommonSettings):
    """Keys of the note-guided 2D methods."""
    text_encoder: str = key("minilm", "text tower encoding each case's note into token states", kind="encoder")
    max_tokens: int = key(18, "tokens of a note that are read (longer notes are cut, with a warning)", minimum=2)
    mirror_axes: tuple[int, ...] | None = key(
        (), "axes mirrored in training and at test time: none, since notes name sides (\"left lung\")", "silent",
        "no note-guided seed mirrors its images", ours="mirroring would make a note's side wrong")


RECLMIS = "seed 004 (RecLMIS)"
RECLMIS_IMPL = f"{RECLMIS} §IV-B Implementation Details"


@dataclass(frozen=True)
class RecLMISSettings(NoteSettings):
    method: typing.ClassVar[str] = "reclmis"
    text_encoder: str = key("openclip:ViT-B-32@openai", "text tower encoding each note into token states",
                            "BPE tokens + a 12-layer transformer (CLIP's text transformer; the code: CLIP ViT-B/32)",
                            f"{RECLMIS} §III-A Feature Encoder", kind="encoder")
    max_tokens: int = key(18, "note tokens read", "silent (the code: 18 for QaTa-COV19 / MosMedData+, 10 for "
                          "MoNuSeg)", f"{RECLMIS} §III-A: \"L is the number of tokens\"", minimum=2)
    loss_clr: float = key(1.0, "weight of the language reconstruction loss (vision to text, L_V2T)", "λ1 = 1",
                          f"{RECLMIS_IMPL}, Eq. 11", minimum=0)
    loss_cvr: float = key(1.0, "weight of the vision reconstruction loss (text to vision, L_T2V)", "λ2 = 1",
                          f"{RECLMIS_IMPL}, Eq. 11", minimum=0)
    loss_ccl: float = key(0.2, "weight of the conditioned contrastive loss", "λ3 = 0.2", f"{RECLMIS_IMPL}, Eq. 11",
                          minimum=0)
    loss_seg: float = key(5.0, "weight of the segmentation loss (Dice + CE)", "λ4 = 5", f"{RECLMIS_IMPL}, Eq. 11",
                          minimum=0)
    ci_image_reads: Literal["text", "text_ci"] = key(
        "text", "what the image attends to in CI: the note tokens (the paper's equations) or the text after its "
        "own interaction (the authors' code)", "text", f"{RECLMIS} §III-B1 Conditioned Interaction")
    use_ci: bool = key(True, "the conditioned interaction (false: Table III (e), UNet + PLAM without text)", "CI",
                       f"{RECLMIS} Table III")
    conditions: tuple[Literal["ccl", "clr", "cvr"], ...] = key(
        ("ccl", "clr", "cvr"), "modules that use the interest weights W_poi / W_woi (a module left out uses "
        "uniform weights)", "all three", f"{RECLMIS} Table IV, §IV-D2")
    ci_attention: Literal["cross", "self"] = key(
        "cross", "CI's attention: cross-attention (image queries, text keys) or one self-attention over the "
        "concatenated image and text tokens", "cross", f"{RECLMIS} Table V, §IV-D5")
    reconstruction_attention: Literal["cross", "self"] = key(
        "cross", "CVR / CLR attention: cross-attention to the other modality, or one self-attention reconstructor "
        "(masked image and text tokens as queries, both unmasked as keys and values)", "cross",
        f"{RECLMIS} Table V, §IV-D5")
    mask_strategy: Literal["interest", "random"] = key(
        "interest", "how masked patches / words are drawn: with probabilities W (interest) or uniformly (random)",
        "interest", f"{RECLMIS} §III-C, §IV-D3, Fig. 7")
    augmentation: Literal["paper", "nnunet"] = key(
        "paper", "training augmentation: the paper's Gaussian blur, contrast, saturation and hue distortions (the "
        "authors' ranges; no spatial transform) or nnU-Net's pipeline (as every note-guided trainer: no mirroring, "
        "rotations within ±15°)", "blur, contrast, saturation, hue", f"{RECLMIS_IMPL}")
    condition_placement: Literal["logits", "probabilities"] = key(
        "logits", "where the condition W enters the reconstructors' attention: on the logits inside the softmax (the "
        "paper's equations) or on the attention probabilities, renormalised (the authors' code, gauss_weight)",
        "softmax((Q K^T / sqrt(D)) ⊙ W)", f"{RECLMIS} §III-C Eq. 7, §III-D Eq. 9")
    num_heads: int = key(4, "attention heads of CI and the reconstructors", "silent",
                         f"{RECLMIS} §III-B1: Eq. 1 is written single-headed (the code: 4)", minimum=1)
    dropout: float = key(0.1, "dropout of CI and the reconstructors", "silent", f"{RECLMIS} §III-B (the code: 0.1)",
                         minimum=0, maximum=0.99)
    reconstructor_layers: int = key(3, "conditioned decoder layers of each reconstructor", "3 (best of 1-10)",
                                    f"{RECLMIS_IMPL}; §IV-D6", minimum=1)
    reconstructor_ffn: int = key(1024, "feed-forward width of the reconstructors", "silent",
                                 f"{RECLMIS} §III-C (the code: 1024)", minimum=1)
    image_mask_rate: float = key(0.5, "share of image tokens masked for reconstruction (α_v)",
                                 "0.5 (0.3 in the ablations)", f"{RECLMIS_IMPL}; §IV-D", minimum=0, maximum=1)
    text_mask_rate: float = key(0.3, "share of note tokens masked for reconstruction (α_t)", "0.3", RECLMIS_IMPL,
                                minimum=0, maximum=1)
    temperature: float = key(0.01, "temperature of the conditioned contrastive loss", "silent",
                             f"{RECLMIS} §III-B2: \"τ is the temperature hyperparameter\", no value (the code: 0.01)",
                             above=0)
    epochs: int = key(200, "training epochs", "200 (QaTa-COV19); 500 (MosMedData+)", RECLMIS_IMPL, minimum=1)
    optimizer: Literal["sgd", "adam", "adamw"] = key("adam", "optimiser", "silent (the code: Adam)",
                                                     f"{RECLMIS_IMPL}: \"The initial learning rate was set to 3e-4\"")
    lr: float = key(3e-4, "initial learning rate", "3e-4", RECLMIS_IMPL, above=0)
    momentum: float = key(0.9, "Adam's beta1", "silent", f"{RECLMIS_IMPL} (torch's default)", minimum=0,
                          maximum=0.9999)
    weight_decay: float = key(0.0, "weight decay", "silent", f"{RECLMIS_IMPL} (the code: none)", minimum=0)
    lr_schedule: Literal["poly", "cosine"] = key("cosine", "learning-rate schedule", "cosine annealing",
                                                 RECLMIS_IMPL)


TGCNET = "seed 001 (TGC-Net)"
TGCNET_IMPL = f"{TGCNET} §4.2 Implementation Details"
CLIP_L336 = "openclip:ViT-L-14-336@openai"


@dataclass(frozen=True)
class TGCNetSettings(NoteSettings):
    method: typing.ClassVar[str] = "tgcnet"
    text_encoder: str = key(CLIP_L336, "CLIP text tower encoding the note and the auxiliary note",
                            "CLIP-ViT-L's text encoder, frozen", TGCNET_IMPL, kind="encoder")
    image_encoder: str = key(CLIP_L336, "CLIP image tower giving the dense patch tokens (the same CLIP model as "
                             "the text tower)", "CLIP-ViT-L at 336 x 336, frozen", TGCNET_IMPL, kind="encoder")
    max_tokens: int = key(77, "note tokens read (CLIP's context)", "silent",
                          f"{TGCNET} §3.2 DATE: F_T is L x D_t, no L given", minimum=2)
    sse: Literal["full", "vit", "cnn"] = key("full", "image path: SSE (CLIP ViT + CNN + deformable attention), vit "
                                             "(CLIP only) or cnn (no CLIP image tower)", "full",
                                             f"{TGCNET} Tables 3-4")
    text: Literal["date", "main", "aux"] = key("date", "text path: DATE (auxiliary note infused into the note), main "
                                               "(the note only) or aux (the auxiliary note only)", "date",
                                               f"{TGCNET} Tables 3, 5")
    alignment: Literal["vlcm", "none", "single", "bidirectional"] = key(
        "vlcm", "vision-language alignment: VLCM, none, one cross-attention or bidirectional cross-attention",
        "vlcm", f"{TGCNET} Tables 3, 6")
    aux_dropout: float = key(0.1, "share of training samples whose auxiliary note is dropped (DATE only)", "silent",
                             f"{TGCNET} §3.2: a case without an auxiliary note is not discussed", minimum=0,
                             maximum=1)
    unaligned_towers: bool = key(
        False, "accept text and image towers of different models (their features share no space, so the cost "
        "volume starts from noise): for stand-ins and experiments only", "one CLIP model's towers",
        f"{TGCNET_IMPL}: \"We utilize the CLIP-ViT-L model\"", ours="a mismatched pair is refused unless named")
    msda_layers: int = key(2, "deformable attention encoder layers", "silent",
                           f"{TGCNET} §3.1: \"a Multi-Scale Deformable Attention (MSDeformAttn) module\"", minimum=1)
    cnn_input_size: tuple[int, int] | None = key(
        None, "side the CNN branch sees each patch resized to (none: 768/224 x the patch, rounded up to 32)",
        "768 x 768 (224 x 224 images)", TGCNET_IMPL, minimum=32)
    epochs: int = key(1000, "training epochs", "silent", f"{TGCNET_IMPL}: batch and learning rates only", minimum=1)
    optimizer: Literal["sgd", "adam", "adamw"] = key("adamw", "optimiser", "silent",
                                                     f"{TGCNET_IMPL}: \"Regarding optimization, the initial learning "
                                                     "rate is configured based on the dataset\" (CAT-Seg's AdamW)")
    lr: float = key(2e-4, "initial learning rate", "2e-5 (QaTa-COV19), 5e-4 (MosMedData+), 2e-4 (abdominal CT)",
                    TGCNET_IMPL, above=0)
    momentum: float = key(0.9, "AdamW's beta1", "silent", TGCNET_IMPL, minimum=0, maximum=0.9999)
    weight_decay: float = key(1e-4, "weight decay", "silent", f"{TGCNET_IMPL} (CAT-Seg's 1e-4)", minimum=0)


MPTPN = "seed 003 (MPTPN)"
MPTPN_NONE = f"{MPTPN}: no implementation-details section"


@dataclass(frozen=True)
class MPTPNSettings(NoteSettings):
    method: typing.ClassVar[str] = "mptpn"
    text_encoder: str = key("hf:bert-base-uncased", "text model giving the note's per-token vectors",
                            "BERT, 768-d word vectors (\"base\" not written)", f"{MPTPN} §3.2.2 PPE", kind="encoder")
    max_tokens: int = key(10, "note tokens read", "silent (the code: 10)", MPTPN_NONE, minimum=2)
    ppe_weights: str | None = key(None, "stage-1 checkpoint of the prior prompt encoder (nnunet-textguided "
                                  "pretrain-ppe); needed unless pretrained is false",
                                  "SimSiam pretraining on 5000 COCO image-caption pairs", f"{MPTPN} §3.2.1, §4.1",
                                  kind="path")
    pretrained: bool = key(True, "initialise the prior prompt encoder from ppe_weights (false: random, Table 3's "
                           "PPE*)", "on", f"{MPTPN} Table 3")
    down_vit: bool = key(True, "DownViT (where the note enters)", "on", f"{MPTPN} Table 3")
    up_vit: bool = key(True, "UpViT", "on", f"{MPTPN} Table 3")
    msff: bool = key(True, "multiscale feature fusion", "on", f"{MPTPN} Table 3")
    up_attention: bool = key(True, "UpAttention decoder", "on", f"{MPTPN} Table 3")
    num_heads: int = key(8, "attention heads of the ViTs", "silent", f"{MPTPN} §3.2.2: MSA defined generically "
                         "(the code: 8)", minimum=1)
    epochs: int = key(1000, "training epochs", "silent", MPTPN_NONE, minimum=1)
    optimizer: Literal["sgd", "adam", "adamw"] = key("adam", "optimiser", "silent (the code: Adam)", MPTPN_NONE)
    lr: float = key(1e-4, "initial learning rate", "silent (the code: 1e-4)", MPTPN_NONE, above=0)
    momentum: float = key(0.9, "Adam's beta1", "silent", MPTPN_NONE, minimum=0, maximum=0.9999)
    weight_decay: float = key(0.0, "weight decay", "silent (the code: none)", MPTPN_NONE, minimum=0)


SCHEMAS: dict[str, type[CommonSettings]] = {s.method: s for s in (BiCLIPSettings, CDPDNetSettings, RecLMISSettings,
                                                                   TGCNetSettings, MPTPNSettings)}


@dataclass(frozen=True)
class KeyInfo:
    name: str
    type: Any
    default: Any
    meaning: str
    paper: str
    where: str
    ours: str
    kind: str
    minimum: float | None
    maximum: float | None
    above: float | None

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


def schema(method: str) -> type[CommonSettings]:
    if method not in SCHEMAS:
        raise SettingsError(f"unknown method {method!r}; methods: {', '.join(SCHEMAS)}")
    return SCHEMAS[method]


def keys(method: str) -> dict[str, KeyInfo]:
    """{name: KeyInfo} of a method's schema: the method's own keys first, then the common ones."""
    cls = schema(method)
    hints = typing.get_type_hints(cls)
    out = {}
    common = {f.name for f in dataclasses.fields(CommonSettings)}
    fields = dataclasses.fields(cls)
    for f in [f for f in fields if f.name not in common] + [f for f in fields if f.name in common]:
        m = f.metadata
        out[f.name] = KeyInfo(f.name, hints[f.name], f.default, m["meaning"], m["paper"], m["where"], m["ours"],
                              m["kind"], m["minimum"], m["maximum"], m["above"])
    return out


def _is_union(origin) -> bool:
    return origin is typing.Union or origin is types.UnionType


def _type_name(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if _is_union(origin):
        inner = [a for a in args if a is not type(None)]
        return " | ".join(_type_name(a) for a in inner) + " | none"
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of ({_type_name(args[0])})" if typing.get_origin(args[0]) is Literal else \
                f"list of {_type_name(args[0])}"
        return f"{len(args)} x {_type_name(args[0])}"
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(t, str(t))


def _valid_keys(method: str) -> str:
    return (f"Valid keys for {method}: {', '.join(keys(method))} (meanings: nnunet-textguided settings {method})")


# -- values ---------------------------------------------------------------------------------------------------
_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null", "")


def parse_text(method: str, name: str, text: str) -> Any:
    """A ``--set KEY=VALUE`` value (a string) -> a typed value (then checked by ``check_value``)."""
    info = _info(method, name)
    return _from_text(info.type, text.strip(), method, name)


def _from_text(t, text: str, method: str, name: str):
    origin, args = typing.get_origin(t), typing.get_args(t)
    if _is_union(origin):
        if text.lower() in _NONE:
            return None
        inner = next(a for a in args if a is not type(None))
        return _from_text(inner, text, method, name)
    if origin is tuple:
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                pass
        parts = [p.strip() for p in text.split(",")] if text else []
        item = args[0]
        return [_from_text(item, p, method, name) for p in parts]
    if t is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        return text
    if t is int:
        try:
            return int(text)
        except ValueError:
            return text
    if t is float:
        try:
            return float(text)
        except ValueError:
            return text
    return text


def _info(method: str, name: str) -> KeyInfo:
    k = keys(method)
    if name not in k:
        other = [m for m in SCHEMAS if m != method and name in keys(m)]
        why = (f"{name!r} is a key of {', '.join(other)}, not of {method}" if other else f"unknown key {name!r}")
        raise SettingsError(f"{why}. {_valid_keys(method)}")
    return k[name]


def check_value(method: str, name: str, value: Any, source: str = "") -> Any:
    """A typed value checked against its key (type, choices, range) -> its JSON form (tuples as lists).
    SettingsError naming the key, what was expected and the valid keys."""
    info = _info(method, name)
    where = f" ({source})" if source else ""
    ok, out = _check(info.type, value, info)
    if not ok:
        raise SettingsError(f"{method} setting {name}={value!r}{where}: {out}. {name} is {info.type_name}: "
                            f"{info.meaning}. {_valid_keys(method)}")
    return out


def _check(t, value, info: KeyInfo) -> tuple[bool, Any]:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if _is_union(origin):
        if value is None:
            return True, None
        return _check(next(a for a in args if a is not type(None)), value, info)
    if origin is Literal:
        return (True, value) if value in args else (False, f"must be one of {', '.join(map(str, args))}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, "must be a list (comma-separated)"
        fixed = not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(value) != len(args):
            return False, f"must have {len(args)} entries"
        out = []
        for i, v in enumerate(value):
            ok, c = _check(args[i] if fixed else args[0], v, info)
            if not ok:
                return False, f"entry {v!r}: {c}"
            out.append(c)
        if not fixed and len(set(map(str, out))) != len(out):
            return False, "has repeated entries"
        return True, out
    if t is bool:
        return (True, value) if isinstance(value, bool) else (False, "must be true or false")
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return False, "must be a whole number"
        return _in_range(value, info)
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, "must be a number"
        return _in_range(float(value), info)
    if t is str:
        if not isinstance(value, str) or not value.strip():
            return False, "must be a non-empty text"
        if info.kind == "path":
            return True, portable_path(value)
        return True, value
    return False, f"unsupported type {t}"


def _in_range(value, info: KeyInfo) -> tuple[bool, Any]:
    if info.minimum is not None and value < info.minimum:
        return False, f"must be >= {info.minimum:g}"
    if info.maximum is not None and value > info.maximum:
        return False, f"must be <= {info.maximum:g}"
    if info.above is not None and value <= info.above:
        return False, f"must be > {info.above:g}"
    return True, value


def check_values(method: str, values: dict, source: str = "") -> dict:
    """Every key of ``values`` checked -> their JSON forms (unknown keys refused)."""
    if not isinstance(values, dict):
        raise SettingsError(f"{source or 'settings'}: expected a mapping of keys to values, got {type(values).__name__}."
                            f" {_valid_keys(method)}")
    return {k: check_value(method, k, v, source) for k, v in values.items()}


def read_settings_file(path: str | os.PathLike, method: str | None) -> tuple[str | None, dict]:
    """A settings file (JSON, or YAML for .yaml / .yml): ``{key: value}`` for the chosen method, or ``{method:
    {key: value}}``. Returns (method, values)."""
    p = Path(path)
    try:
        data = read_json_or_yaml(path)
    except (FileNotFoundError, ValueError) as e:
        raise SettingsError(f"settings file {e}") from None
    if isinstance(data, dict) and len(data) == 1 and next(iter(data)) in SCHEMAS and \
            isinstance(next(iter(data.values())), dict):
        file_method = next(iter(data))
        if method is not None and method != file_method:
            raise SettingsError(f"settings file {p} holds {file_method} settings, but the method is {method}")
        return file_method, data[file_method]
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {p}: expected a mapping of keys to values")
    return method, data


# -- resolution -------------------------------------------------------------------------------------------------
def configured_values(configuration: dict, method: str) -> dict:
    """The values a configuration sets for ``method``: from the user's block (``{method: {key: value}}``, written
    by add-config) or from a trained model's resolved block (``{"method": ..., "settings": {...}}``)."""
    block = configuration.get("textguided") or {}
    if "method" in block:  # a model folder's plans.json: the resolved settings of its trainer
        return dict(block.get("settings", {})) if block["method"] == method else {}
    values = block.get(method) or {}
    if not isinstance(values, dict):
        raise SettingsError(f"the configuration's textguided.{method} block must be a mapping of keys to values")
    return dict(values)


def resolve(method: str, configuration: dict, variant: dict | None = None, trainer: str = "the trainer",
            where: str = "the configuration") -> CommonSettings:
    """The settings a trainer trains with: schema defaults, then the trainer variant's, then the configuration's.
    A configuration value that contradicts a variant's own setting is refused (the results folder would name the
    variant for another model)."""
    cls = schema(method)
    variant = check_values(method, dict(variant or {}), f"{trainer}'s own settings")
    given = check_values(method, configured_values(configuration, method), where)
    block = configuration.get("textguided") or {}
    if "method" not in block:
        other = [m for m in block if m not in SCHEMAS]
        if other:
            raise SettingsError(f"{where}: textguided block has {', '.join(map(repr, other))}, which is no method; "
                                f"methods: {', '.join(SCHEMAS)}")
    if "method" in block and block["method"] != method:
        raise SettingsError(f"{where} holds a trained {block['method']} model, not {method}")
    clash = {k: v for k, v in given.items() if k in variant and v != variant[k]}
    if clash and "method" in block:
        raise SettingsError(f"{where} holds a model trained with " + ", ".join(
            f"{k}={json.dumps(v)}" for k, v in clash.items()) + f", not by {trainer}")
    if clash:
        raise SettingsError(
            f"{trainer} is defined by " + ", ".join(f"{k}={json.dumps(variant[k])}" for k in clash)
            + f", but {where} sets " + ", ".join(f"{k}={json.dumps(v)}" for k, v in clash.items())
            + ": train the trainer that matches the configuration, or remove the key from it (nnunet-textguided "
            "add-config --force)")
    values = {**variant, **given}
    typed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**typed)


def as_dict(settings: CommonSettings) -> dict:
    """JSON form (tuples as lists), every key."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}


def origin_of(method: str, name: str, configuration: dict, variant: dict) -> str:
    """Where a resolved value came from: "configuration", "trainer" (variant) or "default"."""
    if name in configured_values(configuration, method):
        return "configuration"
    return "trainer" if name in variant else "default"


def encoder_keys(method: str) -> list[str]:
    return [n for n, i in keys(method).items() if i.kind == "encoder"]


def path_keys(method: str) -> list[str]:
    return [n for n, i in keys(method).items() if i.kind == "path"]


# -- documentation ----------------------------------------------------------------------------------------------
def describe(method: str, markdown: bool = False) -> str:
    """The documented keys of a method: name, type, default, meaning, the paper's value and where."""
    rows = []
    for k in keys(method).values():
        default = json.dumps(list(k.default) if isinstance(k.default, tuple) else k.default)
        ours = f" Ours: {k.ours}." if k.ours else ""
        rows.append((k.name, k.type_name, default, k.meaning + "." + ours, k.paper, k.where))
    if markdown:
        out = [f"### {method}", "", "| key | type | default | meaning | paper | where |", "|---|---|---|---|---|---|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in (f"`{r[0]}`", r[1], f"`{r[2]}`", *r[3:])) + " |"
                for r in rows]
        return "\n".join(out)
    out = [f"{method} settings (nnunet-textguided add-config ... --set KEY=VALUE):"]
    for name, typ, default, meaning, paper, where in rows:
        out.append(f"  {name} = {default}   [{typ}]\n      {meaning}\n      paper: {paper}"
                   + (f" ({where})" if where else ""))
    return "\n".join(out)
