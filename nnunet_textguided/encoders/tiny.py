"""Tiny random-init encoders (kinds ``tiny-clip``, ``tiny-coca``, ``tiny-pmcclip``, ``tiny-bert``, ``tiny-dinov2``).

Why: tests and CPU demos need every encoder code path (open_clip CLIP/CoCa incl. captioning, PMC-CLIP's
ModifiedResNet, HF BERT/DINOv2) without downloads. Each tiny kind is the *real* architecture class with
small widths/depths, wrapped by the same encoder class as the real kind, so ``save()`` writes the real
on-disk format and the real loader reads it back (``registry.save_tiny_encoder``).

Sizes (defaults, ``?embed_dim=`` changes E, ``?seed=`` the weights): tiny-clip ViT 32 px / patch 8 / width 32 /
2 layers + text width 32 / 2 layers, E 32; tiny-coca the same with an attentional pooler (8 image tokens), a
1-layer multimodal decoder and text/decoder width = E, greedy captions of seq_len 8; tiny-pmcclip
ModifiedResNet layers [1,1,1,1] width 8, 32 px, E 32; tiny-bert 2 x 32 BERT with the MiniLM (bert-base-uncased)
WordPiece vocabulary, 64 positions; tiny-dinov2 2 x 32 DINOv2, 28 px, patch 14. Open_clip tiny models keep
CLIP's BPE vocabulary (49408) so the stock tokenizer and decoder work. Weights are seeded from
(kind, embed_dim, seed) inside ``torch.random.fork_rng``: identical in every process, global RNG untouched.
Note: open_clip 3.3 creates CoCa's ``text_decoder.text_projection`` with ``torch.empty`` and never
initialises it (``MultimodalTransformer.init_parameters`` is not called), so tiny-coca initialises it here;
otherwise its weights would be uninitialised memory and differ between processes.
"""
from __future__ import annotations

import torch

from .base import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, seeded, spec_seed

TINY_KINDS = ("tiny-clip", "tiny-coca", "tiny-pmcclip", "tiny-bert", "tiny-dinov2")
DEFAULT_EMBED_DIM = 32
TINY_GENERATION = dict(generation="greedy", seq_len=8)


def openclip_config(kind: str, e: int) -> dict:
    vision = dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8)
    if kind == "tiny-clip":
        return dict(embed_dim=e, vision_cfg=vision,
                    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
    # CoCa: image tokens (dim E) and text tokens feed the decoder, so text/decoder width = E
    vision.update(attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=9, output_tokens=True)
    return dict(embed_dim=e, vision_cfg=vision,
                text_cfg=dict(context_length=76, vocab_size=49408, width=e, heads=2, layers=2, embed_cls=True,
                              output_tokens=True),
                multimodal_cfg=dict(context_length=76, vocab_size=49408, width=e, heads=2, layers=1,
                                    attn_pooler_heads=2),
                custom_text=True)


def pmcclip_config(e: int) -> dict:
    return {"model_cfg": dict(embed_dim=e, vision_cfg=dict(image_size=32, layers=[1, 1, 1, 1], width=8,
                                                           head_width=64, patch_size=None),
                              text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)),
            "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}


def load(spec: str, kind: str, arg: str, opts: dict):
    e = int(opts.get("embed_dim", DEFAULT_EMBED_DIM))
    seed = spec_seed(kind, e, opts.get("seed", 0))
    if kind in ("tiny-clip", "tiny-coca"):
        from open_clip.tokenizer import SimpleTokenizer
        from .openclip import CocaEncoder, OpenClipEncoder, build_model
        cfg = openclip_config(kind, e)
        with seeded(seed):
            model = build_model(cfg, {"mean": OPENAI_MEAN, "std": OPENAI_STD})
            if kind == "tiny-coca":  # open_clip 3.3 leaves this torch.empty (init_parameters never runs)
                torch.nn.init.normal_(model.text_decoder.text_projection, std=e ** -0.5)
        tok = SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
        if kind == "tiny-clip":
            return OpenClipEncoder(spec, kind, model, tok, cfg, untrained=True)
        gen = {**TINY_GENERATION, **{k: v for k, v in opts.items() if k not in ("embed_dim", "seed")}}
        return CocaEncoder(spec, kind, model, tok, cfg, untrained=True, generation=gen)
    if kind == "tiny-pmcclip":
        from .pmcclip import PmcClipEncoder, build_visual
        cfg = pmcclip_config(e)
        with seeded(seed):
            visual = build_visual(cfg["model_cfg"])
        return PmcClipEncoder(spec, kind, cfg, untrained=True, visual=visual)
    from .hf import HFEncoder
    if kind == "tiny-bert":
        from transformers import BertConfig, BertModel, BertTokenizerFast
        from .minilm import model_dir
        tok = BertTokenizerFast.from_pretrained(str(model_dir()), local_files_only=True, model_max_length=64)
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=e, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=2 * e, max_position_embeddings=64)
        with seeded(seed):
            model = BertModel(cfg)
        return HFEncoder(spec, kind, model, tokenizer=tok, untrained=True)
    if kind == "tiny-dinov2":
        from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
        cfg = Dinov2Config(hidden_size=e, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=28,
                           patch_size=14)
        proc = BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                 do_center_crop=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
        with seeded(seed):
            model = Dinov2Model(cfg)
        return HFEncoder(spec, kind, model, processor=proc, untrained=True)
    raise KeyError(kind)
