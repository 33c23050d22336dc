"""Quick-look PNGs: CT slices (abdominal window) with a segmentation, and optionally a reference, overlaid.

:func:`save_overlay_png` reads any SimpleITK-readable image / segmentation pair (``.nii.gz``, ``.mha``,
``.nrrd``, 2D ``.png``...), picks the axial slices with the most foreground and writes one PNG: the first row
shows the segmentation, the optional second row the reference segmentation on the same slices. Rendering uses
matplotlib's Agg canvas directly (no pyplot, no display, safe in worker processes), and the PNG is written
atomically (temporary file in the target folder, then ``os.replace``).

Orientation: 3D volumes are reoriented to LPS before display (``sitk.DICOMOrient``), so slices are shown
radiologically: anterior at the top, the patient's right on the image left.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_path

__all__ = ["save_overlay_png", "select_slices", "WINDOW_ABDOMEN", "label_color"]

#: (width, level) of the abdominal soft-tissue window in HU.
WINDOW_ABDOMEN = (400.0, 50.0)

# Distinct, colour-blind friendlier colours (Okabe-Ito first, then tab10 leftovers); label k uses entry k-1.
_PALETTE = [
    "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
    "#d62728", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f",
]


def label_color(label: int) -> tuple[float, float, float]:
    """RGB colour (0-1) used for ``label`` (>= 1) in every overlay."""
    from matplotlib.colors import to_rgb

    return to_rgb(_PALETTE[(int(label) - 1) % len(_PALETTE)])


def _read(path) -> tuple[np.ndarray, tuple[float, float]]:
    """Array as (z, y, x) (2D images become one slice) and the in-plane spacing (y, x)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    if img.GetNumberOfComponentsPerPixel() > 1:  # e.g. an RGB png: use the first channel
        img = sitk.VectorIndexSelectionCast(img, 0)
    if img.GetDimension() == 3:
        img = sitk.DICOMOrient(img, "LPS")
    arr = sitk.GetArrayFromImage(img)
    sp = img.GetSpacing()  # x, y[, z]
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim != 3:
        raise ValueError(f"{path}: expected a 2D or 3D image, got array shape {arr.shape}")
    return arr, (float(sp[1]), float(sp[0]))


def select_slices(seg: np.ndarray, n_slices: int = 3) -> list[int]:
    """Indices (ascending) of the ``n_slices`` axial slices of ``seg`` (z, y, x) with the most foreground.

    Picked greedily by foreground voxel count (ties: nearer the centre), skipping slices closer than
    ``extent / (2 * n_slices)`` to one already picked (extent = number of slices with foreground), so that
    the panels do not all show neighbouring, near-identical slices; if that leaves too few, the gap is
    dropped. Slices without foreground are only used when no slice has any (then: evenly spaced ones).
    """
    nz = seg.shape[0]
    n = max(1, min(int(n_slices), nz))
    counts = (seg > 0).reshape(nz, -1).sum(1)
    if counts.max() == 0:
        return sorted({int(round(i)) for i in np.linspace(0, nz - 1, n + 2)[1:-1]})
    centre_dist = np.abs(np.arange(nz) - (nz - 1) / 2)
    order = [int(i) for i in np.lexsort((centre_dist, -counts)) if counts[i] > 0]
    min_gap = max(1, int(len(order) // (2 * n)))
    chosen: list[int] = []
    for i in order:
        if len(chosen) < n and all(abs(i - j) >= min_gap for j in chosen):
            chosen.append(i)
    for i in order:  # not enough well-separated slices: fill up with the next best
        if len(chosen) < n and i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def _rgba_overlay(seg2d: np.ndarray, alpha: float) -> np.ndarray:
    out = np.zeros(seg2d.shape + (4,), np.float32)
    for lab in np.unique(seg2d):
        if lab <= 0:
            continue
        out[seg2d == lab] = (*label_color(int(lab)), alpha)
    return out


def save_overlay_png(image_file, seg_file, png_file, label_names: dict[int, str] | None = None,
                     reference_file=None, n_slices: int = 3, window: tuple[float, float] = WINDOW_ABDOMEN,
                     alpha: float = 0.45, title: str | None = None, dpi: int = 100) -> Path:
    """Write a PNG with the ``n_slices`` most-foreground axial slices of ``image_file`` and ``seg_file`` overlaid.

    ``label_names`` maps label values to legend names (missing ones are shown as ``label k``); with
    ``reference_file`` a second row shows the reference segmentation on the same slices (slices are then
    chosen by the union of both). ``window`` is (width, level) in HU, W400/L50 by default. The image, the
    segmentation and the reference must share one voxel grid. Returns the path of the PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image, (sy, sx) = _read(image_file)
    seg, _ = _read(seg_file)
    rows = [("segmentation", np.rint(seg).astype(np.int32))]
    if reference_file is not None:
        ref, _ = _read(reference_file)
        rows.append(("reference", np.rint(ref).astype(np.int32)))
    for name, arr in rows:
        if arr.shape != image.shape:
            raise ValueError(f"{name} shape {arr.shape} does not match image shape {image.shape} "
                             f"({seg_file if name == 'segmentation' else reference_file} vs {image_file})")
    if reference_file is not None:
        rows[0] = ("prediction", rows[0][1])

    union = np.zeros(image.shape, bool)
    for _, arr in rows:
        union |= arr > 0
    slices = select_slices(union, n_slices)

    width, level = (float(w) for w in window)
    vmin, vmax = level - width / 2, level + width / 2
    ny, nx = image.shape[1:]
    aspect = sy / sx
    panel_w = 3.2
    panel_h = panel_w * ny * aspect / nx
    fig = Figure(figsize=(panel_w * len(slices) + 1.6, panel_h * len(rows) + 0.8), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(slices), squeeze=False)
    present: set[int] = set()
    for r, (row_name, arr) in enumerate(rows):
        for c, z in enumerate(slices):
            ax = axes[r][c]
            ax.imshow(image[z], cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
            ax.imshow(_rgba_overlay(arr[z], alpha), aspect=aspect, interpolation="nearest")
            labs = [int(v) for v in np.unique(arr[z]) if v > 0]
            present.update(labs)
            for lab in labs:  # thin outline keeps boundaries visible under the transparent fill
                ax.contour((arr[z] == lab).astype(np.float32), levels=[0.5], colors=[label_color(lab)],
                           linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"slice {z + 1}/{image.shape[0]}" if image.shape[0] > 1 else "", fontsize=9)
            if c == 0:
                ax.set_ylabel(row_name, fontsize=10)
    names = {int(k): str(v) for k, v in (label_names or {}).items()}
    legend_labels = sorted(present | {k for k in names if k > 0})
    handles = [Patch(facecolor=label_color(k), edgecolor="none", label=names.get(k, f"label {k}"))
               for k in legend_labels]
    if handles:
        fig.legend(handles=handles, loc="center right", fontsize=9, frameon=False)
    fig.suptitle(title if title is not None else f"{Path(str(image_file)).name}  (W{width:g}/L{level:g})",
                 fontsize=10)
    fig.subplots_adjust(left=0.04, right=1.0 - 1.5 / fig.get_figwidth(), top=1.0 - 0.55 / fig.get_figheight(),
                        bottom=0.02, wspace=0.03, hspace=0.03)

    png_file = Path(png_file)
    png_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(png_file) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return png_file
