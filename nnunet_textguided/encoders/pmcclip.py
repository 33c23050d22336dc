"""PMC-CLIP image tower (kind ``pmcclip``): open_clip's ModifiedResNet built from an open_clip model config.

Why no network code here: PMC-CLIP's visual encoder is CLIP's ModifiedResNet-50 (3-conv stem, layers
[3, 4, 6, 3], width 64, attention pool with width*32/64 = 32 heads, output 768, 224 px, OpenAI mean/std) and
its state-dict keys are open_clip's, so ``open_clip.model._build_vision_tower`` with open_clip's ``RN50``
config (``embed_dim`` set to 768) rebuilds it exactly.

On disk (PMC-OA release): ``image_encoder(resnet50).pth``, a torch state dict of the visual tower; keys may
carry ``module.`` and/or ``visual.`` prefixes (a full PMC-CLIP checkpoint works too: only ``visual.*`` keys
are kept). The spec names that file or a directory holding it. The architecture defaults to RN50/768; an
``open_clip_config.json`` beside the weights (``{"model_cfg": {...}, "preprocess_cfg": {...}}`` like open_clip's
local-dir, or a bare model config) or the ``?config=/path.json`` option overrides it - that is how the tiny
test model (``save_tiny_encoder("tiny-pmcclip", dir)``) records its small width.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import OPENAI_MEAN, OPENAI_STD, EncoderSpecError, FrozenEncoder

WEIGHTS_NAME = "image_encoder(resnet50).pth"
CONFIG_NAME = "open_clip_config.json"
EXAMPLE = "pmcclip:/path/to/pmc-oa/image_encoder(resnet50).pth"


def default_config() -> dict:
    """open_clip's RN50 config with PMC-CLIP's 768-d output."""
    import open_clip
    cfg = open_clip.get_model_config("RN50")
    cfg["embed_dim"] = 768
    return {"model_cfg": cfg, "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}


def build_visual(model_cfg: dict):
    """ModifiedResNet (or any open_clip vision tower) from an open_clip model config dict."""
    from open_clip.model import _build_vision_tower
    return _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg.get("quick_gelu", False))


class PmcClipEncoder(FrozenEncoder):
    """Image-only: embed_images (N,3,H,W) in [0,1] -> (N, embed_dim) L2-normalised."""

    normalize = True

    def __init__(self, spec: str, kind: str, config: dict, untrained: bool = False, visual=None):
        cfg, pp = config.get("model_cfg", config), config.get("preprocess_cfg", {})
        size = cfg["vision_cfg"].get("image_size", 224)
        super().__init__(spec, kind, cfg["embed_dim"], image_size=size[0] if isinstance(size, (list, tuple)) else size,
                         mean=pp.get("mean", OPENAI_MEAN), std=pp.get("std", OPENAI_STD), untrained=untrained)
        self.config = {"model_cfg": cfg, "preprocess_cfg": {"mean": list(self._mean.flatten().tolist()),
                                                            "std": list(self._std.flatten().tolist())}}
        self.model = visual if visual is not None else build_visual(cfg)

    def _encode_images(self, x):
        return self.model(x)

    def save(self, directory) -> str:
        """Write ``image_encoder(resnet50).pth`` (plain visual state dict) + ``open_clip_config.json``."""
        d = Path(directory).expanduser().resolve()
        d.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, d / WEIGHTS_NAME)
        (d / CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
        return f"pmcclip:{d}"


def _clean_state_dict(sd: dict) -> dict:
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    if any(k.startswith("visual.") for k in sd):
        sd = {k[7:]: v for k, v in sd.items() if k.startswith("visual.")}
    return sd


def load(spec: str, kind: str, arg: str, opts: dict) -> PmcClipEncoder:
    p = Path(arg).expanduser()
    if p.is_dir():
        cands = [p / WEIGHTS_NAME] if (p / WEIGHTS_NAME).is_file() else \
            sorted(q for e in ("*.pth", "*.pt", "*.bin", "*.safetensors") for q in p.glob(e))
        if len(cands) != 1:
            raise EncoderSpecError(f"encoder spec {spec!r}: expected {WEIGHTS_NAME!r} (or exactly one weights file) "
                                   f"in {str(p)!r}, found {[c.name for c in cands]}; e.g. {EXAMPLE!r}")
        weights = cands[0]
    elif p.is_file():
        weights = p
    else:
        raise EncoderSpecError(f"encoder spec {spec!r}: PMC-CLIP weights {str(p)!r} not found (a file like "
                               f"{WEIGHTS_NAME!r} or a directory holding it); e.g. {EXAMPLE!r}")
    cfg_path = Path(opts["config"]).expanduser() if "config" in opts else weights.parent / CONFIG_NAME
    if "config" in opts and not cfg_path.is_file():
        raise EncoderSpecError(f"encoder spec {spec!r}: config file {str(cfg_path)!r} not found")
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else default_config()
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(weights))
    else:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    enc = PmcClipEncoder(spec, kind, config)
    hint = (f"give the right open_clip model config as {CONFIG_NAME} beside the weights or with "
            "?config=/path.json")
    try:
        missing, unexpected = enc.model.load_state_dict(_clean_state_dict(sd), strict=False)
    except RuntimeError as e:  # shape mismatch
        raise EncoderSpecError(f"encoder spec {spec!r}: weights {str(weights)!r} do not fit the ModifiedResNet "
                               f"config ({str(e).splitlines()[1:3]}); {hint}") from None
    if missing or unexpected:
        raise EncoderSpecError(f"encoder spec {spec!r}: weights {str(weights)!r} do not fit the ModifiedResNet "
                               f"config (missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}); {hint}")
    return enc
