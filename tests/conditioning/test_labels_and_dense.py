"""Free-text label selection (--labels) and the dense per-slice ViT features of CDPDNet's DINOv2 branch."""
import pytest
import torch

from nnunet_textguided.conditioning.dense import DenseSliceConditioner
from nnunet_textguided.conditioning.labels import UnknownLabelError, match_labels, split_phrases
from nnunet_textguided.conditioning.slices import get_encoder, render_slices

VOCAB = ["liver", "spleen", "right kidney", "left kidney", "liver tumor"]


def test_paraphrases_select_the_right_label_and_exact_names_need_no_encoder():
    got = match_labels(["kidney on the left", "Right_Kidney", "tumour of the liver", "hepatic", "kidney_l",
                        "right-sided kidney"], VOCAB)
    assert [m.label for m in got] == ["left kidney", "right kidney", "liver tumor", "liver", "left kidney",
                                      "right kidney"]
    assert got[1].score == 1.0 and got[4].score == 1.0  # the merge's normalisation and synonym table
    assert got[0].score - got[0].runner_up_score >= 0.1 and got[0].runner_up != "right kidney"  # side rule


def test_unknown_or_ambiguous_phrases_fail_with_the_known_labels():
    for phrase, why in (("pizza", "< 0.7"), ("kidneys", "ambiguous")):
        with pytest.raises(UnknownLabelError) as e:
            match_labels(["left kidney", phrase], VOCAB)
        msg = str(e.value)
        assert f"'{phrase}'" in msg and why in msg and all(v in msg for v in VOCAB)


def test_phrase_helpers():
    assert split_phrases("left kidney, liver; spleen ,") == ["left kidney", "liver", "spleen"]


def test_dense_features_are_per_slice_token_grids_of_the_last_blocks():
    enc = get_encoder("tiny-dinov2")
    x = torch.randn(2, 1, 5, 20, 24)
    cond = DenseSliceConditioner("tiny-dinov2", (-1.0, 1.0), layers=2, image_size=42)
    x_out, feats = cond(x)
    assert x_out is x and len(feats["dino"]) == 2
    assert all(t.shape == (2, enc.embed_dim, 5, 3, 3) for t in feats["dino"])
    # slice 3 of sample 1 equals the encoder run on that slice alone (slice order and batch layout kept)
    one = enc.hidden_grids(render_slices(x[1, 0, 3:4], (-1.0, 1.0)), 2, 42, normalize=False)
    assert torch.allclose(feats["dino"][1][1, :, 3], one[1][0], atol=1e-5)
    # deeper blocks differ from shallower ones, and the placeholder has the real shapes
    assert not torch.allclose(feats["dino"][0], feats["dino"][1])
    _, ph = cond.placeholder(x, {"tiny-dinov2": enc.embed_dim}, patch=14)
    assert [t.shape for t in ph["dino"]] == [t.shape for t in feats["dino"]]


def test_hidden_grids_checks_its_arguments():
    enc = get_encoder("tiny-dinov2")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc.hidden_grids(torch.rand(1, 3, 28, 28), 1, image_size=30)
    with pytest.raises(ValueError, match="cannot take the last 5"):
        enc.hidden_grids(torch.rand(1, 3, 28, 28), 5)
    with pytest.raises(NotImplementedError):
        get_encoder("minilm").hidden_grids(torch.rand(1, 3, 28, 28), 1)
