"""Quick-look PNGs: image slices with a segmentation, and optionally a reference and the case's note, overlaid.

:func:`save_overlay_png` reads any SimpleITK-readable image / segmentation pair (``.nii.gz``, ``.mha``,
``.nrrd``, 2D ``.png``...), picks the axial slices with the most foreground and writes one PNG: the first row
shows the segmentation, the optional second row the reference segmentation on the same slices, and an
optional text band below shows the clinical note the segmentation was conditioned on. Rendering uses
matplotlib's Agg canvas directly (no pyplot, no display, safe in worker processes), and the PNG is written
atomically (temporary file in the target folder, then ``os.replace``).

:func:`preview_folder` (command ``nnunet-textguided preview``) does this for a few cases of an nnU-Net
prediction folder: the picture a person checks first after ``nnUNetv2_predict``. CT is shown in the abdominal
window; any other channel (MR, X-ray PNGs...) in a 1st-99th percentile window, as HU windows mean nothing there.
Multi-component images (RGB PNGs) are shown as grey values of their first component.

Orientation: 3D volumes are reoriented to LPS before display (``sitk.DICOMOrient``), so slices are shown
radiologically: anterior at the top, the patient's right on the image left.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import numpy as np

from ..io import atomic_path

__all__ = ["save_overlay_png", "select_slices", "WINDOW_ABDOMEN", "label_color", "preview_folder", "main"]

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
    if img.GetNumberOfComponentsPerPixel() > 1:  # e.g. an RGB png: show the first channel as grey values
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


def _display_range(image: np.ndarray, window) -> tuple[float, float, str]:
    """(vmin, vmax, title suffix) for ``window``: (width, level), ``"auto"`` (1st-99th percentile) or ``None``
    (full range: for images whose intensities are already meaningful as they are)."""
    if window is None:
        lo, hi, desc = float(image.min()), float(image.max()), "full range"
    elif isinstance(window, str):
        if window != "auto":
            raise ValueError(f'window must be (width, level), "auto" or None, got {window!r}')
        sample = image.ravel()[:: max(1, image.size // 2_000_000)]  # percentiles of a huge CT: a sample will do
        lo, hi = (float(v) for v in np.percentile(sample, [1, 99]))
        desc = f"p1-p99 {lo:g}..{hi:g}"
    else:
        width, level = (float(w) for w in window)
        return level - width / 2, level + width / 2, f"W{width:g}/L{level:g}"
    return lo, (hi if hi > lo else lo + 1.0), desc  # constant image: any non-empty range


#: Note band: lines at most, characters per line at most, font size (pt), inches per line.
_NOTE_LINES, _NOTE_CHARS, _NOTE_FONT, _NOTE_LINE_IN = 6, 100, 8, 0.16


def _wrap_note(note: str, width: int) -> list[str]:
    """``note`` wrapped paragraph by paragraph to ``width`` characters, at most ``_NOTE_LINES`` lines (a long
    note is cut with an ellipsis: the figure must stay a quick look whatever the note's length)."""
    lines = [ln for para in note.splitlines() if para.strip() for ln in textwrap.wrap(para, width)]
    if len(lines) > _NOTE_LINES:
        lines = lines[:_NOTE_LINES]
        lines[-1] = lines[-1][: width - 2].rstrip() + " \u2026"
    return lines


def save_overlay_png(image_file, seg_file, png_file, label_names: dict[int, str] | None = None,
                     reference_file=None, n_slices: int = 3, window=WINDOW_ABDOMEN,
                     alpha: float = 0.45, title: str | None = None, dpi: int = 100, note: str | None = None,
                     image_row: bool = False) -> Path:
    """Write a PNG with the ``n_slices`` most-foreground axial slices of ``image_file`` and ``seg_file`` overlaid.

    ``label_names`` maps label values to legend names (missing ones are shown as ``label k``); with
    ``reference_file`` a second row shows the reference segmentation on the same slices (slices are then
    chosen by the union of both). ``window`` is (width, level) in image units (HU for CT; W400/L50 by
    default), ``"auto"`` for the image's 1st-99th percentile (MR, X-ray PNGs...) or ``None`` for its full
    range. ``note`` (e.g. the case's clinical note) is shown wrapped in a text band under the panels, which
    makes the figure taller; at most 6 lines, longer notes end in an ellipsis. The image, the segmentation and
    the reference must share one voxel grid. ``image_row`` adds a first row with the image alone (what the
    overlays cover). Returns the path of the PNG.
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
    if image_row:
        rows.insert(0, ("image", np.zeros(image.shape, np.int32)))

    vmin, vmax, window_desc = _display_range(image, window)
    ny, nx = image.shape[1:]
    aspect = sy / sx
    panel_w = 3.2
    panel_h = panel_w * ny * aspect / nx
    fig_w, panels_h = panel_w * len(slices) + 1.6, panel_h * len(rows) + 0.8
    # ~0.6 em per character: a line of the note fits the figure's width, up to _NOTE_CHARS characters
    note_lines = _wrap_note(note, min(_NOTE_CHARS, int((fig_w - 0.3) * 72 / (0.6 * _NOTE_FONT)))) if note else []
    band_h = _NOTE_LINE_IN * len(note_lines) + 0.2 if note_lines else 0.0
    fig = Figure(figsize=(fig_w, panels_h + band_h), dpi=dpi)
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
    fig.suptitle(title if title is not None else f"{Path(str(image_file)).name}  ({window_desc})", fontsize=10)
    fig_h = fig.get_figheight()
    fig.subplots_adjust(left=0.04, right=1.0 - 1.5 / fig.get_figwidth(), top=1.0 - 0.55 / fig_h,
                        bottom=0.02 if not band_h else (0.02 * panels_h + band_h) / fig_h, wspace=0.03, hspace=0.03)
    if note_lines:  # parse_math=False: a "$" in a note is a dollar sign, not mathtext
        fig.text(0.04, (band_h - 0.1) / fig_h, "\n".join(note_lines), ha="left", va="top", fontsize=_NOTE_FONT,
                 linespacing=1.35, parse_math=False)

    png_file = Path(png_file)
    png_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(png_file) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return png_file


#: Endings tried, in this order, when no dataset.json tells the prediction folder's file ending.
_IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd", ".png", ".tif", ".tiff", ".bmp")


def _case_note(images_folder: Path, case: str) -> str | None:
    """The case's note ``<CASE>.txt`` and auxiliary note ``<CASE>.aux.txt`` (both optional) as one text."""
    parts = []
    for name, prefix in ((f"{case}.txt", ""), (f"{case}.aux.txt", "aux: ")):
        f = images_folder / name
        if f.is_file() and (text := f.read_text(encoding="utf-8").strip()):
            parts.append(prefix + text)
    return "\n".join(parts) or None


def preview_folder(pred_folder, images_folder, output_folder, reference_folder=None, dataset_json=None,
                   n_cases: int = 4, cases=None, n_slices: int = 3) -> list[Path]:
    """Write ``output_folder/<CASE>.png`` (image, prediction, reference, note) for a few cases of a prediction folder.

    Case ``X`` has its prediction ``X<ending>`` in ``pred_folder``, its image ``X_0000<ending>`` (channel 0)
    and optional notes ``X.txt`` / ``X.aux.txt`` in ``images_folder`` and, with ``reference_folder``, its
    reference ``X<ending>`` there. ``dataset_json`` (default: the copy nnU-Net's predictor leaves in
    ``pred_folder``, if any) gives the file ending, the label names and the channel name (CT: abdominal window,
    anything else: percentile window); without one the ending is the most common image ending present and the
    window is the percentile one. ``cases`` picks the cases, else ``n_cases`` evenly spread over the sorted case
    list (deterministic, so reruns show the same cases). All inputs are checked before anything is written.
    Returns the written paths.
    """
    pred_folder, images_folder, output_folder = Path(pred_folder), Path(images_folder), Path(output_folder)
    for name, folder in (("prediction", pred_folder), ("images", images_folder), ("reference", reference_folder)):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: {name} folder not found")
    if dataset_json is None and (pred_folder / "dataset.json").is_file():
        dataset_json = pred_folder / "dataset.json"
    try:
        dj = json.loads(Path(dataset_json).read_text(encoding="utf-8")) if dataset_json is not None else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{dataset_json}: not a valid dataset.json ({e})") from None
    files = sorted(f.name for f in pred_folder.iterdir() if f.is_file() and not f.name.startswith("."))
    ending = dj.get("file_ending") or max(_IMAGE_ENDINGS, key=lambda e: sum(f.endswith(e) for f in files))
    all_cases = [f[: -len(ending)] for f in files if f.endswith(ending)]
    if not all_cases:
        raise FileNotFoundError(f"{pred_folder}: no predictions (<CASE>{ending}) found")
    if cases:
        picked = list(cases)
        missing = [c for c in picked if c not in all_cases]
        if missing:
            raise FileNotFoundError(f"{pred_folder}: no prediction for case(s) {', '.join(missing)} "
                                    f"(expected {missing[0]}{ending}; present: {', '.join(all_cases[:5])}...)")
    else:
        n = max(1, min(int(n_cases), len(all_cases)))
        picked = [all_cases[i] for i in sorted({int(round(x)) for x in np.linspace(0, len(all_cases) - 1, n)})]
    names = {v: str(k) for k, v in dj.get("labels", {}).items() if isinstance(v, int) and v > 0}  # regions: no
    is_ct = str(dj.get("channel_names", {}).get("0", "")).strip().upper() == "CT"

    jobs = []
    for case in picked:
        image = images_folder / f"{case}_0000{ending}"
        if not image.is_file():
            raise FileNotFoundError(f"{image}: image for prediction {pred_folder / (case + ending)} not found; "
                                    f"{images_folder} should hold the input images as <CASE>_0000{ending} "
                                    "(nnU-Net raw layout, e.g. imagesTs)")
        ref = Path(reference_folder) / f"{case}{ending}" if reference_folder is not None else None
        if ref is not None and not ref.is_file():
            raise FileNotFoundError(f"{ref}: reference for case {case} not found; {reference_folder} should hold "
                                    f"the reference segmentations as <CASE>{ending} (e.g. labelsTs)")
        png = output_folder / f"{case}.png"
        if any(png.resolve() == f.resolve() for f in (image, ref, pred_folder / f"{case}{ending}") if f):
            raise ValueError(f"{png}: the preview would overwrite an input; choose another output folder")
        jobs.append((image, pred_folder / f"{case}{ending}", png, ref, _case_note(images_folder, case)))
    return [save_overlay_png(image, pred, png, names, reference_file=ref, n_slices=n_slices,
                             window=WINDOW_ABDOMEN if is_ct else "auto", note=note, image_row=True)
            for image, pred, png, ref, note in jobs]


def main(argv=None) -> int:
    """``nnunet-textguided preview``: preview PNGs of a prediction folder; 2 with a message on errors."""
    p = argparse.ArgumentParser(prog="nnunet-textguided preview",
                                description="PNG previews (image, prediction, reference, note) of a few cases of "
                                            "an nnU-Net prediction folder.")
    p.add_argument("-i", required=True, metavar="IMAGES", help="input images folder (<CASE>_0000<ending>, notes)")
    p.add_argument("-p", required=True, metavar="PRED", help="prediction folder (<CASE><ending>)")
    p.add_argument("-r", metavar="REF", help="reference segmentations folder (<CASE><ending>), e.g. labelsTs")
    p.add_argument("-o", metavar="OUT", help="output folder (default: PRED/previews)")
    p.add_argument("-djfile", metavar="dataset.json", help="dataset.json (default: PRED/dataset.json if present)")
    p.add_argument("-n", type=int, default=4, help="number of cases, evenly spread (default: 4)")
    p.add_argument("--cases", nargs="+", metavar="CASE", help="these cases instead")
    a = p.parse_args(argv)
    try:
        written = preview_folder(a.p, a.i, a.o or Path(a.p) / "previews", a.r, a.djfile, a.n, a.cases)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: SimpleITK cannot read a file
        print(f"nnunet-textguided preview: error: {e}", file=sys.stderr)
        return 2
    for f in written:
        print(f)
    return 0
