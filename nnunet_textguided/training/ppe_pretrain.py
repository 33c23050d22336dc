"""MPTPN stage 1 (seed 003, Sec. 3.2, Algorithm 1): SimSiam pretraining of the prior prompt encoder (PPE).

``nnunet-textguided pretrain-ppe IMAGES_WITH_CAPTIONS_DIR -o ppe.pth`` trains ``networks.mptpn.PromptEncoder`` with
``SimSiamPredictors`` on image-caption pairs (COCO in the paper) and writes the checkpoint that MPTPN's stage-2
trainer loads with :func:`load_ppe_checkpoint`.

Data: every image of the folder (.png/.jpg/.jpeg/.bmp/.tif/.tiff, not recursive) with its caption ``<stem>.txt``;
an nnU-Net image ``<case>_0000.png`` without its own ``<stem>.txt`` takes the case's note ``<case>.txt``, so a
dataset's imagesTr with notes is a caption folder too. Captions are read like notes (UTF-8, whitespace
collapsed) and encoded once, at the start, with the frozen text encoder (its per-token states, cropped or
zero-padded to ``max_tokens``; ``conditioning.notes.encode_notes``).

One step (Algorithm 1): two augmented views x1, x2 of each image, the same caption tokens for both; F^k =
PPE(x_k, tokens) (three scales); with ``projection="dense"`` (the paper's Algorithm 1, default) z^k_i = F^k_i and
p^k_i = G_i(F^k_i), a 1x1-convolution head, compared pixel by pixel; with ``projection="pool"`` (the authors'
simsiam/builder.py) z^k_i = GAP(F^k_i), p^k_i = MLP_i(z^k_i) (``networks.mptpn.SimSiamPredictors``);
loss = mean over the scales i of D(p1_i, z2_i) + D(p2_i, z1_i), D(p, z) = -cos(p, stop-grad(z)) averaged over the
batch (and the pixels), so it lies in [-2, 2] and -2 is perfect agreement: Algorithm 1's plain sum (line 6, "L <-
D(P1, Y2) + D(P2, Y1)"; SimSiam and the authors' builder halve it, which halves the gradient at the same lr; the
mean over the three scales is ours, Algorithm 1 writes one Y per view). SGD (momentum 0.9, weight decay 1e-4) on the PPE and the
predictors, lr = base_lr * batch_size / 256, cosine-annealed per epoch (SimSiam's recipe).

Views: RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8), RandomGrayscale(0.2), RandomApply(GaussianBlur(sigma
0.1-2), p=0.5) on the image resized (bicubic) to ``image_size`` — the authors' SimSiam augmentations without the
random resized crop and the flip: captions name positions ("a red circle in the upper left"), which a crop or a
flip would falsify (paper, Sec. 3.2.1). The blur kernel is ~10 % of the side (odd, >= 3).

Normalisation, by choice: the views are z-scored per image and per channel ((x - mean) / max(std, 1e-8)) instead
of the authors' ImageNet mean/std, with the mean and std of the un-augmented image (a view's own statistics would
undo the jitter's brightness and contrast exactly). That is what nnU-Net's default normalisation does to the
stage-2 images, so the PPE's first convolution sees inputs on the same scale in both stages (an
ImageNet-normalised stage 1 would feed it differently scaled, differently shifted inputs in stage 2).

Collapse monitor: per epoch and scale, ``z_std`` = mean over channels of the std over the batch of the
l2-normalised z_i, times sqrt(c_i) (the SimSiam paper's diagnostic): -> 0 when SimSiam collapses to a constant;
~1 for zero-mean, isotropic z (SimSiam's BN-ended projector); a dense z counts each pixel as a sample. With
``projection="pool"`` z_i is the average pool of a ReLU map, so it is non-negative, its normalised vectors share a
mean direction, and healthy values are lower (0.3-0.4 at initialisation, measured). A line warns when a scale falls below 0.1.

Never lose work: the checkpoint is written atomically (flushed to disk, then renamed) after every epoch; a rerun
with the same settings resumes an unfinished one (the images may have moved: the data are identified by their
fingerprint), a rerun with other settings stops and names what differs. A larger ``--epochs`` continues a finished
one to the new total (with the cosine schedule of the new total) after keeping the finished file as
``<name>.epoch<N>.pth``: stage-2 runs may have used it (they record its sha256). The RNGs are reseeded at the start of every epoch from (seed,
epoch), so an interrupted and resumed run repeats the uninterrupted one.

Checkpoint (``torch.load(path, weights_only=True)`` reads it)::

    {"format": "nnunet_textguided.ppe/1", "ppe": state dict, "predictors": state dict, "optimizer": state dict,
     "epoch": completed epochs, "epochs": planned total, "complete": epoch == epochs,
     "config": {"in_channels": 3, "base_channels", "image_size": [H, W], "num_heads", "text_encoder",
                "text_weight_hash", "token_dim", "max_tokens", "batch_size", "base_lr", "seed",
                "data": {"folder": absolute path, "images": n, "fingerprint": sha256 of the sorted
                         (image file name, caption) pairs}},
     "history": [{"epoch": 1-based, "loss", "z_std": [3 floats], "lr"}, ...]}
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from .. import settings
from ..conditioning.notes import NoteError, encode_notes, read_note
from ..conditioning.slices import get_encoder
from ..data.lvit import IMAGE_EXTENSIONS, image_files
from ..io import atomic_path, atomic_torch_save
from ..networks.mptpn import PromptEncoder, SimSiamPredictors

__all__ = ["pretrain_ppe", "load_ppe_checkpoint", "PPECheckpointError", "find_image_captions", "simsiam_loss",
           "representation_std", "CHECKPOINT_FORMAT", "IMAGE_EXTENSIONS", "main"]

CHECKPOINT_FORMAT = "nnunet_textguided.ppe/1"
PROG = "nnunet-textguided pretrain-ppe"
#: z_std below this at any scale is reported as (beginning) collapse
COLLAPSE_WARNING = 0.1
#: nnU-Net's channel suffix of the first (or only) image file of a case
_CHANNEL_0 = re.compile(r"^(?P<case>.+)_0000$")


class PPECheckpointError(ValueError):
    """A file that is not a usable stage-1 PPE checkpoint."""


# -- data -------------------------------------------------------------------------------------------------------

def find_image_captions(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """[(image path, caption)] of ``folder``, sorted by file name.

    Raises FileNotFoundError (no such folder), ValueError (no images) or one NoteError listing every image
    without a usable caption, before anything is computed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images with captions")
    images = image_files(folder)
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); stage 1 needs images, each with "
                         "its caption <stem>.txt beside it")
    pairs, problems = [], []
    for image in images:
        own = image.with_suffix(".txt")
        path = own
        m = _CHANNEL_0.match(image.stem)
        if not own.is_file() and m:  # nnU-Net naming: <case>_0000.png + <case>.txt
            path = image.with_name(f"{m['case']}.txt")
        if not path.is_file():
            tried = own.name + (f" or {path.name}" if path != own else "")
            problems.append(f"{image.name} has no caption ({tried} does not exist)")
            continue
        try:
            pairs.append((image, read_note(path)))
        except NoteError as e:
            problems.append(f"{image.name}: {e}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise NoteError(f"{len(problems)} of {len(images)} images in {folder} have no usable caption: "
                        + "; ".join(problems[:3]) + more + ". Write each image's caption as UTF-8 text into "
                        "<stem>.txt beside it, or move the image out of the folder")
    return pairs


def data_fingerprint(pairs: Sequence[tuple[Path, str]]) -> str:
    """sha256 over the sorted (image file name, caption) pairs."""
    h = hashlib.sha256()
    for name, caption in sorted((p.name, c) for p, c in pairs):
        h.update(name.encode("utf-8") + b"\0" + caption.encode("utf-8") + b"\0")
    return h.hexdigest()


def _check_readable(path: Path) -> None:
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - the header is parsed by open; size proves it is an image
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path} ({e}); remove or replace it") from None


def load_image(path: Path, image_size: tuple[int, int]) -> torch.Tensor:
    """RGB image -> (3, H, W) float32 in [0, 1], resized (bicubic) to ``image_size`` (H, W)."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB").resize((image_size[1], image_size[0]), Image.BICUBIC)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path} ({e}); remove or replace it") from None
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def blur_kernel(side: int) -> int:
    """Gaussian blur kernel for an image side: ~10 % of it, odd, at least 3 (SimSiam/MoCo blur 23 px at 224)."""
    return max(3, int(0.1 * side) // 2 * 2 + 1)


def view_augmentation(image_size: Sequence[int]) -> v2.Compose:
    """The stage-1 view augmentation on (3, H, W) float images in [0, 1] (module docstring: no crop, no flip)."""
    h, w = (int(s) for s in image_size)
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur((blur_kernel(h), blur_kernel(w)), sigma=(0.1, 2.0))], p=0.5),
    ])


def zscore(x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """(..., C, H, W) z-scored per image and channel with the mean and std of ``like`` (default: x itself), as
    nnU-Net's default normalisation does to stage-2 images."""
    like = x if like is None else like
    mean = like.mean((-2, -1), keepdim=True)
    std = like.std((-2, -1), keepdim=True).clamp_min(1e-8)
    return (x - mean) / std


class TwoViewDataset(Dataset):
    """Item i -> (view 1 (3, H, W), view 2 (3, H, W), i): two augmented, z-scored views of image i."""

    def __init__(self, images: Sequence[Path], image_size: Sequence[int]):
        self.images = list(images)
        self.image_size = tuple(int(s) for s in image_size)
        self.augment = view_augmentation(self.image_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = load_image(self.images[i], self.image_size)
        # both views with the statistics of the un-augmented image: a view's own statistics would undo the
        # colour jitter's brightness and contrast changes (per-channel gains and shifts) exactly
        return zscore(self.augment(x), x), zscore(self.augment(x), x), i


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2 ** 32  # set per worker by the DataLoader from its seeded generator
    np.random.seed(seed)
    random.seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


# -- objective ----------------------------------------------------------------------------------------------------

def _negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, stop-grad(z)), averaged over the batch."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def simsiam_loss(z1: Sequence[torch.Tensor], p1: Sequence[torch.Tensor], z2: Sequence[torch.Tensor],
                 p2: Sequence[torch.Tensor]) -> torch.Tensor:
    """Algorithm 1's symmetric loss averaged over the scales: mean_i D(p1_i, z2_i) + D(p2_i, z1_i), in [-2, 2]."""
    terms = [_negative_cosine(a, zb) + _negative_cosine(b, za) for za, a, zb, b in zip(z1, p1, z2, p2)]
    return torch.stack(terms).mean()


@torch.no_grad()
def representation_std(z: torch.Tensor) -> float:
    """Collapse monitor, see the module docstring; a dense z (B, c, H, W) counts every pixel as a sample."""
    if z.ndim == 4:
        z = z.movedim(1, -1).reshape(-1, z.shape[1])
    return _representation_std(z)


@torch.no_grad()
def _representation_std(z: torch.Tensor) -> float:
    """Collapse monitor for projections (B, c): mean channel std over the batch of the l2-normalised z, times
    sqrt(c) (~1 healthy, -> 0 collapsed)."""
    zn = F.normalize(z.float(), dim=1)
    return float(zn.std(0).mean() * math.sqrt(z.shape[1]))


# -- checkpoint ---------------------------------------------------------------------------------------------------

def _read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise PPECheckpointError(f"{path} does not exist: pretrain the PPE first (nnunet-textguided pretrain-ppe "
                                 f"IMAGES_WITH_CAPTIONS_DIR -o {path})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors all mean: not our checkpoint
        raise PPECheckpointError(f"{path} is not a readable PPE checkpoint ({type(e).__name__}: {e}); pass the "
                                 "file written by nnunet-textguided pretrain-ppe -o") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise PPECheckpointError(f"{path} is not a PPE checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r}); "
                                 "pass the file written by nnunet-textguided pretrain-ppe -o")
    return ckpt


def load_ppe_checkpoint(path: str | os.PathLike) -> dict:
    """A complete stage-1 checkpoint (module docstring), on the CPU. Raises PPECheckpointError naming the file and
    the fix for a missing, unreadable, foreign or unfinished one."""
    path = Path(path)
    ckpt = _read_checkpoint(path)
    if not ckpt.get("complete"):
        raise PPECheckpointError(f"{path} is an unfinished PPE pretraining (epoch {ckpt.get('epoch')} of "
                                 f"{ckpt.get('epochs')}): finish it with the same pretrain-ppe command")
    return ckpt


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({a!r} there, {b!r} now)")
    return out


def _comparable(config: dict) -> dict:
    """The config without the data folder's path: the same images and captions copied or mounted elsewhere (a
    job's scratch disk) are the same data (``data.fingerprint``)."""
    data = {k: v for k, v in config.get("data", {}).items() if k != "folder"}
    return {"projection": "pool", **config, "data": data}  # checkpoints without the key pooled


def _save(ckpt: dict, output: Path) -> None:
    atomic_torch_save(ckpt, output)


# -- training -----------------------------------------------------------------------------------------------------

def _train_one_epoch(ppe: PromptEncoder, predictors: SimSiamPredictors, optimizer: torch.optim.Optimizer,
                     loader: DataLoader, tokens: torch.Tensor, mask: torch.Tensor, device: torch.device,
                     desc: str, progress: bool) -> tuple[float, list[float]]:
    """One pass over the loader -> (mean loss, mean z_std per scale)."""
    ppe.train()
    predictors.train()
    losses, stds = [], []
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for x1, x2, idx in bar:
        x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        t, m = tokens[idx].to(device), mask[idx].to(device)
        z1, p1 = predictors(ppe(x1, t, m))
        z2, p2 = predictors(ppe(x2, t, m))
        loss = simsiam_loss(z1, p1, z2, p2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        stds.append([0.5 * (representation_std(a) + representation_std(b)) for a, b in zip(z1, z2)])
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return float(np.mean(losses)), [float(s) for s in np.mean(stds, 0)]


def _encode_captions(spec: str, captions: list[str], max_tokens: int, device: torch.device, progress: bool,
                     chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    states, masks = [], []
    for i in tqdm(range(0, len(captions), chunk), desc="encoding captions", disable=not progress, leave=False):
        s, m = encode_notes(spec, captions[i:i + chunk], max_tokens, device)
        states.append(s.cpu())
        masks.append(m.cpu())
    return torch.cat(states), torch.cat(masks)


def _resume_state(output: Path, config: dict, epochs: int) -> dict | None:
    """The existing checkpoint at ``output`` to continue from, or None; refuses foreign or mismatching files."""
    if not output.exists():
        return None
    if output.is_dir():
        raise ValueError(f"{output} is a folder; -o names the checkpoint file to write (e.g. {output / 'ppe.pth'})")
    ckpt = _read_checkpoint(output)
    diff = _config_differences(_comparable(ckpt.get("config", {})), _comparable(config))
    if diff:
        raise ValueError(f"{output} holds a PPE pretraining with other settings: {'; '.join(diff)}. Write this run to "
                         "another file (-o), or delete that file to start over")
    done = int(ckpt["epoch"])
    if ckpt.get("complete") and epochs > done:  # stage-2 runs may have used it: keep it under another name
        kept = output.with_name(f"{output.stem}.epoch{done}{output.suffix}")
        if not kept.exists():
            with atomic_path(kept, suffix=output.suffix) as tmp:
                shutil.copyfile(output, tmp)
        print(f"{output}: finished at {done} epochs, kept as {kept}; continuing to {epochs} epochs")
    if epochs < done or (epochs == done and not ckpt.get("complete")):
        raise ValueError(f"{output} has already trained {done} of {ckpt['epochs']} epochs; --epochs {epochs} would "
                         f"not continue it. Ask for --epochs {max(done, int(ckpt['epochs']))} (or more), or write to "
                         "another file (-o)")
    return ckpt


def pretrain_ppe(folder: str | os.PathLike, output: str | os.PathLike, *, text_encoder: str = "minilm",
                 max_tokens: int = 10, image_size: Sequence[int] = (224, 224), base_channels: int = 64,
                 num_heads: int = 8, epochs: int = 5, batch_size: int = 16, base_lr: float = 0.05,
                 device: str | torch.device = "cpu", num_workers: int = 0, seed: int = 0,
                 progress: bool = True, projection: str = "dense") -> dict:
    """SimSiam-pretrain the PPE on the image-caption pairs of ``folder``; returns the final checkpoint dict,
    written (after every epoch) to ``output`` (module docstring). Resumes from an existing ``output`` with the
    same settings; a complete one with ``epochs`` equal to its own is returned without training."""
    output = Path(output)
    size = tuple(int(s) for s in image_size)
    if epochs < 1 or batch_size < 2 or max_tokens < 2:
        raise ValueError(f"need --epochs >= 1, --batch-size >= 2 (BatchNorm) and --max-tokens >= 2, got {epochs}, "
                         f"{batch_size} and {max_tokens}")
    pairs = find_image_captions(folder)
    for image, _ in pairs:
        _check_readable(image)
    if len(pairs) < batch_size:
        raise ValueError(f"{folder} holds {len(pairs)} images, fewer than one batch of {batch_size}: lower --batch-size "
                         f"(to at most {len(pairs)}; at least 2, for BatchNorm; incomplete batches are dropped)")
    device = torch.device(device)
    encoder = get_encoder(text_encoder, "cpu")
    token_dim = int(encoder.token_dim)
    torch.manual_seed(seed)
    ppe = PromptEncoder(3, base_channels, token_dim, max_tokens, size, num_heads)  # checks the size and heads
    predictors = SimSiamPredictors(ppe.widths, projection)
    config = {"projection": projection, "in_channels": 3, "base_channels": int(base_channels), "image_size": list(size),
              "num_heads": int(num_heads), "text_encoder": text_encoder, "text_weight_hash": encoder.weight_hash(),
              "token_dim": token_dim, "max_tokens": int(max_tokens), "batch_size": int(batch_size),
              "base_lr": float(base_lr), "seed": int(seed),
              "data": {"folder": str(Path(folder).resolve()), "images": len(pairs),
                       "fingerprint": data_fingerprint(pairs)}}
    previous = _resume_state(output, config, epochs)
    if previous is not None and previous.get("complete") and int(previous["epoch"]) == epochs:
        print(f"{output} is complete ({epochs} epochs); nothing to train")
        return previous

    tokens, mask = _encode_captions(text_encoder, [c for _, c in pairs], max_tokens, device, progress)
    if device.type != "cpu":
        get_encoder(text_encoder, "cpu")  # give the accelerator's memory back to the PPE
    if num_workers > 0:  # the tokenizer is done; its threads must not warn in every forked loader worker
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ppe.to(device)
    predictors.to(device)
    lr = base_lr * batch_size / 256
    optimizer = torch.optim.SGD(list(ppe.parameters()) + list(predictors.parameters()), lr=lr, momentum=0.9,
                                weight_decay=1e-4)
    history, start = [], 0
    if previous is not None:
        ppe.load_state_dict(previous["ppe"])
        predictors.load_state_dict(previous["predictors"])
        optimizer.load_state_dict(previous["optimizer"])
        history, start = list(previous["history"]), int(previous["epoch"])
        print(f"{output}: resuming from epoch {start} of {epochs}")

    generator = torch.Generator()
    loader = DataLoader(TwoViewDataset([p for p, _ in pairs], size), batch_size=batch_size, shuffle=True,
                        drop_last=True, num_workers=num_workers, generator=generator, worker_init_fn=_seed_worker,
                        pin_memory=device.type == "cuda")
    ckpt = previous
    for epoch in range(start, epochs):
        lr_e = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr_e
        s = _epoch_seed(seed, epoch)
        torch.manual_seed(s)  # dropout, augmentation in the main process
        generator.manual_seed(s)  # shuffling, worker seeds
        loss, z_std = _train_one_epoch(ppe, predictors, optimizer, loader, tokens, mask, device,
                                       f"epoch {epoch + 1}/{epochs}", progress)
        history.append({"epoch": epoch + 1, "loss": loss, "z_std": z_std, "lr": lr_e})
        ckpt = {"format": CHECKPOINT_FORMAT, "ppe": ppe.state_dict(), "predictors": predictors.state_dict(),
                "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "epochs": int(epochs),
                "complete": epoch + 1 == epochs, "config": config, "history": history}
        _save(ckpt, output)
        tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}, z_std " + " ".join(f"{v:.3f}" for v in z_std)
                   + f", lr {lr_e:.2e}")
        low = [i for i, v in enumerate(z_std) if v < COLLAPSE_WARNING]
        if low:
            tqdm.write(f"warning: representations collapsing at scale(s) {low} (z_std < {COLLAPSE_WARNING}); "
                       "SimSiam may be degenerate: lower --lr or use more, more varied images")
    return ckpt


# -- command ------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="MPTPN stage 1: SimSiam-pretrain the prior prompt encoder (PPE) on image-caption "
        "pairs; MPTPN's trainer initialises its PPE from the checkpoint written here.",
        epilog="Captions: <stem>.txt beside each image (or <case>.txt for nnU-Net's <case>_0000 images). The "
        "checkpoint is written after every epoch; rerunning the same command resumes it.")
    p.add_argument("folder", metavar="IMAGES_WITH_CAPTIONS_DIR", help="images (.png/.jpg/.jpeg/.bmp/.tif/.tiff) "
                   "with their captions")
    p.add_argument("-o", "--output", required=True, help="checkpoint file to write (resumed if it exists)")
    stage2 = settings.MPTPNSettings()
    p.add_argument("--text-encoder", default=stage2.text_encoder,
                   help=f"text encoder spec (default: {stage2.text_encoder}, MPTPNTrainer's text_encoder setting); "
                   "stage 2 must use the same")
    p.add_argument("--max-tokens", type=int, default=stage2.max_tokens,
                   help=f"caption tokens L (default: {stage2.max_tokens}, the paper's); stage 2 must use the same")
    p.add_argument("--size", type=int, nargs="+", default=[224], metavar="S",
                   help="image size: S or H W, multiples of 16 (default 224)")
    p.add_argument("--base-channels", type=int, default=64, help="PPE width C (default 64)")
    p.add_argument("--num-heads", type=int, default=8, help="ViT heads (default 8)")
    p.add_argument("--epochs", type=int, default=5, help="epochs (default 5: the authors' released PPE is "
                   "checkpoint_0004); a larger value continues a finished run")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    p.add_argument("--lr", type=float, default=0.05, help="base learning rate, scaled by batch-size / 256 "
                   "(default 0.05)")
    p.add_argument("-device", "--device", dest="device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default cuda if available, else cpu)")
    p.add_argument("--num-workers", type=int, default=2, help="data-loading processes (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--projection", choices=("dense", "pool"), default="dense",
                   help="dense: the predictor runs on the PPE's feature maps and the views are compared pixel by "
                   "pixel (the paper's Algorithm 1, default); pool: global average pool first (the authors' code)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ..encoders.registry import portable_spec
    try:
        settings.check_environment(PROG)
        args.text_encoder = portable_spec(args.text_encoder)  # the form stage 2's settings record
    except ValueError as e:  # SettingsError, EncoderSpecError
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if len(args.size) not in (1, 2):
        print(f"{PROG}: error: --size takes one or two integers, got {len(args.size)}", file=sys.stderr)
        return 2
    size = args.size * 2 if len(args.size) == 1 else args.size
    try:
        ckpt = pretrain_ppe(args.folder, args.output, text_encoder=args.text_encoder, max_tokens=args.max_tokens,
                            image_size=size, base_channels=args.base_channels, num_heads=args.num_heads,
                            epochs=args.epochs, batch_size=args.batch_size, base_lr=args.lr, device=args.device,
                            num_workers=args.num_workers, seed=args.seed, progress=not args.no_progress,
                            projection=args.projection)
    except (NoteError, PPECheckpointError, ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    last = ckpt["history"][-1] if ckpt["history"] else {}
    print(f"PPE checkpoint: {Path(args.output).resolve()} (epoch {ckpt['epoch']} of {ckpt['epochs']}, loss "
          f"{last.get('loss', float('nan')):.4f})")
    return 0
