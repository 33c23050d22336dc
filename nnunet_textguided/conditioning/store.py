"""The embedding store: per-case embedding files next to nnU-Net's preprocessed data.

Layout: ``<nnUNet_preprocessed>/<Dataset>/<data_identifier>/textguided/<name>__<identity hash>/``
  manifest.json   the identity (encoder spec, weight hash, method, rendering, dims) + format version
  <case>.npy      the embeddings of one case
  <case>.json     {source_sha256, shape, dtype}: written after the .npy, so its presence marks completion
A subfolder keeps nnU-Net's dataset-class inference blind to these files. Everything is written to a
temporary file in the same folder and renamed (atomic). A change of encoder spec, weights or rendering
gives another identity hash, i.e. another folder: embeddings are never reused across identities, and
switching back finds the old ones intact. A change of a case's preprocessed data changes its source hash,
so that case is recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes, atomic_write_json

STORE_DIRNAME = "textguided"
FORMAT_VERSION = 1


def file_sha256(*paths: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def case_data_files(preprocessed_folder: Path, case: str) -> list[Path]:
    """The preprocessed data file(s) of a case, whatever nnU-Net dataset format wrote them."""
    folder = Path(preprocessed_folder)
    for ext in (".b2nd", ".npy", ".npz"):
        p = folder / f"{case}{ext}"
        if p.is_file():
            return [p]
    raise FileNotFoundError(f"no preprocessed data for case '{case}' in {folder} (expected {case}.b2nd/.npy/.npz); "
                            "run nnUNetv2_plan_and_preprocess for this configuration first")


class EmbeddingStore:
    def __init__(self, preprocessed_folder: str | os.PathLike, name: str, identity: dict):
        self.preprocessed_folder = Path(preprocessed_folder)
        self.identity = dict(identity)
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:12]
        self.root = self.preprocessed_folder / STORE_DIRNAME / f"{name}__{digest}"

    def ensure_manifest(self) -> None:
        manifest = self.root / "manifest.json"
        want = {"format": FORMAT_VERSION, **self.identity}
        if manifest.is_file():
            have = json.loads(manifest.read_text())
            if have != want:
                raise RuntimeError(f"{manifest} does not match this store's identity; delete {self.root} "
                                   "to recompute it")
            return
        atomic_write_json(manifest, want)

    def source_hash(self, case: str) -> str:
        return file_sha256(*case_data_files(self.preprocessed_folder, case))

    def has(self, case: str) -> bool:
        """A complete entry exists for the case (whatever its source hash)."""
        return (self.root / f"{case}.json").is_file() and (self.root / f"{case}.npy").is_file()

    def is_current(self, case: str, source_hash: str | None = None) -> bool:
        meta_file, arr_file = self.root / f"{case}.json", self.root / f"{case}.npy"
        if not (meta_file.is_file() and arr_file.is_file()):
            return False
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            return False
        return meta.get("source_sha256") == (source_hash or self.source_hash(case))

    def save(self, case: str, array: np.ndarray, source_hash: str) -> None:
        self.ensure_manifest()
        array = np.ascontiguousarray(array)
        atomic_write_bytes(self.root / f"{case}.npy", lambda f: np.save(f, array, allow_pickle=False))
        atomic_write_json(self.root / f"{case}.json",
                          {"source_sha256": source_hash, "shape": list(array.shape), "dtype": str(array.dtype)})

    def load(self, case: str) -> np.ndarray:
        path = self.root / f"{case}.npy"
        if not (self.root / f"{case}.json").is_file() or not path.is_file():
            raise FileNotFoundError(f"no embeddings for case '{case}' in {self.root}; run "
                                    "`nnUNetv2_extract_textguided -d <dataset> -c <configuration> -tr <trainer>`")
        return np.load(path, allow_pickle=False)
