"""open_clip encoders: CLIP-style dual towers (kind ``openclip``) and CoCa captioners (kind ``coca``).

Why open_clip itself (not a re-implementation): the methods use open_clip checkpoints (CLIP for BiCLIP /
CDPDNet / TGC-Net / RecLMIS, CoCa captions for MPTPN), and open_clip's loader already understands its model
names + pretrained tags, ``hf-hub:`` repos and ``local-dir:`` folders. A ``local-dir:`` folder (open_clip 3.3,
``factory.create_model``) holds ``open_clip_config.json`` = ``{"model_cfg": {...}, "preprocess_cfg": {...}}``
and one weights file (``open_clip_model.safetensors`` preferred; also ``open_clip_pytorch_model.bin``,
``model.safetensors``, ``*.pth``...); the tokenizer comes from ``model_cfg.text_cfg`` (no ``hf_tokenizer_name``
-> CLIP's SimpleTokenizer). ``OpenClipEncoder.save`` writes exactly that layout.

Captioning: ``generation=beam`` is open_clip's ``CoCa.generate`` beam search (6 beams in 3 groups by default),
run by ``beam_search.group_beam_search`` rather than transformers' ``BeamSearchScorer`` (removed in transformers
5); the captions are token for token open_clip's (tested against it under transformers 4.x), and each image is
encoded once instead of once per beam. ``generation=greedy`` is a small deterministic argmax
loop over ``CoCa.forward`` (open_clip's ``top_k`` path samples with ``torch.multinomial`` and so consumes the
global RNG). Both honour ``seq_len`` (including the start token) and ``min_seq_len`` (end token blocked while
the sequence incl. start token is shorter), like ``CoCa.generate``.
"""
from __future__ import annotations

import json
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import open_clip
from open_clip.coca_model import CoCa
from open_clip.model import CLIP, CustomTextCLIP, set_model_preprocess_cfg
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from open_clip.transformer import TextTransformer, VisionTransformer

from .beam_search import group_beam_search
from .base import OPENAI_MEAN, OPENAI_STD, EncoderSpecError, FrozenEncoder

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
#: CoCa generation defaults of the MPTPN paper (= open_clip's CoCa.generate defaults)
GENERATION_DEFAULTS = dict(generation="beam", beams=6, beam_groups=3, seq_len=30, min_seq_len=5)


def build_model(model_cfg: dict, preprocess_cfg: dict | None = None):
    """Instantiate an open_clip model from a model config dict the way ``open_clip.create_model`` does."""
    cfg = deepcopy(model_cfg)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    cls = CoCa if "multimodal_cfg" in cfg else CustomTextCLIP if custom_text else CLIP
    model = cls(**cfg)
    pp = merge_preprocess_dict(asdict(PreprocessCfg()), preprocess_cfg or {})
    pp["size"] = model.visual.image_size
    set_model_preprocess_cfg(model, pp)
    return model


class OpenClipEncoder(FrozenEncoder):
    """open_clip CLIP / CustomTextCLIP / CoCa: image + text towers, L2-normalised (E = model embed_dim).

    token_states: ``ln_final(x) @ text_projection`` for every token (the RecLMIS text features), D = E.
    """

    normalize = True

    def __init__(self, spec: str, kind: str, model, tokenizer, model_cfg: dict, untrained: bool = False):
        pp = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        text = getattr(model, "text", None)
        has_proj = (text.text_projection if isinstance(text, TextTransformer) else
                    getattr(model, "text_projection", None)) is not None
        tok_dim = (model_cfg["embed_dim"] if has_proj else model_cfg["text_cfg"].get("width")) \
            if text is None or isinstance(text, TextTransformer) else None
        super().__init__(spec, kind, model_cfg["embed_dim"], image_size=size, mean=pp.get("mean", OPENAI_MEAN),
                         std=pp.get("std", OPENAI_STD), token_dim=tok_dim, untrained=untrained)
        self.model, self.tokenizer, self.model_cfg = model, tokenizer, deepcopy(model_cfg)
        ctx = text.context_length if isinstance(text, TextTransformer) else getattr(model, "context_length", None)
        self.context_length = None if ctx is None else int(ctx)

    def token_count(self, text: str) -> int:
        if isinstance(self.tokenizer, SimpleTokenizer):
            return len(self.tokenizer.encode(text)) + 2  # start and end tokens
        tok = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
        if tok is None:
            self._unsupported("token_count (this tokenizer)")
        return len(tok(self.tokenizer.clean_fn(text), truncation=False, verbose=False)["input_ids"])

    def _encode_images(self, x):
        return self.model.encode_image(x, normalize=True)

    def _encode_texts(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)

    def _token_states(self, texts, max_length):
        m = self.model
        text = getattr(m, "text", None)
        if isinstance(text, TextTransformer):  # CustomTextCLIP / CoCa: positions are sliced to the length
            ids = self.tokenizer(texts, context_length=min(max_length, text.context_length)).to(self.device)
            x, attn = text._embeds(ids)
            x = text.transformer(x, attn_mask=attn)
            if text.cls_emb is not None:
                x = x[:, :-1]  # CoCa appends a class token
            x, proj, pad = text.ln_final(x), text.text_projection, text.pad_id
        elif text is None:  # plain CLIP: always runs the full context (causal, so the prefix is unchanged)
            ctx = m.context_length
            ids = self.tokenizer(texts, context_length=min(max_length, ctx)).to(self.device)
            cast = m.transformer.get_cast_dtype()
            x = m.token_embedding(F.pad(ids, (0, ctx - ids.shape[1]))).to(cast) + m.positional_embedding.to(cast)
            x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))[:, :ids.shape[1]]
            proj, pad = m.text_projection, 0
        else:
            self._unsupported("token_states (Hugging Face text towers inside open_clip)")
        if proj is not None:
            x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        eot = getattr(self.tokenizer, "eot_token_id", None)
        if eot is None:
            return x, ids != pad
        # CLIP BPE: id 0 is both '!' and the pad id, so the mask ends at the (first) end token instead
        pos = torch.arange(ids.shape[1], device=ids.device)
        return x, pos[None] <= (ids == eot).int().argmax(-1, keepdim=True)

    def dense_tokens(self, x01: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Dense CLIP features: (N, 3, H, W) in [0, 1] -> (N, E, g, g) float32, g = image_size / patch.

        Every patch token of the last block through ``ln_post`` and the image projection — the tokens in CLIP's
        joint image-text space that CAT-Seg builds its cost volume from (TGC-Net's F_clip), not normalised.
        """
        visual = self.model.visual
        if not self.supports_dense_tokens:
            self._unsupported("dense_tokens (its image tower is not a plain ViT)")

        def run(xb):
            x = self.preprocess_images(xb)
            tokens = visual.forward_intermediates(x, indices=1, intermediates_only=True,
                                                  output_fmt="NLC")["image_intermediates"][-1]
            tokens = visual.ln_post(tokens)
            if visual.proj is not None:
                tokens = tokens @ visual.proj
            g = x.shape[-1] // visual.patch_size[1]
            return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, g, g).float()

        with torch.no_grad():
            return torch.cat([run(x01[i:i + batch_size]) for i in range(0, x01.shape[0], batch_size)])

    @property
    def supports_dense_tokens(self) -> bool:
        visual = self.model.visual
        return isinstance(visual, VisionTransformer) and visual.attn_pool is None

    @property
    def patch_size(self) -> int | None:
        p = getattr(self.model.visual, "patch_size", None)
        return None if p is None else int(p[0] if isinstance(p, (tuple, list)) else p)

    def save(self, directory) -> str:
        """Write open_clip's ``local-dir:`` layout; returns ``openclip:local-dir:<dir>`` (``coca:`` for CoCa)."""
        import safetensors.torch
        from open_clip.push_to_hf_hub import save_config_for_hf
        d = Path(directory).expanduser().resolve()
        d.mkdir(parents=True, exist_ok=True)
        save_config_for_hf(self.model, d / CONFIG_NAME, model_config=self.model_cfg)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        safetensors.torch.save_file(sd, str(d / WEIGHTS_NAME))
        return f"{'coca' if isinstance(self.model, CoCa) else 'openclip'}:local-dir:{d}"


class CocaEncoder(OpenClipEncoder):
    """CoCa: OpenClipEncoder + captions. generate_captions: (N,3,H,W) -> N strings; embed_captions -> (N, E)."""

    def __init__(self, spec, kind, model, tokenizer, model_cfg, untrained=False, generation: dict | None = None):
        super().__init__(spec, kind, model, tokenizer, model_cfg, untrained)
        self.generation = {**GENERATION_DEFAULTS, **(generation or {})}
        g = self.generation
        if g["seq_len"] <= g["min_seq_len"]:
            raise EncoderSpecError(f"{spec!r}: seq_len ({g['seq_len']}) must be > min_seq_len ({g['min_seq_len']})")
        if g["generation"] == "beam" and (g["beams"] < 2 or g["beams"] % g["beam_groups"]):
            raise EncoderSpecError(f"{spec!r}: beam search needs beams >= 2 and divisible by beam_groups "
                                   f"(got beams={g['beams']}, beam_groups={g['beam_groups']})")
        if isinstance(tokenizer, SimpleTokenizer):
            self._sot, self._eot = tokenizer.sot_token_id, tokenizer.eot_token_id
        else:  # HF tokenizer (e.g. coca_roberta)
            t = tokenizer.tokenizer
            self._sot = t.bos_token_id if t.bos_token_id is not None else t.cls_token_id
            self._eot = t.eos_token_id if t.eos_token_id is not None else t.sep_token_id
        self._pad = model.pad_id

    def _generate_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (n,3,S,S) -> token ids (n, <=seq_len) starting with the start token."""
        g, m = self.generation, self.model
        _, embs = m._encode_image(x)
        if g["generation"] == "beam":
            # open_clip's beam search needs transformers' BeamSearchScorer (gone in transformers 5): the same search
            # of our own, with each image encoded once rather than once per beam
            beams = embs.repeat_interleave(g["beams"], 0)
            return group_beam_search(lambda ids: self.next_token_logits(ids, beams), x.shape[0], self._sot,
                                     self._eot, self._pad, g["seq_len"], g["min_seq_len"], g["beams"],
                                     g["beam_groups"], x.device)
        out = torch.full((x.shape[0], 1), self._sot, dtype=torch.long, device=x.device)
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        while out.shape[1] < g["seq_len"] and not done.all():
            logits = self.next_token_logits(out, embs).float()
            if out.shape[1] < g["min_seq_len"]:
                logits[:, self._eot] = float("-inf")
            nxt = logits.argmax(-1)
            if out.shape[1] + 1 == g["seq_len"]:
                nxt.fill_(self._eot)
            nxt = torch.where(done, torch.full_like(nxt, self._pad), nxt)
            out = torch.cat((out, nxt[:, None]), 1)
            done |= nxt == self._eot
        return out

    def next_token_logits(self, ids: torch.Tensor, image_embs: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of the token after ``ids`` (n, L): ``CoCa.forward(...)["logits"][:, -1]``, with the
        decoder's final norm and vocabulary projection applied to the last position only. CoCa.forward projects
        every position onto the 49408-token vocabulary at every step, which costs more than the text tower and
        decoder of a small model (and ~18% of CoCa ViT-L/14's per-token work); the blocks below are
        ``MultimodalTransformer.forward``'s."""
        m = self.model
        _, tokens = m._encode_text(ids)
        dec = m.text_decoder
        if not dec.batch_first:
            tokens, image_embs = tokens.permute(1, 0, 2), image_embs.permute(1, 0, 2)
        length = ids.shape[1]
        for block, cross in zip(dec.resblocks, dec.cross_attn):
            tokens = block(tokens, attn_mask=dec.attn_mask[:length, :length])
            tokens = cross(tokens, k_x=image_embs, v_x=image_embs)
        last = dec.ln_final(tokens[:, -1] if dec.batch_first else tokens[-1])
        return last @ dec.text_projection if dec.text_projection is not None else last

    def _decode(self, ids: torch.Tensor) -> str:
        ids = [int(i) for i in ids]
        if isinstance(self.tokenizer, SimpleTokenizer):
            txt = self.tokenizer.decode(ids).split("<end_of_text>")[0].replace("<start_of_text>", "")
        else:
            txt = self.tokenizer.tokenizer.decode(ids, skip_special_tokens=True)
        return " ".join(txt.split())

    def generate_captions(self, x01: torch.Tensor, batch_size: int = 16) -> list[str]:
        caps: list[str] = []
        with torch.no_grad():
            for i in range(0, x01.shape[0], batch_size):
                caps += [self._decode(r) for r in self._generate_ids(self.preprocess_images(x01[i:i + batch_size]))]
        return caps

    def embed_captions(self, x01: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Caption each image, strip start/end tokens, ``encode_text(tokenize(caption))``, L2-normalised."""
        return self.embed_texts(self.generate_captions(x01, batch_size), batch_size=max(batch_size, 64))


def load(spec: str, kind: str, arg: str, opts: dict) -> OpenClipEncoder:
    """``openclip:``/``coca:`` + ``<model>@<pretrained>`` | ``<model>?random=1`` | ``hf-hub:org/repo`` |
    ``local-dir:/path`` (locations already absolute: ``registry.resolved_parts``)."""
    opts = dict(opts)
    random_init = bool(opts.pop("random", False))
    example = f"{kind}:local-dir:/path/to/dir" if kind == "coca" else "openclip:ViT-B-32@laion2b_s34b_b79k"
    schema, ident = open_clip.factory.parse_model_name(arg)
    pretrained = None
    if schema == "local-dir":
        d = Path(ident).expanduser()
        if not d.is_dir():
            raise EncoderSpecError(f"encoder spec {spec!r}: directory {str(d)!r} not found (expected open_clip's "
                                   f"local-dir layout: {CONFIG_NAME} + {WEIGHTS_NAME}); e.g. {example!r}")
        if not (d / CONFIG_NAME).is_file():
            raise EncoderSpecError(f"encoder spec {spec!r}: {CONFIG_NAME} missing in {str(d)!r}; e.g. {example!r}")
        if open_clip.factory._find_checkpoint_in_dir(d) is None:
            raise EncoderSpecError(f"encoder spec {spec!r}: no weights file (*.safetensors/*.bin/*.pth) in {str(d)!r}")
        name = f"local-dir:{d}"
        model_cfg = json.loads((d / CONFIG_NAME).read_text())["model_cfg"]
    elif schema == "hf-hub":
        name = arg
        model_cfg = None
    else:
        name, _, pretrained = arg.partition("@")
        if name.replace("/", "-") not in open_clip.list_models():
            raise EncoderSpecError(f"encoder spec {spec!r}: unknown open_clip model {name!r} (see "
                                   f"open_clip.list_models()); e.g. {example!r}")
        tags = open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))
        if pretrained and pretrained not in tags and not Path(pretrained).expanduser().is_file():
            raise EncoderSpecError(f"encoder spec {spec!r}: pretrained {pretrained!r} is neither a tag of {name} "
                                   f"({', '.join(tags) or 'none'}) nor an existing weights file")
        pretrained = str(Path(pretrained).expanduser()) if pretrained and pretrained not in tags else pretrained
        model_cfg = open_clip.get_model_config(name.replace("/", "-"))
    model = open_clip.create_model(name, pretrained=pretrained or None, device="cpu")
    if model_cfg is None:
        model_cfg = open_clip.get_model_config(name)
    tokenizer = open_clip.get_tokenizer(name)
    if schema is None and not pretrained and not random_init:  # registry.check_available refuses this first
        raise EncoderSpecError(f"encoder spec {spec!r} names no pretrained weights; add @<tag> or ?random=1")
    untrained = schema is None and not pretrained
    if kind == "coca":
        if not isinstance(model, CoCa):
            raise EncoderSpecError(f"encoder spec {spec!r}: {name!r} is not a CoCa model; use 'openclip:{arg}'")
        return CocaEncoder(spec, kind, model, tokenizer, model_cfg, untrained, generation=opts)
    return OpenClipEncoder(spec, kind, model, tokenizer, model_cfg, untrained)
