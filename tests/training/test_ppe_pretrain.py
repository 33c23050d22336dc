"""MPTPN stage 1 (``nnunet-textguided pretrain-ppe``): SimSiam pretraining of the PPE, its checkpoint and resume.

Tiny settings throughout (32 x 32 images = a 2 x 2 token grid, C = 8, batch 8, 16 images, the bundled MiniLM).
"""
import shutil

import pytest
import torch

from nnunet_textguided.conditioning.notes import NoteError
from nnunet_textguided.data.captions import write_caption_folder
from nnunet_textguided.networks.mptpn import PromptEncoder, SimSiamPredictors
from nnunet_textguided.training import ppe_pretrain
from nnunet_textguided.training.ppe_pretrain import (CHECKPOINT_FORMAT, PPECheckpointError, find_image_captions,
                                                     load_ppe_checkpoint, main, pretrain_ppe)

SIZE, C, BATCH, N_IMAGES = 32, 8, 8, 16
SETTINGS = dict(image_size=(SIZE, SIZE), base_channels=C, num_heads=8, batch_size=BATCH, max_tokens=10,
                text_encoder="minilm", base_lr=0.5, num_workers=0, seed=0, progress=False)


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ppe") / "captions"
    write_caption_folder(folder, n=N_IMAGES, size=SIZE, seed=0)
    return folder


@pytest.fixture(scope="module")
def trained(captions, tmp_path_factory):
    output = tmp_path_factory.mktemp("ppe_out") / "ppe.pth"
    return output, pretrain_ppe(captions, output, epochs=4, **SETTINGS)


def _bytes(path):
    return path.read_bytes()


def test_caption_folder_is_deterministic_and_captioned(tmp_path):
    a = write_caption_folder(tmp_path / "a", n=4, size=SIZE, seed=5)
    write_caption_folder(tmp_path / "b", n=4, size=SIZE, seed=5)
    write_caption_folder(tmp_path / "c", n=4, size=SIZE, seed=6)
    assert a == [f"caption_{i:03d}" for i in range(4)]
    for stem in a:
        assert (tmp_path / "a" / f"{stem}.png").read_bytes() == (tmp_path / "b" / f"{stem}.png").read_bytes()
        caption = (tmp_path / "a" / f"{stem}.txt").read_text()
        assert any(shape in caption for shape in ("circle", "square", "triangle")) and "background" in caption
    assert [(tmp_path / "a" / f"{s}.txt").read_text() for s in a] != [(tmp_path / "c" / f"{s}.txt").read_text()
                                                                    for s in a]


def test_loss_decreases_without_collapse(trained):
    _, ckpt = trained
    history = ckpt["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and ckpt["complete"] and ckpt["epoch"] == 4
    losses = [h["loss"] for h in history]
    assert all(-1.0 <= v <= 1.0 for v in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    for h in history:
        assert len(h["z_std"]) == 3 and min(h["z_std"]) >= 0.1, h
    lr = 0.5 * BATCH / 256
    assert history[0]["lr"] == pytest.approx(lr) and history[2]["lr"] == pytest.approx(lr * 0.5)


def test_checkpoint_loads_weights_only_into_a_fresh_ppe(trained, captions):
    output, returned = trained
    ckpt = load_ppe_checkpoint(output)
    assert ckpt["format"] == CHECKPOINT_FORMAT
    cfg = ckpt["config"]
    assert cfg["image_size"] == [SIZE, SIZE] and cfg["base_channels"] == C and cfg["token_dim"] == 384
    assert cfg["projection"] == "dense"  # Algorithm 1: the predictor on the feature maps, no pooling
    assert cfg["data"] == {"folder": str(captions.resolve()), "images": N_IMAGES,
                           "fingerprint": returned["config"]["data"]["fingerprint"]}
    ppe = PromptEncoder(3, cfg["base_channels"], cfg["token_dim"], cfg["max_tokens"], cfg["image_size"],
                        cfg["num_heads"])
    untrained = {k: v.clone() for k, v in ppe.state_dict().items()}
    ppe.load_state_dict(ckpt["ppe"], strict=True)
    SimSiamPredictors(ppe.widths).load_state_dict(ckpt["predictors"], strict=True)
    state = ppe.state_dict()
    assert all(torch.equal(state[k], returned["ppe"][k].cpu()) for k in state)
    assert not torch.equal(state["image.stages.0.0.weight"], untrained["image.stages.0.0.weight"])  # it trained


def test_a_finished_run_is_kept_when_continued_and_moved_images_are_the_same_data(captions, tmp_path,
                                                                                                 capsys):
    output = tmp_path / "ppe.pth"
    first = pretrain_ppe(captions, output, epochs=2, **SETTINGS)
    assert first["complete"] and first["epoch"] == 2
    before = _bytes(output)
    capsys.readouterr()
    copy = output
    longer = pretrain_ppe(captions, output, epochs=3, **SETTINGS)
    out = capsys.readouterr().out
    assert "kept as" in out and "resuming from epoch 2" in out
    assert _bytes(tmp_path / "ppe.epoch2.pth") == before  # the finished 2-epoch file, bit for bit
    assert len(longer["history"]) == 3 and longer["history"][:2] == first["history"]
    assert longer["complete"] and longer["epochs"] == 3
    moved = tmp_path / "elsewhere"  # the same images and captions on another disk
    shutil.copytree(captions, moved)
    after = _bytes(copy)
    again = pretrain_ppe(moved, copy, epochs=3, **SETTINGS)
    assert "complete" in capsys.readouterr().out
    assert _bytes(copy) == after and again["history"] == longer["history"]


def test_the_collapse_monitor_tells_collapsed_from_spread_representations(captions, tmp_path, monkeypatch, capsys):
    g = torch.Generator().manual_seed(0)
    spread = torch.rand(16, 32, generator=g)
    assert ppe_pretrain.representation_std(spread.expand(16, 32)[:1].expand(16, 32)) == pytest.approx(0, abs=1e-6)
    assert ppe_pretrain.representation_std(torch.randn(64, 32, generator=g)) > 0.8  # isotropic: ~1
    assert 0.1 < ppe_pretrain.representation_std(spread) < 0.8  # non-negative, like pooled ReLU maps
    monkeypatch.setattr(ppe_pretrain, "representation_std", lambda z: 0.0)
    pretrain_ppe(captions, tmp_path / "collapsed.pth", epochs=1, **SETTINGS)
    out = capsys.readouterr()
    assert "representations collapsing at scale(s) [0, 1, 2]" in out.out + out.err


def test_jittered_views_keep_their_brightness_after_normalisation():
    x = torch.rand(3, SIZE, SIZE)
    brighter = (x * 0.6).clamp(0, 1)  # a brightness factor: a per-channel gain
    assert not torch.allclose(ppe_pretrain.zscore(brighter, x), ppe_pretrain.zscore(x, x))
    assert torch.allclose(ppe_pretrain.zscore(brighter), ppe_pretrain.zscore(x), atol=1e-5)  # own stats undo it


def test_interrupted_run_resumes_to_the_uninterrupted_result(captions, tmp_path, monkeypatch):
    reference = pretrain_ppe(captions, tmp_path / "reference.pth", epochs=3, **SETTINGS)
    output = tmp_path / "ppe.pth"
    real, calls = ppe_pretrain._train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ppe_pretrain, "_train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain_ppe(captions, output, epochs=3, **SETTINGS)
    monkeypatch.setattr(ppe_pretrain, "_train_one_epoch", real)
    partial = torch.load(output, weights_only=True)
    assert partial["epoch"] == 1 and not partial["complete"]
    with pytest.raises(PPECheckpointError, match="epoch 1 of 3.*finish it with the same pretrain-ppe command"):
        load_ppe_checkpoint(output)
    resumed = pretrain_ppe(captions, output, epochs=3, **SETTINGS)
    assert resumed["history"] == reference["history"]
    assert all(torch.equal(resumed["ppe"][k], reference["ppe"][k]) for k in reference["ppe"])


def test_other_settings_refuse_an_existing_checkpoint(trained, captions, tmp_path):
    output = tmp_path / "ppe.pth"
    shutil.copy(trained[0], output)
    before = _bytes(output)
    with pytest.raises(ValueError, match=r"ppe\.pth.*base_channels.*delete") as e:
        pretrain_ppe(captions, output, epochs=4, **{**SETTINGS, "base_channels": 16})
    assert "seed" not in str(e.value)  # only what differs is named
    with pytest.raises(ValueError, match="already trained 4"):
        pretrain_ppe(captions, output, epochs=2, **SETTINGS)
    assert _bytes(output) == before


def test_image_without_caption_is_refused_before_anything_is_written(tmp_path, capsys):
    folder = tmp_path / "captions"
    write_caption_folder(folder, n=BATCH, size=SIZE, seed=1)
    (folder / "caption_003.txt").unlink()
    (folder / "caption_005.txt").write_text("  \n")
    output = tmp_path / "ppe.pth"
    with pytest.raises(NoteError, match="2 of 8 images") as e:
        pretrain_ppe(folder, output, epochs=1, **SETTINGS)
    assert "caption_003.png" in str(e.value) and "caption_005" in str(e.value)
    assert not output.exists()
    rc = main([str(folder), "-o", str(output), "--size", str(SIZE), "--base-channels", str(C), "--batch-size",
               str(BATCH), "--epochs", "1", "--device", "cpu", "--num-workers", "0", "--no-progress", "--text-encoder", "minilm"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("nnunet-textguided pretrain-ppe: error: ") and "caption_003.png" in err
    assert len(err.strip().splitlines()) == 1 and not output.exists()


def test_cli_trains_and_reports_the_checkpoint(captions, tmp_path, capsys):
    output = tmp_path / "sub" / "ppe.pth"
    rc = main([str(captions), "-o", str(output), "--size", str(SIZE), "--base-channels", str(C), "--batch-size",
               str(BATCH), "--epochs", "1", "--device", "cpu", "--num-workers", "0", "--no-progress", "--text-encoder", "minilm"])
    assert rc == 0 and str(output) in capsys.readouterr().out.splitlines()[-1]
    assert load_ppe_checkpoint(output)["config"]["base_lr"] == 0.05


def test_nnunet_names_take_the_case_note_and_folder_errors(tmp_path, captions):
    shutil.copy(captions / "caption_000.png", tmp_path / "case_a_0000.png")
    (tmp_path / "case_a.txt").write_text("a note\nfor case a", encoding="utf-8")
    shutil.copy(captions / "caption_001.png", tmp_path / "img.JPG")  # extension case-insensitive
    (tmp_path / "img.txt").write_text("own caption", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not an image")
    pairs = find_image_captions(tmp_path)
    assert [(p.name, c) for p, c in pairs] == [("case_a_0000.png", "a note for case a"), ("img.JPG", "own caption")]
    with pytest.raises(ValueError, match="fewer than one batch of 8: lower --batch-size"):
        pretrain_ppe(tmp_path, tmp_path / "ppe.pth", epochs=1, **SETTINGS)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty holds no images"):
        find_image_captions(empty)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.txt").write_text("a caption")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        pretrain_ppe(tmp_path, tmp_path / "ppe.pth", epochs=1, **{**SETTINGS, "batch_size": 2})
    assert not (tmp_path / "ppe.pth").exists()


def test_load_refuses_what_is_not_a_finished_checkpoint(tmp_path):
    with pytest.raises(PPECheckpointError, match="does not exist"):
        load_ppe_checkpoint(tmp_path / "missing.pth")
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(PPECheckpointError, match=r"notes\.pth is not a readable PPE checkpoint"):
        load_ppe_checkpoint(text)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(PPECheckpointError, match=r"other\.pth is not a PPE checkpoint"):
        load_ppe_checkpoint(other)


def test_simsiam_loss_is_algorithm_1s_sum_averaged_over_the_scales():
    """L = D(P1, Y2) + D(P2, Y1) (Algorithm 1, line 6), D = -cos with the second argument detached; -2 when the
    predictions agree with the other view, mean over the scales."""
    from nnunet_textguided.training.ppe_pretrain import simsiam_loss
    g = torch.Generator().manual_seed(0)
    z1, z2, p1, p2 = ([torch.randn(3, 8, generator=g), torch.randn(3, 4, 2, 2, generator=g)] for _ in range(4))
    assert simsiam_loss(z1, z2, z2, z1).item() == pytest.approx(-2.0)  # p1 = z2 and p2 = z1
    cos = torch.nn.functional.cosine_similarity
    expected = [-(cos(a, zb).mean() + cos(b, za).mean()) for za, a, zb, b in zip(z1, p1, z2, p2)]
    assert simsiam_loss(z1, p1, z2, p2).item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-6)
    z2 = [z.requires_grad_() for z in z2]
    simsiam_loss(z1, [p.requires_grad_() for p in p1], z2, p2).backward()
    assert all(z.grad is None for z in z2)  # the second argument stops the gradient
