"""A tiny natural-image-like image-caption folder: the input format of MPTPN stage 1 (``pretrain-ppe``).

The paper pretrains the prior prompt encoder on COCO image-caption pairs; this generator stands in for them in
tests and the demo. Every image (RGB PNG, ``size`` x ``size``) shows a plain background of a random muted colour
with a smooth low-frequency shading and mild pixel noise, and 1-3 coloured shapes (circle, square, triangle) in
distinct cells of a 3 x 3 grid. Its caption ``<stem>.txt`` (UTF-8, one line) names every shape's colour, kind and
position in the image, e.g. "a red circle in the upper left and a blue square at the bottom on a grey background".
Positions are as displayed (row 0 at the top, column 0 at the left), which is why stage 1's augmentations contain
no flips or crops.

Layout: ``<folder>/caption_000.png`` + ``<folder>/caption_000.txt``, ... Deterministic for a given ``seed`` (the
image ``i`` depends on (seed, i) only, so a larger ``n`` keeps the first images).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..io import atomic_write_bytes, atomic_write_text

__all__ = ["write_caption_folder", "SHAPE_COLOURS", "SHAPES"]

#: saturated shape colours (RGB) and the word the caption uses
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "orange": (245, 140, 20), "purple": (140, 40, 170), "white": (250, 250, 250), "black": (15, 15, 15),
}
#: muted background colours: (word, RGB)
_BACKGROUNDS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("grey", (128, 128, 128)), ("beige", (200, 185, 150)), ("light blue", (150, 180, 210)),
    ("olive", (120, 125, 80)), ("dark grey", (70, 70, 75)), ("pale green", (160, 195, 155)),
)
SHAPES = ("circle", "square", "triangle")
#: how a caption names the 3 x 3 grid cell (row, column)
_CELL_PHRASES = {
    (0, 0): "in the upper left", (0, 1): "at the top", (0, 2): "in the upper right",
    (1, 0): "on the left", (1, 1): "in the centre", (1, 2): "on the right",
    (2, 0): "in the lower left", (2, 1): "at the bottom", (2, 2): "in the lower right",
}


def _background(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    """(colour word, (size, size, 3) float image): a muted colour, smooth shading (+-12) and pixel noise (sd 4)."""
    word, rgb = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))]
    base = np.asarray(rgb, np.float64) + rng.normal(0, 8, 3)
    coarse = rng.normal(0, 1, (4, 4))
    shading = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((size, size), Image.BICUBIC))
    shading = 12 * shading / max(float(np.abs(shading).max()), 1e-6)
    img = base[None, None, :] + shading[..., None] + rng.normal(0, 4, (size, size, 3))
    return word, img


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, centre: tuple[float, float], radius: float,
                colour: tuple[int, int, int]) -> None:
    cx, cy = centre
    if kind == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif kind == "square":
        r = radius * 0.9
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:  # triangle, apex up
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)],
                     fill=colour)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def generate_caption_image(index: int, seed: int = 0, size: int = 64) -> tuple[np.ndarray, str]:
    """Image ``index`` of the folder: ((size, size, 3) uint8 RGB, caption)."""
    if size < 16:
        raise ValueError(f"caption images need a size of at least 16 pixels, got {size}")
    rng = np.random.default_rng([int(seed), int(index), 3])
    bg_word, img = _background(rng, size)
    n_shapes = int(rng.integers(1, 4))
    cells = [divmod(int(c), 3) for c in rng.choice(9, n_shapes, replace=False)]
    colours = rng.choice(list(SHAPE_COLOURS), n_shapes, replace=False)
    canvas = Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    cell = size / 3
    parts = []
    for (row, col), colour in zip(cells, colours):
        kind = SHAPES[rng.integers(len(SHAPES))]
        radius = cell * rng.uniform(0.25, 0.4)
        jitter = (cell / 2 - radius) * 0.8  # the shape stays inside its cell, so its position word is unambiguous
        centre = ((col + 0.5) * cell + rng.uniform(-jitter, jitter), (row + 0.5) * cell + rng.uniform(-jitter, jitter))
        _draw_shape(draw, kind, centre, radius, SHAPE_COLOURS[str(colour)])
        parts.append(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {kind} {_CELL_PHRASES[(row, col)]}")
    return np.asarray(canvas), f"{_join(parts)} on a {bg_word} background"


def write_caption_folder(folder: str | os.PathLike, n: int = 32, size: int = 64, seed: int = 0) -> list[str]:
    """Write ``n`` image-caption pairs into ``folder`` (created if needed); returns their stems, in order.

    Files: ``caption_<i:03d>.png`` (RGB, ``size`` x ``size``) and ``caption_<i:03d>.txt`` (the caption).
    Deterministic for ``seed``; every file is written atomically.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stems = []
    for i in range(int(n)):
        stem = f"caption_{i:03d}"
        image, caption = generate_caption_image(i, seed, size)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        atomic_write_bytes(folder / f"{stem}.png", buf.getvalue())
        atomic_write_text(folder / f"{stem}.txt", caption + "\n")
        stems.append(stem)
    return stems
