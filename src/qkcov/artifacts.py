"""Atomic, pickle-free artifact I/O: JSON for numbers, safetensors for tensors.

Every writer goes through a temporary file in the destination folder followed by
``os.replace``, so an interrupted run never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "atomic_write_bytes",
    "write_json",
    "read_json",
    "save_tensors",
    "load_tensors",
    "read_tensor_metadata",
    "to_jsonable",
]


@contextlib.contextmanager
def _atomic_target(path: str | Path) -> Iterator[str]:
    """Yield a temp path in ``path``'s folder; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + rename)."""
    with _atomic_target(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, tuples and non-finite floats into plain JSON values."""
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact not found: {path}")
    return json.loads(path.read_text())


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save tensors as safetensors atomically. ``metadata`` values are JSON-encoded strings."""
    meta = {str(k): json.dumps(to_jsonable(v)) for k, v in (metadata or {}).items()}
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with _atomic_target(path) as tmp:
        save_file(clean, tmp, metadata=meta)
    return Path(path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact not found: {path}")
    return load_file(str(path))


def read_tensor_metadata(path: str | Path) -> dict[str, Any]:
    """Decode the JSON metadata stored by :func:`save_tensors`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}


class RunFolder:
    """Write a run into ``out`` as a whole: ``with RunFolder(out, command=...) as staging:``
    (minimal form; replaced by the locked, manifest-checked version)."""

    def __init__(self, out: str | Path, *, command: str) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out}: exists and is not a folder")
        self.command = command

    def __enter__(self) -> Path:
        import shutil

        self.staging = self.out.parent / f".{self.out.name}.staging"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        old = self.out.parent / f".{self.out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.out.exists():
            self.out.rename(old)
        self.staging.rename(self.out)
        shutil.rmtree(old, ignore_errors=True)
