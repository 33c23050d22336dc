"""Weight-free encoder structures: parameter counts equal the real models', embed_dim equals load_encoder's, meta
FLOPs equal FLOPs measured with real tensors, CoCa caption FLOPs follow the documented lower bound, and nothing
touches the network."""
from __future__ import annotations

import socket
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nnunet_textguided.encoders import EncoderSpecError, load_encoder, save_tiny_encoder
from nnunet_textguided.encoders.structure import KNOWN_HF_MODELS, encoder_structure

TINY = ["tiny-clip", "tiny-coca", "tiny-pmcclip", "tiny-bert", "tiny-dinov2"]
TEXTS = ["a CT scan of the liver", "left kidney tumour with a cyst"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Hub disabled and any socket connection fails: counting must never download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def no_network(*a, **k):
        raise OSError("network access attempted in an offline test")
    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return {k: save_tiny_encoder(k, tmp_path_factory.mktemp(k)) for k in TINY}


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def real_flops(fn) -> int:
    """FLOPs with real CPU tensors, with the fused attention paths (invisible to the counter) switched off."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return fc.get_total_flops()


def test_vit_b32_matches_open_clip():
    enc = load_encoder("openclip:ViT-B-32?random=1")  # no tag: random init on purpose, offline
    st = encoder_structure("openclip:ViT-B-32@laion2b_s34b_b79k")  # the tag only names weights
    assert st.num_parameters() == numel(enc.model)
    assert st.num_parameters(["image"]) == numel(enc.model.visual)
    assert st.num_parameters(["text", "other"]) == numel(enc.model) - numel(enc.model.visual)
    assert (st.embed_dim, st.image_size, st.context_length) == (enc.embed_dim, enc.image_size, 77)
    assert all(p.is_meta for t in st.towers.values() for p in t.parameters())


@pytest.mark.parametrize("spec", TINY + ["tiny-clip?embed_dim=48", "tiny-bert?embed_dim=40"])
def test_tiny_kinds(spec):
    enc, st = load_encoder(spec), encoder_structure(spec)
    assert (st.embed_dim, st.image_size) == (enc.embed_dim, enc.image_size)
    assert st.num_parameters() == numel(enc.model)


@pytest.mark.parametrize("kind", TINY)
def test_saved_tiny_dirs(saved, kind):
    spec = saved[kind] + ("?generation=greedy&seq_len=8" if kind == "tiny-coca" else "")
    enc, st = load_encoder(spec), encoder_structure(spec)
    assert (st.embed_dim, st.image_size) == (enc.embed_dim, enc.image_size)
    assert st.num_parameters() == numel(enc.model)
    if kind == "tiny-bert":
        assert st.context_length == enc.max_length == 64


def test_pmcclip_without_weights():
    st = encoder_structure("pmcclip:/nowhere/image_encoder(resnet50).pth")  # counting needs no weights
    assert (st.embed_dim, st.image_size, list(st.towers)) == (768, 224, ["image"])
    rn50 = encoder_structure("openclip:RN50")  # same ModifiedResNet-50 with a 1024-d attention-pool output
    assert rn50.num_parameters(["image"]) - st.num_parameters() == (1024 - 768) * (2048 + 1)


def test_known_hub_configs():
    dino, bert = encoder_structure("hf:facebook/dinov2-base"), encoder_structure("hf:bert-base-uncased")
    assert dino.num_parameters() == pytest.approx(86.6e6, rel=5e-3)
    assert (dino.embed_dim, dino.image_size, list(dino.towers)) == (768, 224, ["image"])
    assert dino.flops("embed_images", 1, image_size=448) > 4 * dino.flops("embed_images", 1)  # pos. interpolation
    assert bert.num_parameters() == pytest.approx(109.48e6, rel=1e-4)
    assert (bert.embed_dim, bert.context_length, list(bert.towers)) == (768, 512, ["text"])
    assert encoder_structure("hf:emilyalsentzer/Bio_ClinicalBERT").num_parameters() == \
        bert.num_parameters() - (30522 - 28996) * 768


def test_minilm_matches_loader():
    enc, st = load_encoder("minilm"), encoder_structure("minilm")
    assert (st.embed_dim, st.context_length, st.num_parameters()) == (384, enc.max_length, numel(enc.model))


@pytest.mark.parametrize("spec, match", [
    ("openclip:hf-hub:org/repo", "local-dir"),
    ("coca:hf-hub:org/repo", "needs the model config offline"),
    ("hf:someone/unknown-model", "facebook/dinov2-base"),
    ("openclip:NoSuchModel", "unknown open_clip model"),
    ("coca:ViT-B-32", "not a CoCa model"),
    ("openclip:local-dir:/nowhere", "open_clip_config.json"),
])
def test_bad_specs(spec, match):
    with pytest.raises(EncoderSpecError, match=match):
        encoder_structure(spec)


def test_unknown_tower_and_method():
    st = encoder_structure("tiny-pmcclip")
    with pytest.raises(KeyError, match="text"):
        st.num_parameters(["text"])
    with pytest.raises(NotImplementedError, match="embed_texts"):
        st.flops("embed_texts", 1)


@pytest.mark.parametrize("spec, method", [("tiny-clip", "embed_images"), ("tiny-clip", "embed_texts"),
                                          ("tiny-coca", "embed_images"), ("tiny-pmcclip", "embed_images"),
                                          ("tiny-dinov2", "embed_images"), ("tiny-bert", "embed_texts")])
def test_meta_flops_equal_real_flops(spec, method):
    enc, st = load_encoder(spec), encoder_structure(spec)
    if method == "embed_images":
        real = real_flops(lambda: enc.embed_images(torch.rand(3, 3, 40, 40)))
    else:
        real = real_flops(lambda: enc.embed_texts(TEXTS))
        if enc.kind == "tiny-bert":  # HF pads to the longest text, not to the context
            st = replace(st, context_length=len(enc.tokenizer(TEXTS, padding=True)["input_ids"][0]))
    assert real > 0 and st.flops(method, 3 if method == "embed_images" else len(TEXTS)) == real


@pytest.mark.parametrize("spec, method", [("tiny-clip", "embed_images"), ("tiny-bert", "token_states"),
                                          ("tiny-coca", "embed_captions")])
def test_flops_linear_in_n(spec, method):
    st = encoder_structure(spec)
    assert st.flops(method, 5) == 5 * st.flops(method, 1) > 0


def test_coca_caption_flops_lower_bound():
    # min_seq_len=7 forces full-length captions: the real greedy loop re-runs the prefix at every step
    spec = "tiny-coca?generation=greedy&seq_len=8&min_seq_len=7"
    enc, st = load_encoder(spec), encoder_structure(spec)
    x = torch.rand(2, 3, 32, 32)
    bound = st.flops("embed_captions", 2)
    assert st.flops("embed_images", 2) + st.flops("embed_texts", 2) < bound < real_flops(lambda: enc.embed_captions(x))
    # beam search: text tower + decoder pass once per beam
    beam = encoder_structure(spec.replace("greedy", "beam") + "&beams=6&beam_groups=3")
    decode = bound - st.flops("embed_images", 2) - st.flops("embed_texts", 2)
    assert beam.flops("embed_captions", 2) == bound + 5 * decode


def test_known_hf_models_listed():
    assert {"facebook/dinov2-small", "facebook/dinov2-giant", "bert-base-uncased",
            "emilyalsentzer/Bio_ClinicalBERT"} <= set(KNOWN_HF_MODELS)
    giant = encoder_structure("hf:facebook/dinov2-giant")  # SwiGLU FFN
    assert giant.embed_dim == 1536 and giant.num_parameters() == pytest.approx(1.1365e9, rel=1e-3)
