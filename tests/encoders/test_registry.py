"""Behaviour of the frozen-encoder registry: every kind loads, real loaders read what save_tiny_encoder writes
(hub disabled, exact equality), encoders are frozen, tiny weights are deterministic across processes, bad specs
fail clearly, CoCa beam search captions."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from nnunet_textguided.encoders import (EncoderSpecError, FrozenEncoder, list_encoder_kinds, load_encoder,
                                        save_tiny_encoder)
from nnunet_textguided.encoders.registry import parse_spec

TINY = ["tiny-clip", "tiny-coca", "tiny-pmcclip", "tiny-bert", "tiny-dinov2"]
CLIP_FAMILY = {"openclip", "coca", "pmcclip", "tiny-clip", "tiny-coca", "tiny-pmcclip"}
IMAGE_KINDS = CLIP_FAMILY | {"tiny-dinov2"}
TEXT_KINDS = {"openclip", "coca", "minilm", "tiny-clip", "tiny-coca", "tiny-bert"}
TEXTS = ["a CT scan of the liver!", "left kidney tumour", "", "x " * 300]
GREEDY = "?generation=greedy&seq_len=8"  # tiny-coca's own generation settings


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """2-core boxes with other jobs running: intra-op threads oversubscribe badly (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return {k: load_encoder(k) for k in TINY}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return {k: save_tiny_encoder(k, tmp_path_factory.mktemp(k)) for k in TINY}


@pytest.fixture
def offline(monkeypatch):
    """Hub disabled: offline env vars + any socket connection fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)

    def no_network(*a, **k):
        raise OSError("network access attempted in an offline test")
    monkeypatch.setattr(socket.socket, "connect", no_network)


def images(n=6, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def check_encoder(enc: FrozenEncoder, kind: str):
    assert isinstance(enc, FrozenEncoder) and enc.kind == kind
    x = images()
    if kind in IMAGE_KINDS:
        assert isinstance(enc.image_size, int)
        pre = enc.preprocess_images(x)
        assert pre.shape == (6, 3, enc.image_size, enc.image_size)
        y = enc.embed_images(x, batch_size=4)
        assert y.shape == (6, enc.embed_dim) and y.dtype == torch.float32 and torch.isfinite(y).all()
        if kind in CLIP_FAMILY:
            torch.testing.assert_close(y.norm(dim=-1), torch.ones(6))
        assert enc.embed_images(x[:0]).shape == (0, enc.embed_dim)
    else:
        assert enc.image_size is None
        with pytest.raises(NotImplementedError, match=kind):
            enc.embed_images(x)
    if kind in TEXT_KINDS:
        t = enc.embed_texts(TEXTS, batch_size=3)
        assert t.shape == (4, enc.embed_dim) and t.dtype == torch.float32 and torch.isfinite(t).all()
        if kind in CLIP_FAMILY or kind == "minilm":
            torch.testing.assert_close(t.norm(dim=-1), torch.ones(4))
        s, m = enc.token_states(TEXTS, max_length=12)
        assert s.shape == (4, 12, enc.token_dim) and m.shape == (4, 12) and m.dtype == torch.bool
        assert torch.isfinite(s).all() and (s[~m] == 0).all()
        assert m[:, 0].all() and m[3].all() and 1 <= m[2].sum() <= 2 < m[0].sum() < 12  # long text truncated
        assert (m.sum(1) - 1 == m.int().cumsum(1).argmax(1)).all()  # masks are prefixes (no holes at '!')
        assert enc.embed_texts([]).shape == (0, enc.embed_dim)
    else:
        with pytest.raises(NotImplementedError, match=kind):
            enc.embed_texts(TEXTS)
        with pytest.raises(NotImplementedError, match=kind):
            enc.token_states(TEXTS, 8)
    if kind in ("coca", "tiny-coca"):
        caps = enc.generate_captions(x[:3])
        assert len(caps) == 3 and all(isinstance(c, str) and c for c in caps)
        assert not any("start_of_text" in c or "end_of_text" in c for c in caps)
        e = enc.embed_captions(x[:3])
        assert e.shape == (3, enc.embed_dim)
        torch.testing.assert_close(e, enc.embed_texts(caps))
    else:
        with pytest.raises(NotImplementedError, match=kind):
            enc.generate_captions(x)
        with pytest.raises(NotImplementedError, match=kind):
            enc.embed_captions(x)


def test_list_encoder_kinds():
    kinds = list_encoder_kinds()
    assert {k for k, _, _ in kinds} == {"openclip", "coca", "pmcclip", "hf", "minilm", *TINY}
    for kind, example, desc in kinds:
        assert parse_spec(example)[0] == kind and desc


@pytest.mark.parametrize("kind", TINY)
def test_tiny_kinds(tiny, kind):
    enc = tiny[kind]
    assert enc.spec == kind and enc.untrained and enc.embed_dim == 32
    assert enc.image_size == {"tiny-dinov2": 28, "tiny-bert": None}.get(kind, 32)
    check_encoder(enc, kind)


@pytest.mark.parametrize("tiny_kind,prefix,kind", [
    ("tiny-clip", "openclip:local-dir:", "openclip"), ("tiny-coca", "coca:local-dir:", "coca"),
    ("tiny-pmcclip", "pmcclip:", "pmcclip"), ("tiny-bert", "hf:", "hf"), ("tiny-dinov2", "hf:", "hf")])
def test_real_loaders_roundtrip(tiny, saved, offline, tiny_kind, prefix, kind):
    spec = saved[tiny_kind] + (GREEDY if kind == "coca" else "")
    assert spec.startswith(prefix)
    enc = load_encoder(spec)
    assert enc.spec == spec and enc.kind == kind
    assert enc.untrained  # saved with its stand-in marker: still reported untrained in its real format
    ref = tiny[tiny_kind]
    assert enc.weight_hash() == ref.weight_hash()
    assert (enc.embed_dim, enc.image_size, enc.token_dim) == (ref.embed_dim, ref.image_size, ref.token_dim)
    x = images()
    if enc.image_size:
        torch.testing.assert_close(enc.embed_images(x), ref.embed_images(x), rtol=0, atol=1e-6)
    if tiny_kind in ("tiny-clip", "tiny-coca", "tiny-bert"):
        torch.testing.assert_close(enc.embed_texts(TEXTS), ref.embed_texts(TEXTS), rtol=0, atol=1e-6)
        for a, b in zip(enc.token_states(TEXTS, 20), ref.token_states(TEXTS, 20)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if kind == "coca":
        assert enc.generate_captions(x) == ref.generate_captions(x)
    if kind != "hf":  # hf text/vision: kind 'hf' checks both towers' behaviour here
        check_encoder(enc, kind)
    else:
        if enc.image_size:
            assert torch.isfinite(enc.embed_images(x)).all()
            with pytest.raises(NotImplementedError, match="hf"):
                enc.embed_texts(TEXTS)
        else:
            assert enc.embed_texts(TEXTS).shape == (4, 32)
            with pytest.raises(NotImplementedError, match="hf"):
                enc.embed_images(x)


def test_openclip_loader_accepts_coca_dir_and_coca_rejects_clip(saved, offline):
    enc = load_encoder(saved["tiny-coca"].replace("coca:", "openclip:", 1))
    assert enc.kind == "openclip"
    with pytest.raises(NotImplementedError, match="openclip"):
        enc.generate_captions(images(2))
    spec = saved["tiny-clip"].replace("openclip:", "coca:", 1)
    with pytest.raises(EncoderSpecError, match="not a CoCa"):
        load_encoder(spec)


def test_pmcclip_release_format(tiny, saved, tmp_path, offline):
    """PMC-OA ships a bare state dict, possibly 'module.'/'visual.'-prefixed; config via ?config=."""
    ref, src = tiny["tiny-pmcclip"], saved["tiny-pmcclip"].partition(":")[2]
    sd = torch.load(f"{src}/image_encoder(resnet50).pth", weights_only=True)
    weights = tmp_path / "image_encoder(resnet50).pth"
    torch.save({f"module.visual.{k}": v for k, v in sd.items()}, weights)
    cfg = tmp_path.parent / "tiny_pmc_config.json"
    cfg.write_text(json.dumps(json.load(open(f"{src}/open_clip_config.json"))["model_cfg"]))  # bare model cfg
    enc = load_encoder(f"pmcclip:{weights}?config={cfg}")
    assert enc.weight_hash() == ref.weight_hash()
    torch.testing.assert_close(enc.embed_images(images()), ref.embed_images(images()), rtol=0, atol=1e-6)
    with pytest.raises(EncoderSpecError, match="do not fit"):  # default RN50/768 config vs tiny weights
        load_encoder(f"pmcclip:{tmp_path}")


def test_pmcclip_default_architecture():
    from nnunet_textguided.encoders.pmcclip import build_visual, default_config
    cfg = default_config()["model_cfg"]
    v = build_visual(cfg)
    assert [len(layer) for layer in (v.layer1, v.layer2, v.layer3, v.layer4)] == [3, 4, 6, 3]
    assert v.attnpool.num_heads == 32 and v.attnpool.c_proj.out_features == 768 and v.image_size == 224
    assert v.conv1.out_channels == 32  # width 64, CLIP 3-conv stem


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-coca", "tiny-bert", "tiny-dinov2", "tiny-pmcclip"])
def test_frozen(tiny, kind):
    enc = tiny[kind]
    assert all(not p.requires_grad for p in enc.parameters())
    parent = nn.Module()
    parent.enc = enc
    parent.train()
    enc.train(True)
    assert not enc.training and not any(m.training for m in enc.modules())
    head = nn.Linear(enc.embed_dim, 1)
    if enc.image_size:
        x = images(4).requires_grad_(True)
        y = enc.embed_images(x)
    else:
        y = enc.embed_texts(TEXTS)
    assert not y.requires_grad and not torch.is_inference(y)
    head(y).sum().backward()
    assert head.weight.grad is not None and all(p.grad is None for p in enc.parameters())


def test_batching_device_dtype(tiny):
    enc = tiny["tiny-clip"]
    x = images(10)
    ref = enc.embed_images(x)
    torch.testing.assert_close(enc.embed_images(x, batch_size=3), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(enc.embed_images(x.double()), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(enc.embed_images(x[:, :1].expand(-1, 3, -1, -1)), enc.embed_images(x[:, :1]))
    e64 = load_encoder("tiny-clip").to(torch.float64)
    assert e64.dtype == torch.float64 and e64.device.type == "cpu"
    y = e64.embed_images(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(e64.embed_texts(TEXTS), enc.embed_texts(TEXTS), rtol=0, atol=1e-4)


def test_tiny_weights_deterministic_across_processes(tiny):
    state = torch.get_rng_state()
    again = load_encoder("tiny-coca")
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    x = images(8)
    assert again.weight_hash() == tiny["tiny-coca"].weight_hash()
    assert again.generate_captions(x) == tiny["tiny-coca"].generate_captions(x)
    code = ("import torch, json; from nnunet_textguided.encoders import load_encoder;"
            "torch.manual_seed(123); junk = torch.randn(4096, 256);"  # different RNG state & heap contents
            f"print(json.dumps({{k: load_encoder(k).weight_hash() for k in {TINY!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {k: tiny[k].weight_hash() for k in TINY}


def test_hashes_differ_between_kinds_and_options(tiny):
    hashes = {tiny[k].weight_hash() for k in TINY}
    assert len(hashes) == len(TINY)
    e48 = load_encoder("tiny-clip?embed_dim=48")
    assert e48.embed_dim == 48 and e48.embed_images(images(2)).shape == (2, 48)
    other_seed = load_encoder("tiny-clip?seed=1")
    assert len({e48.weight_hash(), other_seed.weight_hash(), tiny["tiny-clip"].weight_hash()}) == 3
    # generation options do not change weights
    assert load_encoder("tiny-coca?seq_len=6").weight_hash() == tiny["tiny-coca"].weight_hash()


def test_minilm(offline):
    enc = load_encoder("minilm")
    assert enc.kind == "minilm" and enc.embed_dim == 384 and not enc.untrained
    check_encoder(enc, "minilm")
    e = enc.embed_texts(["A CT scan showing a tumour in the liver.", "Hepatic lesion on computed tomography.",
                         "The football match ended in a draw."])
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3


def test_minilm_matches_sentence_transformers(offline):
    st = pytest.importorskip("sentence_transformers")
    from nnunet_textguided.encoders.minilm import model_dir
    texts = ["a liver tumour", "kidney", "word " * 400]
    ref = st.SentenceTransformer(str(model_dir()), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(load_encoder("minilm").embed_texts(texts), ref.float(), rtol=0, atol=1e-5)


def test_weights_in_a_real_format_are_trained_unless_marked(tmp_path, offline):
    from nnunet_textguided.encoders.registry import UNTRAINED_MARKER
    spec = save_tiny_encoder("tiny-bert", tmp_path / "bert")
    assert (tmp_path / "bert" / UNTRAINED_MARKER).is_file() and load_encoder(spec).untrained
    (tmp_path / "bert" / UNTRAINED_MARKER).unlink()  # e.g. a real fine-tuned model saved with save_pretrained
    assert not load_encoder(spec).untrained


@pytest.mark.parametrize("spec,match", [
    ("nosuchkind:x", "unknown kind"),
    ("hf:/does/not/exist", "not found"),
    ("pmcclip:/missing/file.pth", "not found"),
    ("tiny-clip?colour=red", "unknown option"),
    ("tiny-clip?embed_dim=abc", "embed_dim"),
    ("tiny-clip?embed_dim", "key=value"),
    ("coca:local-dir:/no/such/dir", "not found"),
    ("coca:tiny-coca?generation=beam&beams=3&beam_groups=2", "open_clip model"),
    ("openclip:NoSuchModel-B-99", "unknown open_clip model"),
    ("openclip:ViT-B-32@no_such_tag", "neither a tag"),
    ("openclip", "needs an argument"),
    ("minilm:extra", "takes no"),
    ("hf:/does/not/exist?x=1", "unknown option"),
])
def test_bad_specs(spec, match):
    with pytest.raises(EncoderSpecError, match=match) as err:
        load_encoder(spec)
    # a malformed spec shows a valid one; weights that are not here say where to get them and where they go
    assert repr(spec) in str(err.value) and ("xample of a valid" in str(err.value) or
                                             ("Get it from" in str(err.value) and "put it" in str(err.value)))


def test_bad_generation_options(saved):
    with pytest.raises(EncoderSpecError, match="divisible"):
        load_encoder("tiny-coca?generation=beam&beams=3&beam_groups=2")
    with pytest.raises(EncoderSpecError, match="min_seq_len"):
        load_encoder("tiny-coca?seq_len=4&min_seq_len=5")
    with pytest.raises(EncoderSpecError, match="not a tiny kind"):
        save_tiny_encoder("minilm", "/tmp/never-written")


def test_coca_beam_search(tiny):
    """CoCa's beam-search captions (the package's group beam search, encoders/beam_search.py) are deterministic
    and batch-independent, and embed to unit vectors."""
    enc = load_encoder("tiny-coca?generation=beam&beams=4&beam_groups=2&seq_len=8&min_seq_len=3")
    assert enc.weight_hash() == tiny["tiny-coca"].weight_hash()
    x = images(5)
    caps = enc.generate_captions(x, batch_size=2)
    assert len(caps) == 5 and all(isinstance(c, str) and c for c in caps)
    assert caps == enc.generate_captions(x, batch_size=5)
    e = enc.embed_captions(x)
    assert e.shape == (5, 32) and not e.requires_grad
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(5))


def test_coca_greedy_steps_are_coca_forwards_last_logits(tiny):
    """Greedy captioning projects only the last position onto the vocabulary: its logits are CoCa.forward's last
    ones for every prefix length, and the captions are those of the loop over CoCa.forward."""
    enc = tiny["tiny-coca"]
    m, x = enc.model, enc.preprocess_images(images(4))
    with torch.no_grad():
        latent, embs = m._encode_image(x)
        for length in (1, 3, 7):
            ids = torch.randint(1, 49000, (4, length))
            ids[:, 0] = enc._sot
            ref = m(x, ids, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
            torch.testing.assert_close(enc.next_token_logits(ids, embs), ref)
        out = torch.full((4, 1), enc._sot)
        while out.shape[1] < enc.generation["seq_len"] - 1:  # the loop over CoCa.forward; the last token is eot
            logits = m(x, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
            if out.shape[1] < enc.generation["min_seq_len"]:
                logits[:, enc._eot] = float("-inf")
            out = torch.cat((out, logits.argmax(-1, keepdim=True)), 1)
    assert not (out[:, 1:] == enc._eot).any()  # these random-weight captions run to full length
    caps = [enc._decode(r) for r in out]
    assert enc.generate_captions(images(4)) == caps


def test_clip_dense_tokens_are_the_last_blocks_patch_tokens_in_the_joint_space(tiny, saved, offline):
    """TGC-Net's F_clip: every patch token of the last block through ln_post and the projection; the real loader
    (an open_clip local-dir saved from the tiny model) gives the same tokens."""
    enc, x = tiny["tiny-clip"], images(3)
    assert enc.supports_dense_tokens and enc.patch_size == 8
    t = enc.dense_tokens(x, batch_size=2)
    g = enc.image_size // enc.patch_size
    assert t.shape == (3, enc.embed_dim, g, g) and t.dtype == torch.float32
    v = enc.model.visual
    with torch.no_grad():
        ref = v.ln_post(v.transformer(v._embeds(enc.preprocess_images(x)))[:, 1:]) @ v.proj
    torch.testing.assert_close(t, ref.transpose(1, 2).reshape(3, -1, g, g))
    torch.testing.assert_close(load_encoder(saved["tiny-clip"]).dense_tokens(x), t)
    for kind in ("tiny-coca", "tiny-pmcclip", "tiny-dinov2"):  # attention-pooled / CNN / not open_clip
        assert not tiny[kind].supports_dense_tokens
    with pytest.raises(NotImplementedError, match="dense_tokens"):
        tiny["tiny-coca"].dense_tokens(x)
