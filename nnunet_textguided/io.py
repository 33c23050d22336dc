"""Atomic file writes, used for everything the package writes (store, plans, datasets, figures).

A file is written under a temporary name in its target folder and renamed over the target only when
complete, so an interrupted or failed write never leaves a truncated file nor destroys the previous one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path


def default_mode(directory: bool = False) -> int:
    """Permissions a plain open()/mkdir() would give (mkstemp/mkdtemp create 0600/0700)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.

    ``suffix`` lets writers that choose their format by extension (SimpleITK: ".nii.gz") keep it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """``write`` is bytes, or a callable receiving the open binary file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(write) if isinstance(write, (bytes, bytearray)) else write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically, flushed to disk before the rename (checkpoints)."""
    import torch
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json_or_yaml(path: str | os.PathLike):
    """The content of a JSON file, or of a YAML file (.yaml / .yml). FileNotFoundError when it is missing,
    ValueError with the parser's message when it cannot be parsed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the file's
        raise ValueError(f"{p} cannot be read: {type(e).__name__}: {e}") from None


def atomic_write_json(path: str | os.PathLike, obj, sort_keys: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys))


@contextmanager
def staged_dataset_folder(raw_root: Path, dataset_id: int, dataset_name: str, overwrite: bool):
    """Yield a hidden staging folder in ``raw_root``; on success it becomes ``raw_root/dataset_name``.

    An interrupted run never leaves a half-written ``DatasetXXX_Name``: an existing target is only replaced
    with ``overwrite``, another folder with the same dataset id is always an error (nnU-Net could not tell
    them apart), and a failure leaves no trace.
    """
    target = raw_root / dataset_name

    def check_target():
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
        if raw_root.is_dir():
            clash = sorted(p.name for p in raw_root.iterdir()
                           if p.name.startswith(f"Dataset{dataset_id:03d}_") and p.name != dataset_name)
            if clash:
                raise FileExistsError(f"{raw_root} already holds {clash} with dataset id {dataset_id}; nnU-Net "
                                      f"could not tell it from {dataset_name}. Pick another id or remove it.")

    check_target()
    raw_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=raw_root, prefix=f".{dataset_name}.partial-"))
    try:
        yield staging
        os.chmod(staging, default_mode(directory=True))
        check_target()  # again: somebody may have created it meanwhile
        old = None
        if target.exists():
            old = raw_root / f".{dataset_name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class UnsafeCheckpointError(RuntimeError):
    """A torch file that is truncated, not a torch file, or pickles objects that could run code when loaded."""


def numpy_safe_globals() -> list:
    """Numpy scalars and dtypes as nnU-Net's trainers pickle them (numpy 1.x and 2.x module paths): data, never
    code, so ``torch.load(weights_only=True)`` may rebuild them."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object)) if n.endswith("DType")]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *dtypes]


def safe_torch_load(path, map_location="cpu", what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` with numpy scalars allowed: tensors, containers, numbers and strings
    only. Every failure is an UnsafeCheckpointError naming the file and what to do."""
    import pickle

    import torch
    if not os.path.isfile(path):
        raise UnsafeCheckpointError(f"{path} does not exist")
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line
                       or "Unsupported class" in line), None)
        if reason:
            raise UnsafeCheckpointError(
                f"{path} holds objects other than tensors, numbers and strings, so it is not loaded: unpickling them "
                f"could run code ({reason}). Use a {what} from a source you trust, saved as tensors and numbers"
            ) from None
        raise UnsafeCheckpointError(f"{path} is not a readable {what} ({str(e).splitlines()[0]}); it may be "
                                    "truncated by an interrupted copy: copy it again") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UnsafeCheckpointError(f"{path} is not a readable {what} ({e}); it may be truncated by an interrupted "
                                    "copy: copy it again") from None


def process_start_time() -> float | None:
    """Wall-clock start of this process (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def remove_empty_folder_made_by_this_process(path: str | os.PathLike | None) -> bool:
    """Remove ``path`` if it is an empty folder created after this process started (a command that stops before
    writing leaves no empty output folder behind); an existing or non-empty folder is never touched."""
    start = process_start_time()
    if path is None or start is None or not os.path.isdir(path) or os.listdir(path):
        return False
    if os.stat(path).st_mtime < start - 1.0:  # 1 s: /proc start time has clock-tick resolution
        return False
    os.rmdir(path)
    return True
