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
