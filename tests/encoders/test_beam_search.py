"""CoCa's beam-search captions come from the package's own group beam search (transformers 5 has no
BeamSearchScorer): token for token what open_clip's CoCa.generate gives with transformers 4.x, including
captions that end early, groups that finish, and rows of different lengths."""
import pytest
import torch

from nnunet_textguided.encoders.beam_search import group_beam_search
from nnunet_textguided.encoders.registry import load_encoder


def _open_clip_beam_search_available() -> bool:
    from open_clip import coca_model
    return getattr(coca_model, "_has_transformers", False)


@pytest.mark.skipif(not _open_clip_beam_search_available(), reason="open_clip's beam search needs transformers 4.x")
@pytest.mark.parametrize("eot_scale", [0.0, 1.2, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("options", ["beams=6&beam_groups=3&seq_len=16&min_seq_len=3",
                                     "beams=4&beam_groups=2&seq_len=16&min_seq_len=5&seed=2",
                                     "beams=4&beam_groups=4&seq_len=12&min_seq_len=2&seed=1"])
def test_captions_equal_open_clips_beam_search(options, eot_scale):
    enc = load_encoder(f"tiny-coca?generation=beam&{options}")
    g = enc.generation
    if eot_scale:  # make the end token compete, so that captions end at different lengths
        proj = enc.model.text_decoder.text_projection
        with torch.no_grad():
            columns = torch.randint(0, proj.shape[1], (8,), generator=torch.Generator().manual_seed(1))
            proj[:, enc._eot] = proj[:, columns].sum(1) * eot_scale
    x = enc.preprocess_images(torch.rand(8, 3, 40, 40, generator=torch.Generator().manual_seed(0)))
    ours = enc._generate_ids(x)
    theirs = enc.model.generate(x, generation_type="beam_search", seq_len=g["seq_len"], min_seq_len=g["min_seq_len"],
                                num_beams=g["beams"], num_beam_groups=g["beam_groups"], sot_token_id=enc._sot,
                                eos_token_id=enc._eot, pad_token_id=enc._pad)
    assert torch.equal(ours, theirs)
    if eot_scale >= 1.5 and "beam_groups=4" not in options:  # groups of one beam rarely end here
        assert (ours == enc._eot).any(1).sum() >= 4  # the end-token paths were taken


def test_min_length_and_best_hypothesis_on_a_known_model():
    """A 3-token vocabulary (0 = start, 1 = end, 2 = word) whose logits favour ending: the end token waits for
    min_seq_len, then the best caption ends at once."""
    def next_logits(ids):
        return torch.tensor([-9.0, 0.0, -1.0]).expand(ids.shape[0], 3).clone()
    out = group_beam_search(next_logits, batch=2, sot=0, eot=1, pad=1, seq_len=10, min_seq_len=4, num_beams=2,
                            num_groups=1)
    assert out.tolist() == [[0, 2, 2, 2, 1]] * 2


def test_bad_beam_settings_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        group_beam_search(lambda ids: torch.zeros(ids.shape[0], 3), 1, 0, 1, 1, 5, 2, num_beams=6, num_groups=4)
