"""Positional channels that let per-slice tables follow nnU-Net's augmentation (BiCLIP paper mode).

nnU-Net's loader crops patches and its transforms rotate, scale and flip them; the network only ever sees
the tensor. To know which source slice each patch slice came from, two channels ride along with the image:
(case index + 1) and (slice index + 1), 0 outside the volume. They are appended lazily by the dataset (so
the loader's crop/pad reads only the patch), moved to ``regression_target`` for the transforms (spatial and
mirror transforms move it exactly like the image, intensity transforms skip it) and appended back afterwards.
At prediction the note-aware predictor appends them to the whole case, and the sliding window and test-time
mirroring move them exactly like the image.

Border bias, and how it is avoided: the loader pads a patch beyond the volume with 0, and the spatial transform
interpolates (and pads its own border with 0). Interpolating a slice coordinate z + 1 with those zeros gives
values between 0 and z + 1 — a border slice of a scaled patch would read as a slice half-way up the volume. So
for the transforms the coordinate is first extended linearly over the whole patch (the crop is axis-aligned:
z + 1 = k + offset on patch slice k) and sent with a validity map of ones; afterwards coordinate / validity is
the exact interpolated source coordinate wherever validity > 0.5, and a coordinate outside [1, D] means "beyond
the volume" (``TableSliceConditioner.table_rows``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..conditioning.slices import NUM_POSITION_CHANNELS


def position_channels(case_index: int, shape: tuple[int, ...], slicer=None) -> np.ndarray:
    """(2, *shape) float32 [case+1, z+1] maps for the region `slicer` (tuple of slices over D, H, W)."""
    full = [np.arange(s) for s in shape]
    if slicer is not None:
        full = [ax[sl] for ax, sl in zip(full, slicer)]
    out = np.empty((NUM_POSITION_CHANNELS, *[len(a) for a in full]), dtype=np.float32)
    out[0] = case_index + 1
    out[1] = (full[0] + 1).reshape((-1,) + (1,) * (len(full) - 1))
    return out


def append_position_channels(data: torch.Tensor | np.ndarray, case_index: int):
    """(C, D, H, W) -> (C + 2, D, H, W)."""
    pos = position_channels(case_index, tuple(data.shape[1:]))
    if torch.is_tensor(data):
        return torch.cat((data, torch.from_numpy(pos).to(data.dtype)), 0)
    return np.concatenate((np.asarray(data), pos.astype(data.dtype)), 0)


class PositionedArray:
    """Read-only view of a (C, D, H, W) case array with the two positional channels appended.

    Supports what nnU-Net's loader and validation use: ``shape``, ``dtype``, ``[:]`` and slicing with a tuple
    of slices (acvl_utils.crop_and_pad_nd). Only the requested region of the underlying blosc2/numpy array
    is read.
    """

    def __init__(self, data, case_index: int):
        self.data, self.case_index = data, case_index
        self.shape = (data.shape[0] + NUM_POSITION_CHANNELS, *data.shape[1:])
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __getitem__(self, item):
        if not isinstance(item, tuple):
            item = (item,)
        item = item + (slice(None),) * (self.ndim - len(item))
        if item[0] != slice(None) or any(not isinstance(s, slice) or s.step not in (None, 1) for s in item):
            raise IndexError("PositionedArray supports only [:, d0:d1, h0:h1, w0:w1]-style slicing")
        spatial = tuple(slice(*s.indices(n)[:2]) for s, n in zip(item[1:], self.shape[1:]))
        img = np.asarray(self.data[(slice(None),) + spatial], dtype=np.float32)
        return np.concatenate((img, position_channels(self.case_index, self.shape[1:], spatial)), 0)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class PositionedDataset:
    """Wraps an nnU-Net dataset instance: load_case returns PositionedArray data; everything else delegates.

    A module-level class (not a dynamic subclass) so data-loader workers can pickle it under spawn too.
    """

    def __init__(self, dataset, case_indices: dict[str, int]):
        self.dataset, self.case_indices = dataset, dict(case_indices)

    def __getattr__(self, name):
        if name.startswith("__") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        return PositionedArray(data, self.case_indices[identifier]), seg, seg_prev, properties


def transformable_position(pos: torch.Tensor) -> torch.Tensor:
    """Loader-cropped (2, D, H, W) [case + 1, z + 1] maps (0 where padded) -> [validity 1, z + 1 extended linearly
    over the patch], which interpolation and zero padding cannot bias."""
    inside = pos[0] > 0.5
    out = torch.zeros_like(pos)
    if inside.any():
        first = inside.nonzero()[0]
        offset = pos[1][tuple(first)] - first[0]
        k = torch.arange(pos.shape[1], dtype=pos.dtype, device=pos.device)
        out[1] = (k + offset).reshape(-1, *(1,) * (pos.ndim - 2))
        out[0] = 1
    return out


def network_position(moved: torch.Tensor, case_value: float) -> torch.Tensor:
    """Transformed [validity, z + 1] -> the network's [case + 1 where valid else 0, source z + 1 where valid]."""
    validity, z = moved[0], moved[1]
    ok = validity > 0.5
    out = torch.zeros_like(moved)
    out[0] = ok.to(moved.dtype) * case_value
    out[1] = torch.where(ok, z / validity.clamp_min(1e-6), torch.zeros_like(z))
    return out


class PositionAwareTransforms:
    """Wraps nnU-Net's transform pipeline: the positional channels travel as regression_target (see the module
    docstring for the border-exact form they travel in)."""

    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, **data_dict):
        image = data_dict["image"]
        image = image if torch.is_tensor(image) else torch.from_numpy(np.asarray(image))
        pos = image[-NUM_POSITION_CHANNELS:].float()
        case_value = float(pos[0].max())
        data_dict["image"] = image[:-NUM_POSITION_CHANNELS]
        data_dict["regression_target"] = transformable_position(pos)
        out = self.transforms(**data_dict)
        moved = network_position(out.pop("regression_target").float(), case_value)
        out["image"] = torch.cat((out["image"], moved.to(out["image"].dtype)), 0)
        return out
