"""Slice rendering for the frozen encoders: a large CT slice is shrunk to the encoder's input with antialiasing."""
import torch
import torch.nn.functional as F

from nnunet_textguided.encoders import load_encoder


def test_shrinking_a_large_slice_is_antialiased():
    enc = load_encoder("tiny-pmcclip")
    s = enc.image_size
    assert s < 512
    # the finest pattern a slice holds: alternating rows (thin bone edges, noise); 500 rows: a CT grid that is not a
    # whole multiple of the encoder's
    stripes = (torch.arange(500) % 2).float()[:, None].expand(500, 500)
    x = stripes[None, None].expand(1, 3, 500, 500)
    out = enc.preprocess_images(x).float()
    mean, std = enc._mean.float().view(1, 3, 1, 1), enc._std.float().view(1, 3, 1, 1)
    seen = out * std + mean  # back to [0, 1]
    # antialiased: the stripes average to mid-grey; plain bilinear sampling aliases them into bands of 0s and 1s
    assert (seen - 0.5).abs().max() < 0.05
    aliased = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
    assert (aliased - 0.5).abs().max() > 0.2


def test_enlarging_is_plain_bilinear():
    enc = load_encoder("tiny-pmcclip")
    s = enc.image_size
    x = torch.rand(1, 3, s // 2, s // 2)
    mean, std = enc._mean.float().view(1, 3, 1, 1), enc._std.float().view(1, 3, 1, 1)
    expected = (F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False) - mean) / std
    torch.testing.assert_close(enc.preprocess_images(x).float(), expected)
