"""The embedding store: per-case embedding files next to nnU-Net's preprocessed data.

Layout: ``<nnUNet_preprocessed>/<Dataset>/<data_identifier>/textguided/<name>__<identity hash>/``
  manifest.json   the identity (encoder spec, weight hash, method, rendering, dims) + format version, and the
                  entries' trailing shape and dtype (recorded with the first entry: one identity, one encoder)
  <case>.npy      the embeddings of one case: a plain numpy array, never read with pickle
  <case>.json     {source_sha256, shape, dtype, size, sha256}: written after the .npy, so its presence marks completion
A subfolder keeps nnU-Net's dataset-class inference blind to these files. Everything is written to a
temporary file in the same folder and renamed (atomic). A change of encoder spec, weights or rendering
gives another identity hash, i.e. another folder: embeddings are never reused across identities, and
switching back finds the old ones intact. A change of a case's preprocessed data changes its source hash,
so that case is recomputed.

Damage is detected, never used: an entry whose record is unreadable, whose .npy is truncated, corrupt, pickled,
or disagrees in shape/dtype with its record, the manifest or the caller's expected shape (``entry_shape``,
``expected_shape``; None = any size on that axis) is not current: extraction recomputes it with a warning on stderr, and ``load``
raises StoreEntryError naming the file and the command that recomputes it. An unreadable manifest.json is
rewritten (the folder name's hash fixes the identity); one of another identity stays an error. Temporary files
of writes killed before their rename (``.<name>.<random>.tmp``) are removed at the folder's first use once older
than STALE_TEMP_SECONDS (a younger one may be a concurrent extraction's write, e.g. of another -part_id).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes, atomic_write_json

STORE_DIRNAME = "textguided"
FORMAT_VERSION = 1
STALE_TEMP_SECONDS = 600
EXTRACT_COMMAND = "nnUNetv2_extract_textguided -d <dataset> -c <configuration> -tr <trainer>"


class StoreEntryError(ValueError):
    """A store entry that cannot be used; the message names the file, what is wrong and the fix."""


class StoreWriteError(OSError):
    """A write into the store failed (disk full, read-only folder); the entries stored before are unchanged."""

    def __init__(self, root: Path, error: OSError):
        super().__init__(error.errno, error.strerror or str(error))
        self.root, self.error = root, error

    def __str__(self) -> str:
        return (f"cannot write the embedding store {self.root}: {self.error}; free disk space or make the folder "
                "writable (entries stored so far are unchanged)")


def extract_command(trainer) -> str:
    """The ``nnUNetv2_extract_textguided`` call that fills ``trainer``'s store."""
    pm = trainer.plans_manager
    plans = "" if pm.plans_name == "nnUNetPlans" else f" -p {pm.plans_name}"
    return (f"nnUNetv2_extract_textguided -d {pm.dataset_name} -c {trainer.configuration_name} "
            f"-tr {type(trainer).__name__}{plans}")


def warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


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


def npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, file size the header implies) of a .npy file's bytes, unpickling nothing."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return tuple(shape), dtype, f.tell() + (0 if dtype.hasobject else math.prod(shape) * dtype.itemsize)


def format_shape(shape) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


class EmbeddingStore:
    def __init__(self, preprocessed_folder: str | os.PathLike, name: str, identity: dict,
                 command: str = EXTRACT_COMMAND, entry_shape: tuple | None = None):
        """``command``: the extraction call named in error messages (see ``extract_command``); ``entry_shape``: the
        shape every entry must have (None = any size on that axis), checked besides a call's ``expected_shape``."""
        self.preprocessed_folder = Path(preprocessed_folder)
        self.identity = dict(identity)
        self.command, self.entry_shape = command, entry_shape
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:12]
        self.root = self.preprocessed_folder / STORE_DIRNAME / f"{name}__{digest}"
        self._opened = False

    # -- the folder -----------------------------------------------------------------------------------------
    @contextmanager
    def _writing(self):
        """OSErrors of the block become StoreWriteError (message: the store, the cause, the fix)."""
        try:
            yield
        except StoreWriteError:
            raise
        except OSError as e:
            raise StoreWriteError(self.root, e) from e

    def open(self) -> None:
        """First use of the folder by this object: remove stale temporary files, check (or repair) the manifest."""
        if self._opened:
            return
        self._opened = True
        if self.root.is_dir():
            self.clean_stale_temp_files()
            self.manifest()

    def clean_stale_temp_files(self, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
        """Remove the temporary files of writes killed before their rename, once older than ``max_age`` seconds."""
        removed, now = [], time.time()
        for p in self.root.glob(".*.tmp"):
            try:
                if now - p.stat().st_mtime > max_age:
                    p.unlink()
                    removed.append(p)
            except OSError:
                pass  # removed meanwhile, or a read-only store: harmless either way
        if removed:
            warn(f"removed {len(removed)} temporary file(s) left in {self.root} by an interrupted extraction")
        return removed

    def manifest(self) -> dict | None:
        """manifest.json (None before the first entry). An unreadable one is rewritten from the identity (which
        the folder name's hash fixes); another identity's is an error."""
        path = self.root / "manifest.json"
        if not path.is_file():
            return None
        want = {"format": FORMAT_VERSION, **self.identity}
        try:
            have = json.loads(path.read_bytes())
            if not isinstance(have, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # invalid JSON, truncated, not UTF-8
            have = {**want, **self._intact_entries_format()}
            warn(f"rewriting {path}: it is unreadable ({e}); this store's identity is fixed by its folder name")
            with self._writing():
                atomic_write_json(path, have)
            return have
        if {k: v for k, v in have.items() if k != "entries"} != want:
            raise RuntimeError(f"{path} does not match this store's identity; delete {self.root} to recompute it")
        return have

    def ensure_manifest(self, entry: np.ndarray | None = None) -> None:
        """Write manifest.json if missing, recording the entries' format from the first ``entry``."""
        have = self.manifest()
        fmt = None if entry is None else {"trailing_shape": list(entry.shape[1:]), "dtype": str(entry.dtype)}
        if have is not None and fmt is not None and have.get("entries", fmt) != fmt:
            raise RuntimeError(f"{self.root / 'manifest.json'} records entries {have['entries']}, this encoder gives "
                               f"{fmt}; delete {self.root} to recompute it")
        if have is None or (fmt is not None and "entries" not in have):
            with self._writing():
                atomic_write_json(self.root / "manifest.json",
                                  {"format": FORMAT_VERSION, **self.identity, **({"entries": fmt} if fmt else {})})

    def _intact_entries_format(self) -> dict:
        """{'entries': format} shared by every intact entry of the folder; {} if none or they disagree."""
        formats = set()
        for meta_file in self.root.glob("*.json"):
            case = meta_file.stem
            if case == "manifest" or case.startswith("."):
                continue
            try:
                meta, data = self._record(case), (self.root / f"{case}.npy").read_bytes()
            except (OSError, ValueError):
                continue
            if self._problem(case, data, meta, None, use_manifest=False) is None:
                formats.add((tuple(meta["shape"][1:]), meta["dtype"]))
        if len(formats) != 1:
            return {}
        ((trailing, dtype),) = formats
        return {"entries": {"trailing_shape": list(trailing), "dtype": dtype}}

    # -- entries --------------------------------------------------------------------------------------------
    def source_hash(self, case: str) -> str:
        return file_sha256(*case_data_files(self.preprocessed_folder, case))

    def has(self, case: str) -> bool:
        """A complete entry exists for the case (whatever its source hash)."""
        return (self.root / f"{case}.json").is_file() and (self.root / f"{case}.npy").is_file()

    def _record(self, case: str) -> dict:
        """The entry's .json record; ValueError if unreadable."""
        meta = json.loads((self.root / f"{case}.json").read_bytes())
        if not isinstance(meta, dict) or not {"source_sha256", "shape", "dtype"} <= meta.keys():
            raise ValueError("not an entry record {source_sha256, shape, dtype, ...}")
        return meta

    def describe_mismatch(self, shape: tuple, expected: tuple) -> str:
        """Why an entry of ``shape`` is not what ``expected`` (None = any size) asks for."""
        if len(shape) == len(expected) and all(e in (None, s) for s, e in zip(shape[:-1], expected[:-1])):
            return (f"has embedding dimension {shape[-1]}, this store's encoder gives {expected[-1]} "
                    "(written by another encoder?)")
        return f"has shape {format_shape(shape)}, expected {format_shape(expected)}"

    def _problem(self, case: str, data: bytes, meta: dict, expected_shape=None, use_manifest=True) -> str | None:
        """What makes an entry (its .npy's bytes and its record) unusable, or None."""
        try:
            shape, dtype, size = npy_header(data)
        except (ValueError, SyntaxError, TypeError, EOFError) as e:
            return f"is truncated or corrupt (unreadable .npy header: {e})"
        if dtype.hasobject:
            return "is not a plain numpy array (pickled objects are refused: stores are read with allow_pickle=False)"
        if len(data) != size:
            return f"is truncated or corrupt ({len(data)} bytes, its header implies {size})"
        if meta.get("size", size) != size or meta.get("sha256", "") not in ("", hashlib.sha256(data).hexdigest()):
            return f"is corrupt (its bytes differ from those recorded in {case}.json)"
        if [list(shape), str(dtype)] != [meta["shape"], meta["dtype"]]:
            return (f"does not match its record {case}.json ({format_shape(shape)} {dtype}, recorded "
                    f"{format_shape(meta['shape'])} {meta['dtype']})")
        fmt = (self.manifest() or {}).get("entries") if use_manifest else None
        if fmt and str(dtype) != fmt["dtype"]:
            return f"has dtype {dtype}, this store's entries are {fmt['dtype']} (written by another encoder?)"
        for want in ([None, *fmt["trailing_shape"]] if fmt else None, self.entry_shape, expected_shape):
            if want is not None and (len(want) != len(shape) or any(w not in (None, s) for s, w in zip(shape, want))):
                return self.describe_mismatch(shape, tuple(want))
        return None

    def is_current(self, case: str, source_hash: str | None = None, expected_shape=None) -> bool:
        """An intact entry computed from the case's current preprocessed data (a damaged one is reported on stderr:
        the caller recomputes it)."""
        self.open()
        meta_file, arr_file = self.root / f"{case}.json", self.root / f"{case}.npy"
        if not (meta_file.is_file() and arr_file.is_file()):
            return False
        try:
            meta = self._record(case)
        except ValueError as e:
            warn(f"recomputing {meta_file}: it is unreadable ({e})")
            return False
        if meta["source_sha256"] != (source_hash or self.source_hash(case)):
            return False
        problem = self._problem(case, arr_file.read_bytes(), meta, expected_shape)
        if problem:
            warn(f"recomputing {arr_file}: it {problem}")
        return problem is None

    def save(self, case: str, array: np.ndarray, source_hash: str) -> None:
        array = np.ascontiguousarray(array)
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        data = buffer.getvalue()
        with self._writing():
            self.open()
            self.ensure_manifest(array)
            atomic_write_bytes(self.root / f"{case}.npy", data)
            atomic_write_json(self.root / f"{case}.json",
                              {"source_sha256": source_hash, "shape": list(array.shape), "dtype": str(array.dtype),
                               "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    def load(self, case: str, expected_shape=None) -> np.ndarray:
        """The case's embeddings; StoreEntryError (naming the file and the fix) if the entry is damaged or not of
        ``expected_shape``."""
        self.open()
        meta_file, path = self.root / f"{case}.json", self.root / f"{case}.npy"
        if not meta_file.is_file() or not path.is_file():
            raise FileNotFoundError(f"no embeddings for case '{case}' in {self.root}; run `{self.command}`")
        try:
            meta = self._record(case)
        except ValueError as e:
            raise StoreEntryError(f"{meta_file} is unreadable ({e}); run `{self.command}` to recompute it") from None
        data = path.read_bytes()
        problem = self._problem(case, data, meta, expected_shape)
        if problem:
            raise StoreEntryError(f"{path} {problem}; run `{self.command}` to recompute it")
        return np.load(io.BytesIO(data), allow_pickle=False)
