"""Synthetic contrast-enhanced abdominal CT phantoms, written as an nnU-Net v2 raw dataset with text notes.

The phantoms exist so that the whole text-guided pipeline (planning, preprocessing, text conditioning,
training, inference, evaluation) can be exercised end to end in minutes on a CPU, without any real patient
data. They are deliberately simple but CT-like:

* air outside an elliptical body (-1000 HU), a subcutaneous fat ring (~-100 HU), an abdominal wall of muscle
  (~50 HU), an abdominal cavity of soft tissue (~40 HU) with mesenteric fat patches and a few bowel gas
  pockets, a vertebra (bone ~700 HU, intervertebral discs, spinal canal, posterior elements) in the posterior
  midline, psoas muscles, and rib cross-sections in the upper slices;
* three labelled organs with portal-venous-phase enhancement:

  ====  ==========  ===========  =====================================================================
  lab   name        HU (mean)    where
  ====  ==========  ===========  =====================================================================
  1     liver       90 - 110     right upper quadrant (image left), large, with a left lobe reaching
                                 anteriorly across the midline
  2     spleen      120 - 140    left upper quadrant (image right), posterolateral, along the wall
  3     kidneys     170 - 195    both kidneys, retroperitoneal, either side of the spine, wrapped in
                                 perirenal fat (label 3 covers left *and* right kidney)
  ====  ==========  ===========  =====================================================================

Orientation convention (documented because the notes talk about "right" and "left"): arrays are z-y-x
(SimpleITK/nnU-Net order) and the images are written with an identity direction matrix in ITK's LPS world
frame, so x index increasing = towards the patient's Left, y index increasing = Posterior, z index
increasing = Superior. Displayed with row 0 at the top and column 0 at the left (``imshow`` default) an
axial slice therefore follows the radiological convention: anterior at the top and the **patient's right on
the image left**. The liver is on the image left, the spleen on the image right.

Per-case variation (random but deterministic for a given ``seed`` and case index): body size and offset, fat
thickness, organ sizes / positions / rotations / elongation, a smooth low-frequency shape deformation per
organ, organ HU, noise level (Gaussian, 15-25 HU sd, slightly correlated) and a set of "findings" that change
the anatomy *and* the clinical note: an enlarged liver (extending down to the lower pole of the right
kidney), an enlarged, small or absent (post-splenectomy) spleen, and a small left kidney. The clinical note
(``<CASE>.txt``) is generated from the case's actual findings and geometry; the auxiliary note
(``<CASE>.aux.txt``) is a short generic description of where the organs lie.

Geometry is defined in coordinates normalised to the field of view, so any ``shape`` gives a complete
abdomen; ``spacing`` is only written into the image headers (and used for volumes in mL). Organs never
overlap (priority kidneys > spleen > liver, with a small gap), stay inside the abdominal cavity, and never
reach the two lowest and two highest slices, so every volume has organ-free slices.

Public API: :func:`make_ct_phantom_dataset` (writes the dataset folder) and :func:`generate_phantom_case`
(one case in memory, used by tests and demos; ``split_kidneys=True`` labels the kidneys separately).

Partially labelled phantoms (universal training, CDPDNet): :func:`make_partial_phantom_datasets` writes
several datasets of *different* phantoms that each annotate only some organs (default: Dataset011
liver + spleen, Dataset012 right + left kidney; every other organ is background), with the full four-organ
truth of their test cases in ``labelsTs_full/``; ``nnunet-textguided merge -d 11 12 ...`` unites them.
Command: ``nnunet-textguided partial-phantoms``.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..io import atomic_path, atomic_write_json, atomic_write_text, staged_dataset_folder

__all__ = [
    "LABELS",
    "LABEL_DESCRIPTIONS",
    "PhantomCase",
    "generate_phantom_case",
    "make_ct_phantom_dataset",
    "case_identifier",
    "SPLIT_KIDNEY_LABELS",
    "PARTIAL_PHANTOM_DATASETS",
    "make_partial_phantom_datasets",
    "partial_phantom_seed",
]

#: nnU-Net label map of the phantom dataset.
LABELS: dict[str, int] = {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3}
#: Free-text description of every foreground label (written to dataset.json as ``label_descriptions``).
LABEL_DESCRIPTIONS: dict[str, str] = {"1": "liver", "2": "spleen", "3": "left and right kidneys"}
#: label map of ``generate_phantom_case(..., split_kidneys=True)`` (and of the partial phantoms' labelsTs_full).
SPLIT_KIDNEY_LABELS: dict[str, int] = {"background": 0, "liver": 1, "spleen": 2, "right kidney": 3, "left kidney": 4}
#: the two partially labelled phantom datasets of :func:`make_partial_phantom_datasets`: id -> (name, organs).
PARTIAL_PHANTOM_DATASETS: dict[int, tuple[str, list[str]]] = {
    11: ("PhantomLiverSpleen", ["liver", "spleen"]),
    12: ("PhantomKidneys", ["right kidney", "left kidney"]),
}

FILE_ENDING = ".nii.gz"
# Hard limits in normalised z (-1 = inferior edge of the volume, +1 = superior edge) outside which no organ
# is drawn; this leaves at least two organ-free slices at either end for the default 32 slices.
_Z_MIN, _Z_MAX = -0.85, 0.88


def case_identifier(index: int) -> str:
    """Case id of the ``index``-th case (training cases first, then test cases): ``phantom_000``..."""
    return f"phantom_{index:03d}"


@dataclass
class PhantomCase:
    """One generated case. ``image`` is int16 HU and ``label`` uint8, both z-y-x; ``spacing`` is z-y-x in mm."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    note: str
    aux_note: str
    findings: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------------------
class _Grid:
    """Normalised voxel-centre coordinates, broadcastable to the volume shape."""

    def __init__(self, shape: Sequence[int]):
        nz, ny, nx = (int(s) for s in shape)
        self.shape = (nz, ny, nx)
        self.z = (((np.arange(nz) + 0.5) / nz) * 2 - 1).reshape(nz, 1, 1)
        self.v = (((np.arange(ny) + 0.5) / ny) * 2 - 1).reshape(1, ny, 1)  # + = posterior
        self.u = (((np.arange(nx) + 0.5) / nx) * 2 - 1).reshape(1, 1, nx)  # + = patient's left


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], coarse: Sequence[int]) -> np.ndarray:
    """Smooth random field (zero mean, unit sd): coarse white noise spread with separable Gaussian bases.

    (Separable matrix products instead of ``ndimage.zoom``: ~100x faster at these sizes.)
    """
    coarse = tuple(max(2, int(c)) for c in coarse)
    f = rng.standard_normal(coarse)
    for axis, (n, c) in enumerate(zip(shape, coarse)):
        x = (np.arange(n) + 0.5) / n  # voxel centres in (0, 1)
        centres = (np.arange(c) + 0.5) / c
        w = 1.0 / c  # basis width = coarse node spacing
        m = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / w) ** 2)  # (n, c)
        f = np.moveaxis(np.tensordot(m, f, axes=([1], [axis])), 0, axis)
    sd = f.std()
    return (f - f.mean()) / (sd if sd > 0 else 1.0)


def _ellipsoid_r(g: _Grid, center, axes, angle_deg: float = 0.0, deform: np.ndarray | None = None,
                 deform_amp: float = 0.0) -> np.ndarray:
    """Normalised ellipsoid 'radius' (<1 inside). center/axes are (z, v, u); rotation is in-plane (axial)."""
    zc, vc, uc = center
    az, av, au = axes
    du, dv, dz = g.u - uc, g.v - vc, g.z - zc
    if angle_deg:
        t = math.radians(angle_deg)
        du, dv = math.cos(t) * du + math.sin(t) * dv, -math.sin(t) * du + math.cos(t) * dv
    r = np.sqrt((dz / az) ** 2 + (dv / av) ** 2 + (du / au) ** 2)
    if deform is not None and deform_amp:
        r = r * (1.0 + deform_amp * deform)
    return r


def _smooth_union(r1: np.ndarray, r2: np.ndarray, k: float = 10.0) -> np.ndarray:
    """Smooth minimum of two radius fields (rounded junction instead of a crease)."""
    m = np.minimum(r1, r2)
    return m - np.log(np.exp(-k * (r1 - m)) + np.exp(-k * (r2 - m))) / k


def _largest_component(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == int(np.argmax(counts))


# ----------------------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------------------
def _draw_findings(rng: np.random.Generator) -> dict:
    spleen_state = rng.choice(["normal", "enlarged", "small", "absent"], p=[0.55, 0.17, 0.13, 0.15])
    return {
        "liver_enlarged": bool(rng.random() < 0.3),
        "spleen_state": str(spleen_state),
        "left_kidney_small": bool(rng.random() < 0.15),
    }


def _checked_geometry(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three ints >= 8 (z, y, x), got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive floats (z, y, x) in mm, got {spacing}")
    return shape, spacing


def generate_phantom_case(index: int, seed: int = 0, shape: Sequence[int] = (32, 64, 64),
                          spacing: Sequence[float] = (2.5, 1.25, 1.25), split_kidneys: bool = False) -> PhantomCase:
    """Generate case number ``index`` of the phantom series ``seed`` in memory.

    A case depends only on ``(seed, index, shape)``, not on how many other cases are generated, so
    ``phantom_003`` is the same whether a dataset has 5 or 50 training cases.

    ``split_kidneys=True`` labels the two kidneys separately (:data:`SPLIT_KIDNEY_LABELS`: liver 1, spleen 2,
    right kidney 3, left kidney 4); the image, notes and findings are the same as with the default labels
    (liver 1, spleen 2, both kidneys 3).
    """
    shape, spacing = _checked_geometry(shape, spacing)
    rng = np.random.default_rng([int(seed), int(index), 0x5EED])
    g = _Grid(shape)
    U = rng.uniform
    findings = _draw_findings(rng)

    # ---- body, fat ring, abdominal wall, cavity ----------------------------------------------------------
    cx, cy = U(-0.03, 0.03), U(-0.05, 0.02)
    bx, by = U(0.80, 0.92), U(0.62, 0.74)
    taper = 1.0 + U(0.0, 0.05) * g.z  # slightly wider body superiorly
    r_body = np.sqrt(((g.u - cx) / (bx * taper)) ** 2 + ((g.v - cy) / (by * taper)) ** 2)
    r_body = np.broadcast_to(r_body, shape)
    t_fat, t_wall = U(0.10, 0.17), U(0.05, 0.08)
    body = r_body < 1.0
    inner_fat = r_body < 1.0 - t_fat
    cavity = r_body < 1.0 - t_fat - t_wall
    z_ok = (g.z > _Z_MIN) & (g.z < _Z_MAX)

    # ---- spine (posterior midline) --------------------------------------------------------------------------
    vb_c = (cy + by * U(0.36, 0.42), cx)  # (v, u)
    vb_r = (U(0.085, 0.10), U(0.10, 0.12))  # (v, u) half-axes of the vertebral body
    r_vb = np.sqrt(((g.v - vb_c[0]) / vb_r[0]) ** 2 + ((g.u - vb_c[1]) / vb_r[1]) ** 2) + 0 * g.z
    canal_v = vb_c[0] + vb_r[0] + 0.05
    r_canal = np.sqrt(((g.v - canal_v) / 0.045) ** 2 + ((g.u - cx) / 0.045) ** 2) + 0 * g.z
    r_arch = np.sqrt(((g.v - canal_v) / 0.075) ** 2 + ((g.u - cx) / 0.085) ** 2) + 0 * g.z
    spin_len = max(0.04, (cy + by * (1 - t_fat) - 0.03 - canal_v) / 2)
    r_spinous = np.sqrt(((g.v - (canal_v + spin_len)) / spin_len) ** 2 + ((g.u - cx) / 0.03) ** 2) + 0 * g.z
    disc_period, disc_phase = U(0.55, 0.65), U(0, 1)
    is_disc = (((g.z / disc_period) + disc_phase) % 1.0) < 0.14
    vertebral_body = (r_vb < 1.0) & body
    posterior_elements = ((r_arch < 1.0) | (r_spinous < 1.0)) & ~(r_canal < 1.0) & body
    spine_keepout = (r_vb < 1.45) | (r_arch < 1.5) | (r_spinous < 1.3)

    # ---- per-organ smooth deformation fields ---------------------------------------------------------------
    coarse = (4, 5, 5)
    d_liver, d_spleen, d_kid_r, d_kid_l, d_tex = (_smooth_field(rng, shape, coarse) for _ in range(5))

    # ---- kidneys (label 3), highest priority ---------------------------------------------------------------
    kidney_r_fields, kidney_masks, sinus_masks = {}, {}, {}
    for side, sgn, dfield in (("right", -1.0, d_kid_r), ("left", 1.0, d_kid_l)):
        zc = U(-0.38, -0.25) if side == "right" else U(-0.30, -0.16)  # right kidney sits lower
        center = (zc, cy + by * U(0.30, 0.40), cx + sgn * U(0.27, 0.33))
        axes = np.array([U(0.28, 0.36), U(0.14, 0.17), U(0.11, 0.14)])
        if side == "left" and findings["left_kidney_small"]:
            axes = axes * U(0.65, 0.75)
            center = (center[0], center[1], cx + sgn * (abs(center[2] - cx) - 0.02))
        angle = sgn * U(20, 35)
        r = _ellipsoid_r(g, center, axes, angle, dfield, 0.05)
        # renal sinus / hilum: a notch on the antero-medial side makes the kidney bean-shaped
        hil = (center[0], center[1] - 0.35 * axes[1], center[2] - sgn * 0.85 * axes[2])
        r_sinus = _ellipsoid_r(g, hil, axes * np.array([0.5, 0.5, 0.5]), angle)
        kidney_r_fields[side] = r
        sinus_masks[side] = r_sinus < 1.0
        kidney_masks[side] = _largest_component((r < 1.0) & ~sinus_masks[side] & cavity & z_ok & ~spine_keepout)
    kidney_keepout = (kidney_r_fields["right"] < 1.2) | (kidney_r_fields["left"] < 1.2)
    perirenal = ((kidney_r_fields["right"] < 1.4) | (kidney_r_fields["left"] < 1.4)) & cavity

    # ---- spleen (label 2) -------------------------------------------------------------------------------------
    spleen_state = findings["spleen_state"]
    spleen_mask = np.zeros(shape, bool)
    r_spleen = np.full(shape, np.inf)
    if spleen_state != "absent":
        z_top = U(0.50, 0.66)
        axes = np.array([U(0.28, 0.36), U(0.24, 0.30), U(0.12, 0.16)])
        if spleen_state == "enlarged":
            axes = axes * np.array([U(1.35, 1.5), U(1.3, 1.45), U(1.25, 1.4)])
        elif spleen_state == "small":
            axes = axes * U(0.55, 0.68)
        center_u = cx + U(0.50, 0.58) * (1.0 if spleen_state != "enlarged" else 0.95)
        center_v = cy + U(0.10, 0.22)
        # long axis along the posterolateral wall: tangent of the body ellipse at the spleen's centre
        theta = math.atan2((center_v - cy) / by, (center_u - cx) / bx)
        tangent = math.degrees(math.atan2(by * math.cos(theta), -bx * math.sin(theta)))
        center = (z_top - axes[0], center_v, center_u)
        # axes are (z, long, short); the rotated u' axis (the long one) points along `tangent`
        r_spleen = _ellipsoid_r(g, center, axes[[0, 2, 1]], tangent, d_spleen, 0.07)
        spleen_mask = _largest_component((r_spleen < 1.0) & cavity & z_ok & ~spine_keepout & ~kidney_keepout)
    spleen_keepout = r_spleen < 1.15

    # ---- liver (label 1): right lobe + left lobe, lowest priority ----------------------------------------------
    z_top = U(0.66, 0.80)
    ax_r = np.array([U(0.42, 0.50), U(0.40, 0.50), U(0.34, 0.42)])  # (z, v, u)
    ax_l = np.array([U(0.25, 0.33), U(0.14, 0.20), U(0.25, 0.32)])
    if findings["liver_enlarged"]:
        ax_r = ax_r * np.array([U(1.35, 1.5), U(1.05, 1.15), U(1.10, 1.20)])
        ax_l = ax_l * np.array([U(1.1, 1.25), U(1.1, 1.2), U(1.15, 1.3)])
    c_r = (z_top - ax_r[0], cy + U(-0.10, 0.02), cx - U(0.36, 0.44))
    c_l = (z_top - ax_l[0] - U(0.02, 0.10), cy - U(0.25, 0.35), cx + U(-0.05, 0.08))
    r_liver = _smooth_union(_ellipsoid_r(g, c_r, ax_r, U(-10, 10)), _ellipsoid_r(g, c_l, ax_l, U(-15, 5)))
    r_liver = r_liver * (1.0 + 0.07 * d_liver)
    liver_mask = _largest_component(
        (r_liver < 1.0) & cavity & z_ok & ~spine_keepout & ~kidney_keepout & ~spleen_keepout)

    kidney_mask = kidney_masks["right"] | kidney_masks["left"]
    label = np.zeros(shape, np.uint8)
    label[liver_mask] = LABELS["liver"]
    label[spleen_mask] = LABELS["spleen"]
    if split_kidneys:
        label[kidney_masks["right"]] = SPLIT_KIDNEY_LABELS["right kidney"]
        label[kidney_masks["left"]] = SPLIT_KIDNEY_LABELS["left kidney"]
    else:
        label[kidney_mask] = LABELS["kidneys"]

    # ---- intensities ----------------------------------------------------------------------------------------
    hu = {
        "fat": U(-110, -90), "wall": U(45, 55), "soft": U(35, 45), "liver": U(92, 108), "spleen": U(125, 140),
        "kidney": U(182, 198), "bone": U(650, 750), "disc": U(70, 100), "canal": U(5, 20),
    }
    img = np.full(shape, -1000.0, np.float32)
    img[body] = hu["fat"]
    img[inner_fat] = hu["wall"]
    img[cavity] = hu["soft"]
    # mesenteric fat patches and bowel gas pockets, away from the organs
    organ_near = (r_liver < 1.25) | (r_spleen < 1.25) | kidney_keepout
    fat_field = _smooth_field(rng, shape, (8, 14, 14))
    img[cavity & (fat_field > 1.1) & ~organ_near] = hu["fat"] + 10
    gas_field = _smooth_field(rng, shape, (10, 22, 22))
    gas = cavity & (gas_field > 2.3) & ~organ_near & (g.v < cy + 0.1) & ~perirenal
    img[gas] = U(-950, -850)
    img[perirenal] = hu["fat"] + 5
    # psoas muscles beside the vertebral body in the lower half
    for sgn in (-1.0, 1.0):
        grow = np.clip(0.5 - g.z, 0.0, 1.5) / 1.5  # 0 above z=0.5, growing inferiorly
        r_ps = np.sqrt(((g.v - vb_c[0] + 0.01) / (0.02 + 0.07 * grow)) ** 2 +
                       ((g.u - (cx + sgn * (vb_r[1] + 0.01 + 0.06 * grow))) / (0.02 + 0.06 * grow)) ** 2)
        img[(r_ps < 1.0) & cavity & (grow > 0)] = hu["wall"]
    # ribs: small bony cross-sections in the abdominal wall, upper slices, intermittent along z
    r_mid_wall = 1.0 - t_fat - t_wall / 2
    for j, ang in enumerate((-150, -125, -55, -30, 25, 50, 130, 155)):
        t = math.radians(ang + U(-6, 6))
        ru_c = cx + r_mid_wall * bx * math.cos(t)
        rv_c = cy + r_mid_wall * by * math.sin(t)
        present = (np.sin(2 * math.pi * g.z / 0.45 + U(0, 2 * math.pi)) > 0.1) & (g.z > -0.35)
        r_rib = np.sqrt(((g.u - ru_c) / 0.03) ** 2 + ((g.v - rv_c) / 0.022) ** 2)
        img[(r_rib < 1.0) & present & body] = hu["bone"] - 50
    # organs, with a gentle low-frequency enhancement texture
    tex = 4.0 * d_tex
    for mask, key in ((liver_mask, "liver"), (spleen_mask, "spleen"), (kidney_mask, "kidney")):
        img[mask] = hu[key] + tex[mask]
    # spine
    img[vertebral_body & ~np.broadcast_to(is_disc, shape)] = hu["bone"]
    img[vertebral_body & np.broadcast_to(is_disc, shape)] = hu["disc"]
    img[posterior_elements & ~np.broadcast_to(is_disc, shape)] = hu["bone"]
    img[(r_canal < 1.0) & body] = hu["canal"]

    # ---- blur (partial volume) + correlated Gaussian noise --------------------------------------------------
    sig = (0.3, 0.5, 0.5)
    img = ndimage.gaussian_filter(img, sig, mode="nearest")
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.3, 0.5, 0.5))
    noise_sd = U(15.0, 25.0)
    img += noise * (noise_sd / max(float(noise.std()), 1e-6))
    image = np.clip(np.rint(img), -1024, 3071).astype(np.int16)

    # ---- measurements, notes --------------------------------------------------------------------------------
    vox_ml = float(np.prod(spacing)) / 1000.0

    def zr(m):
        zs = np.flatnonzero(m.any(axis=(1, 2)))
        return (int(zs[0]), int(zs[-1])) if zs.size else None

    liver_z, rk_z = zr(liver_mask), zr(kidney_masks["right"])
    liver_reaches_kidney_pole = bool(liver_z and rk_z and liver_z[0] <= rk_z[0] + 1)
    findings = dict(findings)
    findings.update({
        "liver_reaches_right_kidney_lower_pole": liver_reaches_kidney_pole,
        "volumes_ml": {
            "liver": round(float(liver_mask.sum()) * vox_ml, 2),
            "spleen": round(float(spleen_mask.sum()) * vox_ml, 2),
            "right_kidney": round(float(kidney_masks["right"].sum()) * vox_ml, 2),
            "left_kidney": round(float(kidney_masks["left"].sum()) * vox_ml, 2),
        },
        "z_range": {"liver": liver_z, "spleen": zr(spleen_mask), "right_kidney": rk_z,
                    "left_kidney": zr(kidney_masks["left"])},
        "hu_nominal": {k: round(float(v), 1) for k, v in hu.items()},
        "noise_sd": round(float(noise_sd), 2),
    })
    note = _clinical_note(rng, findings)
    aux = _aux_note(findings)
    return PhantomCase(case_identifier(index), image, label, spacing, note, aux, findings)


def _clinical_note(rng: np.random.Generator, f: dict) -> str:
    opener = ["Contrast-enhanced abdominal CT.", "Contrast-enhanced CT of the abdomen, portal venous phase.",
              "Abdominal CT with intravenous contrast."][int(rng.integers(3))]
    if f["liver_enlarged"]:
        liver = ("enlarged liver extending to the lower pole of the right kidney"
                 if f["liver_reaches_right_kidney_lower_pole"] else "enlarged liver (hepatomegaly)")
    else:
        liver = ["liver normal in size", "normal-sized liver with homogeneous enhancement"][int(rng.integers(2))]
    spleen = {
        "normal": "spleen normal in size",
        "enlarged": "enlarged spleen (splenomegaly)",
        "small": "small spleen",
        "absent": "spleen not visualized, consistent with prior splenectomy",
    }[f["spleen_state"]]
    kidneys = ("small left kidney, right kidney normal" if f["left_kidney_small"]
               else "both kidneys normal in size and position")
    findings = f"{liver}; {spleen}; {kidneys}."
    return f"{opener} {findings[0].upper()}{findings[1:]}"


def _aux_note(f: dict) -> str:
    spleen = ("the splenic fossa in the left upper quadrant is empty" if f["spleen_state"] == "absent"
              else "the spleen lies posterolaterally in the left upper quadrant (image right)")
    return ("Axial abdominal CT, patient's right on the image left. The liver fills the right upper quadrant "
            f"(image left); {spleen}; both kidneys lie in the retroperitoneum on either side of the spine.")


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------
def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text.rstrip("\n") + "\n")


def _atomic_write_image(path: Path, arr: np.ndarray, spacing_zyx: Sequence[float]) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(s) for s in spacing_zyx[::-1]])  # SimpleITK wants x, y, z
    img.SetOrigin((0.0, 0.0, 0.0))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    # the temporary name must keep the .nii.gz ending: SimpleITK picks the writer from the extension
    with atomic_path(path, suffix=FILE_ENDING) as tmp:
        sitk.WriteImage(img, tmp, useCompression=True)


def _write_dataset_json(folder: Path, num_training: int, dataset_name: str, seed: int, shape, spacing,
                        labels: dict | None = None, label_descriptions: dict | None = None, extra_description: str = "",
                        converted_by: str = "nnunet_textguided.data.synthetic.make_ct_phantom_dataset") -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    tmpdir = Path(tempfile.mkdtemp(dir=folder, prefix=".dataset_json."))
    try:
        generate_dataset_json(
            str(tmpdir),
            channel_names={0: "CT"},
            labels=dict(LABELS if labels is None else labels),
            num_training_cases=num_training,
            file_ending=FILE_ENDING,
            dataset_name=dataset_name,
            description=("Synthetic contrast-enhanced abdominal CT phantoms (nnunet_textguided.data.synthetic, "
                         f"seed={seed}, shape={list(shape)}, spacing={list(spacing)}). Per-case clinical notes "
                         "in imagesTr|imagesTs/<CASE>.txt, auxiliary notes in <CASE>.aux.txt. Orientation: "
                         "identity direction (LPS), patient's right on the image left." + extra_description),
            license="CC0 (synthetic data)",
            converted_by=converted_by,
            label_descriptions=dict(LABEL_DESCRIPTIONS if label_descriptions is None else label_descriptions),
        )
        os.replace(tmpdir / "dataset.json", folder / "dataset.json")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def make_ct_phantom_dataset(raw_root, dataset_id: int = 990, name: str = "TextGuidedPhantom", n_train: int = 10,
                            n_test: int = 3, shape: Sequence[int] = (32, 64, 64),
                            spacing: Sequence[float] = (2.5, 1.25, 1.25), seed: int = 0,
                            overwrite: bool = False) -> Path:
    """Write synthetic CT phantoms as the nnU-Net v2 raw dataset ``raw_root/DatasetXXX_Name`` and return its path.

    Layout::

        DatasetXXX_Name/
            dataset.json                       (nnU-Net's generate_dataset_json + label_descriptions)
            imagesTr/phantom_000_0000.nii.gz   int16 HU, spacing (z, y, x) = ``spacing``
            imagesTr/phantom_000.txt           clinical note generated from the case's findings (UTF-8)
            imagesTr/phantom_000.aux.txt       short generic description of where the organs lie
            labelsTr/phantom_000.nii.gz        uint8, 0 background, 1 liver, 2 spleen, 3 kidneys
            imagesTs/phantom_010_0000.nii.gz (+ .txt, .aux.txt), labelsTs/phantom_010.nii.gz

    Training cases are ``phantom_000`` .. ``phantom_{n_train-1}``, test cases continue the numbering. Every
    file is written atomically (temporary file in the same folder, then ``os.replace``), and the dataset is
    assembled in a hidden staging folder beside the target and moved into place at the end, so an
    interrupted run never leaves a half-written ``DatasetXXX_Name``. An existing dataset folder is only
    replaced with ``overwrite=True``; a *different* folder with the same dataset id is always an error
    (nnU-Net could no longer resolve the id).
    """
    dataset_id = int(dataset_id)
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be in 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name or ""):
        raise ValueError(f"name must be letters, digits, '_' or '-' (no spaces or slashes), got {name!r}")
    n_train, n_test = int(n_train), int(n_test)
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    shape, spacing = _checked_geometry(shape, spacing)

    raw_root = Path(raw_root).expanduser().resolve()
    dataset_name = f"Dataset{dataset_id:03d}_{name}"
    with staged_dataset_folder(raw_root, dataset_id, dataset_name, overwrite) as staging:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (staging / sub).mkdir()
        for i in range(n_train + n_test):
            split = "Tr" if i < n_train else "Ts"
            case = generate_phantom_case(i, seed=seed, shape=shape, spacing=spacing)
            img_dir, lab_dir = staging / f"images{split}", staging / f"labels{split}"
            _atomic_write_image(img_dir / f"{case.case_id}_0000{FILE_ENDING}", case.image, spacing)
            _atomic_write_image(lab_dir / f"{case.case_id}{FILE_ENDING}", case.label, spacing)
            _atomic_write_text(img_dir / f"{case.case_id}.txt", case.note)
            _atomic_write_text(img_dir / f"{case.case_id}.aux.txt", case.aux_note)
        _write_dataset_json(staging, n_train, dataset_name, seed, shape, spacing)
    return raw_root / dataset_name


# ----------------------------------------------------------------------------------------------------------
# partially labelled datasets (universal training)
# ----------------------------------------------------------------------------------------------------------
def partial_phantom_seed(seed: int, position: int) -> int:
    """Phantom series seed of the ``position``-th (0-based) dataset of :func:`make_partial_phantom_datasets`.

    Every dataset gets its own phantoms (a real multi-dataset collection has different patients per dataset),
    derived deterministically from the user's ``seed`` and the dataset's position.
    """
    return int(np.random.SeedSequence([int(seed), int(position), 0x9A27]).generate_state(1)[0])


def _check_partial_datasets(datasets) -> dict[int, tuple[str, list[str]]]:
    datasets = dict(PARTIAL_PHANTOM_DATASETS if datasets is None else datasets)
    if not datasets:
        raise ValueError("datasets is empty")
    organs_known = [k for k in SPLIT_KIDNEY_LABELS if k != "background"]
    out = {}
    for dataset_id, spec in datasets.items():
        dataset_id = int(dataset_id)
        if not 1 <= dataset_id <= 999:
            raise ValueError(f"dataset ids must be in 1..999, got {dataset_id}")
        try:
            name, organs = spec
        except (TypeError, ValueError):
            raise ValueError(f"datasets[{dataset_id}] must be (name, [organs]), got {spec!r}") from None
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name or ""):
            raise ValueError(f"name must be letters, digits, '_' or '-' (no spaces or slashes), got {name!r}")
        organs = list(organs)
        if not organs or len(set(organs)) != len(organs) or not set(organs) <= set(organs_known):
            raise ValueError(f"datasets[{dataset_id}]: organs must be distinct names among {organs_known}, "
                             f"got {organs}")
        out[dataset_id] = (name, organs)
    return out


def make_partial_phantom_datasets(raw_root, datasets: dict[int, tuple[str, Sequence[str]]] | None = None,
                                  n_train: int = 6, n_test: int = 2, shape: Sequence[int] = (32, 64, 64),
                                  spacing: Sequence[float] = (2.5, 1.25, 1.25), seed: int = 0,
                                  overwrite: bool = False) -> list[Path]:
    """Write partially labelled phantom datasets (one per entry of ``datasets``) and return their paths.

    ``datasets`` maps a dataset id to ``(name, organs)``, organs among "liver", "spleen", "right kidney",
    "left kidney"; default :data:`PARTIAL_PHANTOM_DATASETS` (11: liver + spleen, 12: right + left kidney).
    Each is a normal nnU-Net raw dataset laid out like :func:`make_ct_phantom_dataset` (notes and auxiliary
    notes included) whose labels are only its organs, codes 1.. in the listed order, named by the organ
    (``label_descriptions`` likewise); every other organ is background. The phantoms differ between datasets
    (series seed :func:`partial_phantom_seed` ``(seed, position)``); case ids are ``phantom_000``... in every
    dataset. Beside imagesTs/labelsTs (the dataset's own labels), ``labelsTs_full/`` holds the full four-organ
    truth of the test cases (``generate_phantom_case(i, partial_phantom_seed(seed, position),
    split_kidneys=True).label``) and ``labelsTs_full.json`` its label map (:data:`SPLIT_KIDNEY_LABELS`), to
    evaluate organs a dataset never annotates. Every target is checked before anything is written; an
    existing dataset is only replaced with ``overwrite=True``.
    """
    datasets = _check_partial_datasets(datasets)
    n_train, n_test = int(n_train), int(n_test)
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    shape, spacing = _checked_geometry(shape, spacing)
    raw_root = Path(raw_root).expanduser().resolve()
    names = {i: f"Dataset{i:03d}_{name}" for i, (name, _) in datasets.items()}
    for dataset_id, dataset_name in names.items():  # fail before writing anything
        target = raw_root / dataset_name
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
        clash = sorted(p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.name != dataset_name)
        if clash:
            raise FileExistsError(f"{raw_root} already holds {clash} with dataset id {dataset_id}; nnU-Net could not "
                                  f"tell it from {dataset_name}. Pick another id or remove it.")
    out = []
    for position, (dataset_id, (name, organs)) in enumerate(datasets.items()):
        series = partial_phantom_seed(seed, position)
        labels = {"background": 0, **{o: i + 1 for i, o in enumerate(organs)}}
        lut = np.zeros(max(SPLIT_KIDNEY_LABELS.values()) + 1, np.uint8)
        for o, code in labels.items():
            lut[SPLIT_KIDNEY_LABELS[o]] = code
        dataset_name = names[dataset_id]
        with staged_dataset_folder(raw_root, dataset_id, dataset_name, overwrite) as staging:
            for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "labelsTs_full"):
                (staging / sub).mkdir()
            for i in range(n_train + n_test):
                split = "Tr" if i < n_train else "Ts"
                case = generate_phantom_case(i, seed=series, shape=shape, spacing=spacing, split_kidneys=True)
                img_dir, lab_dir = staging / f"images{split}", staging / f"labels{split}"
                _atomic_write_image(img_dir / f"{case.case_id}_0000{FILE_ENDING}", case.image, spacing)
                _atomic_write_image(lab_dir / f"{case.case_id}{FILE_ENDING}", lut[case.label], spacing)
                if split == "Ts":
                    _atomic_write_image(staging / "labelsTs_full" / f"{case.case_id}{FILE_ENDING}", case.label,
                                        spacing)
                _atomic_write_text(img_dir / f"{case.case_id}.txt", case.note)
                _atomic_write_text(img_dir / f"{case.case_id}.aux.txt", case.aux_note)
            atomic_write_json(staging / "labelsTs_full.json", {"labels": dict(SPLIT_KIDNEY_LABELS)}, sort_keys=False)
            others = [o for o in SPLIT_KIDNEY_LABELS if o not in labels]
            _write_dataset_json(
                staging, n_train, dataset_name, series, shape, spacing, labels=labels,
                label_descriptions={str(code): o for o, code in labels.items() if code},
                extra_description=(f" Partially labelled (make_partial_phantom_datasets, seed={seed}, position "
                                   f"{position}): only {', '.join(organs)} annotated; {', '.join(others)} are "
                                   "background. labelsTs_full/ holds the full truth of the test cases "
                                   "(label map in labelsTs_full.json)."),
                converted_by="nnunet_textguided.data.synthetic.make_partial_phantom_datasets")
        out.append(raw_root / dataset_name)
    return out


def partial_phantoms_main(argv: list[str] | None = None) -> int:
    """``nnunet-textguided partial-phantoms``: write the partially labelled phantom datasets."""
    p = argparse.ArgumentParser(
        prog="nnunet-textguided partial-phantoms",
        description="Write two partially labelled synthetic CT phantom datasets as nnU-Net raw datasets: "
                    + ", ".join(f"Dataset{i:03d}_{n} ({' + '.join(o)})" for i, (n, o) in
                                PARTIAL_PHANTOM_DATASETS.items())
                    + "; each annotates only its organs (the others are background), different phantoms per "
                      "dataset, full 4-organ truth of the test cases in labelsTs_full/.",
        epilog="then: nnunet-textguided merge -d 11 12 -o 200 --name PhantomUniversal")
    p.add_argument("--raw", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("--n-train", type=int, default=6, help="training cases per dataset (default: 6)")
    p.add_argument("--n-test", type=int, default=2, help="test cases per dataset (default: 2)")
    p.add_argument("--shape", type=int, nargs=3, default=(32, 64, 64), metavar=("Z", "Y", "X"),
                   help="volume size in voxels (default: 32 64 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace existing datasets")
    a = p.parse_args(argv)
    raw = a.raw or os.environ.get("nnUNet_raw")
    if not raw:
        print("nnunet-textguided partial-phantoms: error: pass --raw DIR or set nnUNet_raw", file=sys.stderr)
        return 2
    try:
        paths = make_partial_phantom_datasets(raw, n_train=a.n_train, n_test=a.n_test, shape=a.shape, seed=a.seed,
                                              overwrite=a.overwrite)
    except (ValueError, FileExistsError) as e:
        print(f"nnunet-textguided partial-phantoms: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def phantom_universal_dataset_json() -> dict:
    """dataset.json of a universal dataset with the phantom's labels (liver, spleen, kidneys) from two tasks
    (liver + spleen, kidneys): builds universal (CDPDNet) networks without data (parameter counts, benchmark)."""
    from .merge import universal_dataset_json
    return universal_dataset_json(
        ["liver", "spleen", "kidneys"], {},
        [{"name": "LiverSpleen", "labels": ["liver", "spleen"]}, {"name": "Kidneys", "labels": ["kidneys"]}],
        {"0": "CT"}, FILE_ENDING, "Dataset000_PhantomUniversal", num_training=1)
