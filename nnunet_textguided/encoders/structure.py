"""Real-size encoder structures built from their configs, without weights, for parameter and FLOP counting.

Why: ``nnunet-textguided params`` reports each method at its paper configuration, frozen encoders included
(CoCa ViT-L-14, PMC-CLIP's ModifiedResNet-50/768, DINOv2, BERT...), on machines that have neither the weights
nor a hub. ``encoder_structure(spec)`` therefore builds the *architecture* a spec names from its config alone,
on the **meta device** (shapes, no storage: nothing is allocated or downloaded), and runs forwards on meta
inputs under torch's ``FlopCounterMode``.

Where the config comes from: ``openclip:``/``coca:`` model names -> ``open_clip.get_model_config`` (the
``@tag`` only names weights and is ignored), ``local-dir:<dir>`` -> its ``open_clip_config.json`` (no weights
needed), ``hf-hub:`` -> refused (its config is on the hub); ``pmcclip:`` -> ``?config=``, else
``open_clip_config.json`` beside the (possibly absent) weights, else RN50/768; ``hf:<dir>`` -> its
``config.json``; ``hf:<hub name>`` -> the table ``KNOWN_HF_MODELS`` (transformers config classes with the
published hyper-parameters); ``minilm`` -> the bundled package folder; ``tiny-*`` -> the tiny model's own
config (the tiny encoder is loaded to read it, then rebuilt on meta like every other kind).

FLOP conventions: torch's flop counter counts a multiply-add as **2 FLOPs** (MACs = FLOPs / 2) and counts only
matmuls (mm/addmm/bmm), convolutions and attention; element-wise ops, norms, softmax, embedding look-ups and
resizing count 0. On meta, nn.MultiheadAttention never takes its fused fast path and attention runs in SDPA's
math form (forced here; HF models are built with ``attn_implementation="eager"``), so attention costs
4·b·h·L²·d like the counter's formula for the fused GPU kernels. (On CPU with real tensors the fused kernels
are invisible to the counter: compare under ``torch.backends.mha.set_fastpath_enabled(False)`` and
``sdpa_kernel(SDPBackend.MATH)``, as the tests do.)

``flops(method, n)`` = one call of the FrozenEncoder method on n inputs: ``embed_images`` -> image tower on
(n,3,S,S); ``embed_texts`` and ``token_states`` -> text tower on (n, context_length) token ids (open_clip's
embed_texts pads to its context; HF pads embed_texts to the longest text and token_states to its max_length
argument, so there it is an upper bound: use ``dataclasses.replace(st, context_length=L)`` for another
length; token_states' per-token projection, <1 %, is not added); ``embed_captions`` (CoCa) -> see
``_captions``: a LOWER BOUND of autoregressive generation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .base import EncoderSpecError, hub_offline
from .registry import load_encoder, resolved_parts

__all__ = ["EncoderStructure", "encoder_structure", "KNOWN_HF_MODELS", "known_hf_config", "DINOV2_CROP"]

# Published hub configs (hidden, layers, heads); DINOv2 configs have image_size 518 (37x37 position embeddings,
# interpolated for other inputs), giant uses SwiGLU; their image processor crops to 224.
_DINOV2 = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "giant": (1536, 40, 24)}
DINOV2_CROP = 224
# BERT-base configs differing only in vocabulary size. PubMedBERT/BiomedBERT: own PubMed WordPiece vocabulary of
# BERT's size (30522 in its config.json, as we understand it; the count moves by 768 per vocabulary entry).
_BERT_VOCAB = {"bert-base-uncased": 30522, "google-bert/bert-base-uncased": 30522,
               **{f"microsoft/BiomedNLP-{m}-base-uncased-abstract{s}": 30522
                  for m in ("PubMedBERT", "BiomedBERT") for s in ("", "-fulltext")},
               "emilyalsentzer/Bio_ClinicalBERT": 28996}  # BioBERT / bert-base-cased vocabulary
KNOWN_HF_MODELS = tuple([f"facebook/dinov2-{k}" for k in _DINOV2] + list(_BERT_VOCAB))


class Parts(nn.Module):
    """Groups existing submodules / parameters of a model under one module (for counting; no forward)."""

    def __init__(self, parts: dict):
        super().__init__()
        for name, part in parts.items():
            setattr(self, name, part)


@dataclass
class EncoderStructure:
    """Meta-device towers of one encoder spec. ``towers``: "image", "text" (CoCa: "decoder" = multimodal text
    decoder; open_clip: "other" = logit_scale/bias); ``runners``: method -> fn(n, image_size, context_length)
    running that method's forward on meta inputs."""

    spec: str
    kind: str
    embed_dim: int
    image_size: int | None
    towers: dict[str, nn.Module]
    context_length: int | None
    runners: dict[str, Callable] = field(default_factory=dict, repr=False)
    patch_size: int | None = None  # ViT image towers: the token grid is image_size // patch_size

    def num_parameters(self, towers: Iterable[str] | None = None) -> int:
        names = list(self.towers) if towers is None else list(towers)
        if unknown := [t for t in names if t not in self.towers]:
            raise KeyError(f"{self.spec!r} has no tower(s) {unknown} (towers: {', '.join(self.towers)})")
        params = {id(p): p for t in names for p in self.towers[t].parameters()}  # shared parameters once
        return sum(p.numel() for p in params.values())

    def flops(self, method: str, n: int, image_size: int | None = None) -> int:
        """Forward FLOPs (multiply-add = 2) of one ``method`` call on n inputs; ``image_size`` overrides S."""
        if method not in self.runners:
            raise NotImplementedError(f"encoder {self.spec!r} (kind {self.kind}) has no {method!r} "
                                      f"(counted methods: {', '.join(self.runners)})")
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            self.runners[method](n, image_size or self.image_size, self.context_length)
        return counter.get_total_flops()


def _img(n: int, s: int) -> torch.Tensor:
    return torch.zeros(n, 3, s, s, device="meta")


def _ids(n: int, length: int) -> torch.Tensor:
    return torch.zeros(n, length, dtype=torch.long, device="meta")


def _side(size) -> int:
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _captions(model, g: dict, n: int, s: int, ctx: int) -> None:
    """CoCa embed_captions, LOWER BOUND: one image-tower forward, then ONE pass of the text tower + multimodal
    decoder over the seq_len-1 input positions of a full-length caption for each of n x beams sequences (the
    cost of KV-cached generation; open_clip's generate re-runs the whole prefix every step, ~seq_len/2 times
    more, while captions ending early cost less), then encode_text of the n captions at the full context."""
    beams = g["beams"] if g["generation"] == "beam" else 1
    latent, embs = model._encode_image(_img(n, s))
    model(None, _ids(n * beams, g["seq_len"] - 1), image_latent=latent, image_embs=embs.repeat_interleave(beams, 0),
          output_labels=False)
    model.encode_text(_ids(n, ctx))


def _openclip_structure(spec: str, kind: str, model_cfg: dict, generation: dict | None) -> EncoderStructure:
    from .openclip import build_model
    try:
        with torch.device("meta"), hub_offline():
            model = build_model(model_cfg).eval()
    except (OSError, ValueError) as e:  # e.g. an HF text tower whose config lives on the hub
        raise EncoderSpecError(f"encoder spec {spec!r}: cannot build the model from its config offline: {e}") from e
    top = dict(model.named_children()) | dict(model.named_parameters(recurse=False))
    towers = {"image": top.pop("visual")}
    if "text_decoder" in top:
        towers["decoder"] = top.pop("text_decoder")
    other = {k: top.pop(k) for k in list(top) if k.startswith("logit_")}
    towers["text"] = Parts(top)  # CLIP: transformer, token/positional embeddings, ln_final, projection
    if other:
        towers["other"] = Parts(other)
    runners = {"embed_images": lambda n, s, ctx: model.encode_image(_img(n, s)),
               "embed_texts": lambda n, s, ctx: model.encode_text(_ids(n, ctx))}
    runners["token_states"] = runners["embed_texts"]
    runners["dense_tokens"] = runners["embed_images"]  # + the per-token projection (<1 %), not counted
    if generation is not None:
        runners["embed_captions"] = lambda n, s, ctx: _captions(model, generation, n, s, ctx)
    patch = getattr(model.visual, "patch_size", None)
    return EncoderStructure(spec, kind, int(model_cfg["embed_dim"]), _side(model.visual.image_size), towers,
                            int(model_cfg.get("text_cfg", {}).get("context_length", 77)), runners,
                            None if patch is None else _side(patch))


def _pmcclip_structure(spec: str, kind: str, config: dict) -> EncoderStructure:
    from .pmcclip import build_visual
    cfg = config.get("model_cfg", config)
    with torch.device("meta"):
        visual = build_visual(cfg).eval()
    return EncoderStructure(spec, kind, int(cfg["embed_dim"]), _side(cfg["vision_cfg"].get("image_size", 224)),
                            {"image": visual}, None, {"embed_images": lambda n, s, ctx: visual(_img(n, s))})


def _hf_structure(spec: str, kind: str, cfg, image_size: int | None, context_length: int | None) -> EncoderStructure:
    """Text model if the config has a vocabulary (like hf.load), else vision model."""
    from transformers import AutoModel
    with torch.device("meta"):
        model = AutoModel.from_config(cfg, attn_implementation="eager").eval()  # = sdpa FLOPs, no data checks
    if hasattr(cfg, "vocab_size"):
        def text(n, s, ctx):
            ids = _ids(n, ctx)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return EncoderStructure(spec, kind, cfg.hidden_size, None, {"text": model}, context_length,
                                {"embed_texts": text, "token_states": text})
    return EncoderStructure(spec, kind, cfg.hidden_size, image_size, {"image": model}, None,
                            {"embed_images": lambda n, s, ctx: model(pixel_values=_img(n, s)),
                             "hidden_grids": lambda n, s, ctx: model(pixel_values=_img(n, s))})


def _openclip(spec: str, kind: str, arg: str, opts: dict) -> EncoderStructure:
    import open_clip
    from .openclip import CONFIG_NAME, GENERATION_DEFAULTS
    schema, ident = open_clip.factory.parse_model_name(arg)
    if schema == "hf-hub":
        raise EncoderSpecError(
            f"encoder spec {spec!r}: counting parameters/FLOPs needs the model config offline, and an 'hf-hub:' "
            f"config lives on the hub; use '{kind}:local-dir:<dir>' with the repo's {CONFIG_NAME} (no weights "
            f"needed) or the open_clip model name, e.g. '{kind}:coca_ViT-L-14' (see open_clip.list_models())")
    if schema == "local-dir":
        path = Path(ident).expanduser() / CONFIG_NAME
        if not path.is_file():
            raise EncoderSpecError(f"encoder spec {spec!r}: {str(path)!r} not found (open_clip local-dir config)")
        cfg = json.loads(path.read_text())["model_cfg"]
    else:
        name = arg.partition("@")[0].replace("/", "-")
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise EncoderSpecError(f"encoder spec {spec!r}: unknown open_clip model {name!r} "
                                   "(see open_clip.list_models())")
    if kind == "coca" and "multimodal_cfg" not in cfg:
        raise EncoderSpecError(f"encoder spec {spec!r}: not a CoCa model; use 'openclip:{arg}'")
    return _openclip_structure(spec, kind, cfg, {**GENERATION_DEFAULTS, **opts} if kind == "coca" else None)


def _pmcclip(spec: str, kind: str, arg: str, opts: dict) -> EncoderStructure:
    from .pmcclip import CONFIG_NAME, default_config
    p = Path(arg).expanduser()  # need not exist: counting has no weights
    path = Path(opts["config"]).expanduser() if "config" in opts else (p if p.is_dir() else p.parent) / CONFIG_NAME
    if "config" in opts and not path.is_file():
        raise EncoderSpecError(f"encoder spec {spec!r}: config file {str(path)!r} not found")
    return _pmcclip_structure(spec, kind, json.loads(path.read_text()) if path.is_file() else default_config())


def _hf_dir(spec: str, kind: str, d: Path) -> EncoderStructure:
    from transformers import AutoConfig, AutoImageProcessor
    from .hf import _processor_geometry
    if not (d / "config.json").is_file():
        raise EncoderSpecError(f"encoder spec {spec!r}: no config.json in {str(d)!r} (not a save_pretrained dir)")
    with hub_offline():
        cfg = AutoConfig.from_pretrained(str(d), local_files_only=True)
        if getattr(cfg, "text_config", None) is not None or getattr(cfg, "vision_config", None) is not None:
            raise EncoderSpecError(f"encoder spec {spec!r}: {cfg.model_type} is a composite text+vision model; "
                                   "count CLIP-style models with 'openclip:'")
        if hasattr(cfg, "vocab_size"):
            tok = d / "tokenizer_config.json"
            limits = [getattr(cfg, "max_position_embeddings", None),
                      json.loads(tok.read_text()).get("model_max_length") if tok.is_file() else None]
            return _hf_structure(spec, kind, cfg, None, int(min(v for v in limits if v)))
        try:
            proc = AutoImageProcessor.from_pretrained(str(d), local_files_only=True, use_fast=False)
        except (OSError, ValueError):
            proc = None
    return _hf_structure(spec, kind, cfg, _processor_geometry(proc, cfg)[0], None)


def _hf(spec: str, kind: str, arg: str, opts: dict) -> EncoderStructure:
    p = Path(arg).expanduser()
    if p.exists() or arg.startswith(("/", ".", "~")):
        return _hf_dir(spec, kind, p)
    cfg = known_hf_config(spec, arg)
    if hasattr(cfg, "vocab_size"):
        return _hf_structure(spec, kind, cfg, None, cfg.max_position_embeddings)
    return _hf_structure(spec, kind, cfg, DINOV2_CROP, None)


def known_hf_config(spec: str, arg: str):
    """The published transformers config of a hub model of ``KNOWN_HF_MODELS`` (no hub needed)."""
    from transformers import BertConfig, Dinov2Config
    size = arg.removeprefix("facebook/dinov2-")
    if size in _DINOV2:
        h, layers, heads = _DINOV2[size]
        return Dinov2Config(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
                            image_size=518, patch_size=14, use_swiglu_ffn=size == "giant")
    if arg in _BERT_VOCAB:
        return BertConfig(vocab_size=_BERT_VOCAB[arg])
    raise EncoderSpecError(f"encoder spec {spec!r}: no hub here, and {arg!r} is not a known hub config "
                           f"({', '.join(KNOWN_HF_MODELS)}); for another model use 'hf:<dir>' with its "
                           "save_pretrained config.json (weights not needed)")


def _minilm(spec: str, kind: str, arg: str, opts: dict) -> EncoderStructure:
    from dataclasses import replace
    from .minilm import model_dir
    d = model_dir()
    st = _hf_dir(spec, kind, d)
    max_len = json.loads((d / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
    return replace(st, context_length=min(st.context_length, max_len))


def _tiny(spec: str, kind: str, arg: str, opts: dict) -> EncoderStructure:
    from .openclip import OpenClipEncoder
    from .pmcclip import PmcClipEncoder
    enc = load_encoder(spec)  # tiny: read its config and geometry, then rebuild on meta like the real kinds
    if isinstance(enc, OpenClipEncoder):
        return _openclip_structure(spec, kind, enc.model_cfg, getattr(enc, "generation", None))
    if isinstance(enc, PmcClipEncoder):
        return _pmcclip_structure(spec, kind, enc.config)
    return _hf_structure(spec, kind, enc.model.config, enc.image_size, getattr(enc, "max_length", None))


def encoder_structure(spec: str) -> EncoderStructure:
    """Meta-device structure of the encoder ``spec`` names (see the module docstring); no weights, no hub."""
    kind, arg, opts = resolved_parts(spec, strict=False)  # locations under the weights root, if it is set
    opts = {k: v for k, v in opts.items() if k != "random"}
    build = _tiny if kind.startswith("tiny-") else \
        {"openclip": _openclip, "coca": _openclip, "pmcclip": _pmcclip, "hf": _hf, "minilm": _minilm}[kind]
    return build(spec, kind, arg, opts)
