"""Per-slice embeddings of 3D volumes (BiCLIP) — one function for the online and the offline path.

Consistency rule (DESIGN.md): a slice is rendered and embedded by exactly the same code whether it is a
slice of the network's input patch (online mode, inside forward) or a full slice of a preprocessed case
(paper mode, embedding store / note-aware predictor).

Rendering: nnU-Net-normalised intensities -> fixed window [lo, hi] -> [0, 1] -> 3 identical channels
(the paper replicates each slice three times). The window is fixed per run (from the plans' CT intensity
statistics: abdominal window W425/L37.5 HU, i.e. [-175, 250] HU as in CDPDNet; z-score units [-2.5, 2.5]
for other modalities), never per-slice statistics, so a patch slice and the full slice render alike.
The encoder then resizes to its own input size and applies its own mean/std.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..encoders import FrozenEncoder, load_encoder

#: positional channels appended in paper mode: (case index + 1, slice index + 1); 0 = outside the volume
NUM_POSITION_CHANNELS = 2
CT_WINDOW_HU = (-175.0, 250.0)
DEFAULT_WINDOW = (-2.5, 2.5)

_ENCODER_CACHE: dict[str, FrozenEncoder] = {}


def get_encoder(spec: str, device: torch.device | str | None = "cpu") -> FrozenEncoder:
    """Load an encoder once per process (training, validation and extraction share it); ``device=None`` leaves it
    where it is."""
    enc = _ENCODER_CACHE.get(spec)
    if enc is None:
        enc = load_encoder(spec, device="cpu")
        _ENCODER_CACHE[spec] = enc
    return enc if device is None else enc.to(device)


def window_from_plans(plans: dict, configuration: dict,
                      window_hu: tuple[float, float] = CT_WINDOW_HU) -> tuple[float, float]:
    """Rendering window in normalised units for channel 0: ``window_hu`` through nnU-Net's CT normalisation of
    the plans (CT), or DEFAULT_WINDOW z-score units (other modalities)."""
    scheme = configuration.get("normalization_schemes", ["ZScoreNormalization"])[0]
    if scheme == "CTNormalization":
        props = plans["foreground_intensity_properties_per_channel"]["0"]
        mean, std = float(props["mean"]), float(props["std"])
        return tuple((float(hu) - mean) / max(std, 1e-8) for hu in window_hu)
    return DEFAULT_WINDOW


@dataclass(frozen=True)
class SliceStream:
    """One embedding stream: which encoder, which of its methods (embed_images | embed_captions)."""
    name: str
    encoder: str
    method: str

    def encoder_module(self, device="cpu") -> FrozenEncoder:
        return get_encoder(self.encoder, device)


def unit_window(x: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """Normalised intensities through the fixed window -> float32 in [0, 1]."""
    lo, hi = window
    return ((x.float() - lo) / (hi - lo)).clamp_(0, 1)


def render_slices(slices: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """(N, H, W) normalised intensities -> (N, 3, H, W) in [0, 1]."""
    return unit_window(slices, window)[:, None].expand(-1, 3, -1, -1)


#: frozen-encoder calls of this process through ``embed_slices`` ({stream name: slices embedded}): what
#: nnUNetv2_predict_textguided reports, and what tests read to see that a stored table costs no encoder call
ENCODER_CALLS: dict[str, int] = {}


def embed_slices(slices: torch.Tensor, stream: SliceStream, window: tuple[float, float],
                 batch_size: int = 64) -> torch.Tensor:
    """(N, H, W) -> (N, E) with the stream's frozen encoder."""
    ENCODER_CALLS[stream.name] = ENCODER_CALLS.get(stream.name, 0) + slices.shape[0]
    enc = stream.encoder_module(slices.device)
    return getattr(enc, stream.method)(render_slices(slices, window), batch_size=batch_size).float()


def slice_table(volume: np.ndarray | torch.Tensor, stream: SliceStream, window: tuple[float, float],
                device="cpu", batch_size: int = 64) -> torch.Tensor:
    """Whole-case table for paper mode: volume (C, D, H, W) -> (D + 1, E).

    Row 0 is the embedding of an all-zero slice, used for patch slices that lie outside the volume
    (nnU-Net pads with 0, so online mode sees exactly that slice there); row z + 1 is slice z of channel 0.
    """
    v = torch.as_tensor(np.asarray(volume[0]) if not torch.is_tensor(volume) else volume[0]).to(device).float()
    slices = torch.cat((torch.zeros_like(v[:1]), v), 0)
    return embed_slices(slices, stream, window, batch_size).cpu()


def slice_table_identity(stream: SliceStream, window, encoder_records: dict) -> dict:
    """What a stored slice table depends on (the store folder's identity): training's store and the predictor's
    use the same one."""
    return {"kind": "slice_table", "stream": stream.name, "encoder": stream.encoder, "method": stream.method,
            "window": list(window), "weight_hash": encoder_records.get(stream.encoder, {}).get("weight_hash")}


class OnlineSliceConditioner:
    """Online mode: embed the slices of the network's input patch inside forward (exact under stock predict)."""

    def __init__(self, streams: list[SliceStream], window: tuple[float, float], batch_size: int = 64):
        self.streams, self.window, self.batch_size = list(streams), tuple(window), batch_size

    def apply_to_encoders(self, fn) -> None:
        for s in self.streams:
            s.encoder_module()._apply(fn)

    def encoder_calls(self, x_shape) -> list[tuple[str, str, int]]:
        """(encoder spec, method, inputs) of the frozen-encoder calls one forward on ``x_shape`` makes."""
        return [(s.encoder, s.method, x_shape[0] * x_shape[2]) for s in self.streams]

    def placeholder(self, x: torch.Tensor, dims: dict[str, int]):
        """What ``__call__`` returns, as zeros of the right shapes, without running encoders (counting)."""
        return x, {s.name: x.new_zeros(x.shape[0], x.shape[2], dims[s.encoder]) for s in self.streams}

    def __call__(self, x: torch.Tensor):
        b, _, d = x.shape[:3]
        slices = x[:, 0].reshape(b * d, *x.shape[3:])
        return x, {s.name: embed_slices(slices, s, self.window, self.batch_size).reshape(b, d, -1)
                   for s in self.streams}


class MissingCaseConditioningError(Exception):
    """Paper-mode network called without its positional channels or tables. Not a RuntimeError: nnU-Net's sliding
    window takes those for out-of-memory errors and retries on the CPU."""


class SliceTablesRequiredError(MissingCaseConditioningError):
    """Stock nnUNetv2_predict on a paper-mode model: refused while nnU-Net builds the network."""


def stock_predict_refusal(argv: list[str]) -> str:
    """Why stock nnU-Net prediction cannot run a paper-mode model, and the command line that can (the user's own
    flags under nnUNetv2_predict_textguided)."""
    import os
    import shlex
    why = ("this model (BiCLIP paper mode) reads embeddings of every full slice of each case, which stock nnU-Net "
           "prediction cannot compute; nothing was predicted. ")
    if argv and os.path.basename(argv[0]) == "nnUNetv2_predict":
        return why + "Run instead: " + shlex.join(["nnUNetv2_predict_textguided", *argv[1:]])
    return why + ("Predict with nnUNetv2_predict_textguided (the flags of nnUNetv2_predict: -i -o -d -c -tr -p -f), "
                  "or nnUNetPredictor subclass nnunet_textguided.inference.predict.TextGuidedPredictor in Python")


class TableSliceConditioner:
    """Paper mode: per-full-slice tables, indexed by the positional channels the data carries.

    The network input is (B, C + 2, D, H, W): the last two channels are a validity map holding (case index + 1)
    and the source-slice coordinate (z + 1) that went through nnU-Net's spatial/mirror transforms (training,
    ``data.position_channels``) or sliding window and mirroring (prediction) exactly like the image. Validity is
    0 where nnU-Net padded (outside the loaded region, the sliding window's padding). A patch slice's table row
    is the rounded median source coordinate of its valid voxels; a row outside [1, D] (the patch slice lies
    beyond the volume) or a slice without valid voxels takes row 0, the zero slice.
    """

    def __init__(self, streams: list[SliceStream], window: tuple[float, float], num_image_channels: int,
                 predict_command: str = "nnUNetv2_predict_textguided"):
        self.streams, self.window = list(streams), tuple(window)
        self.num_image_channels = num_image_channels
        self.predict_command = predict_command
        self.tables: dict[int, dict[str, torch.Tensor]] = {}

    def apply_to_encoders(self, fn) -> None:
        for s in self.streams:
            s.encoder_module()._apply(fn)

    def encoder_calls(self, x_shape) -> list[tuple[str, str, int]]:
        """None per forward: the tables are computed once per case (D + 1 slices each), see compute_tables."""
        return []

    def placeholder(self, x: torch.Tensor, dims: dict[str, int]):
        image = x[:, :self.num_image_channels]
        return image, {s.name: x.new_zeros(x.shape[0], x.shape[2], dims[s.encoder]) for s in self.streams}

    def set_tables(self, tables: dict[int, dict[str, torch.Tensor]]) -> None:
        self.tables = dict(tables)

    def compute_tables(self, volume, device="cpu") -> dict[str, torch.Tensor]:
        return {s.name: slice_table(volume, s, self.window, device) for s in self.streams}

    @staticmethod
    def source_indices(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (B, 2, D, H, W) -> case index (B,) and unclipped source rows z + 1 (B, D) (0 = no valid voxel)."""
        valid = pos[:, 0] > 0.5
        case = pos[:, 0].flatten(1).amax(1)
        z = pos[:, 1].masked_fill(~valid, float("nan")).flatten(2).nanmedian(-1).values
        rows = torch.nan_to_num(z, nan=0.0).round().long()
        return case.round().long() - 1, rows

    @staticmethod
    def table_rows(rows: torch.Tensor, table_length: int) -> torch.Tensor:
        """Source rows -> rows of a (D + 1)-row table: beyond the volume -> 0 (the zero slice)."""
        return torch.where((rows >= 1) & (rows < table_length), rows, torch.zeros_like(rows))

    def __call__(self, x: torch.Tensor):
        if x.shape[1] != self.num_image_channels + NUM_POSITION_CHANNELS:
            raise MissingCaseConditioningError(
                "This model conditions on per-slice embeddings of the whole case (BiCLIP paper mode), which the "
                f"stock nnUNetv2_predict cannot supply. Predict with `{self.predict_command}` (same flags as "
                "nnUNetv2_predict); it computes the embeddings of each input case.")
        image, pos = x[:, :self.num_image_channels], x[:, self.num_image_channels:]
        cases, rows = self.source_indices(pos.float())
        if not self.tables:
            raise MissingCaseConditioningError("no slice embeddings registered: the trainer registers the training "
                                               f"cases' tables, {self.predict_command} each test case's")
        # a patch without a single voxel of the volume (only possible under extreme augmentation) reads the zero
        # slice everywhere: row 0 is the same in every table
        any_case = next(iter(self.tables))
        rows = torch.where((cases >= 0)[:, None], rows, torch.zeros_like(rows))
        out = {}
        for s in self.streams:
            try:
                tab = [self.tables[int(c) if c >= 0 else any_case][s.name] for c in cases]
            except KeyError as e:
                raise MissingCaseConditioningError(f"no slice embeddings registered for case index {e}") from None
            out[s.name] = torch.stack([t.to(x.device)[self.table_rows(r, t.shape[0])] for t, r in zip(tab, rows)])
        return image, out
