"""Atomic, pickle-free artifact I/O: JSON for numbers, safetensors for tensors.

Every writer goes through a temporary file in the destination folder followed by
``os.replace``, so an interrupted run never leaves a half-written artifact behind; files
and folders get the usual ``0o666``/``0o777`` modes minus the process umask.

A command's output folder is written as a whole through :class:`RunFolder`: everything
goes to a staging folder beside it, ``manifest.json`` (every file's size and sha256) is
written last, and the staging folder then replaces the old output in two renames, so a
folder is always one complete run. :func:`verify_run_folder` checks a folder against its
manifest before anything reads it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
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
    "RunFolder",
    "verify_run_folder",
    "add_to_manifest",
    "lock_run_folder",
    "MANIFEST_FILE",
    "current_umask",
]

MANIFEST_FILE = "manifest.json"


def current_umask() -> int:
    """The process umask (read from /proc where possible; no umask round-trip race)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    return 0o666 & ~current_umask()


def _dir_mode() -> int:
    return 0o777 & ~current_umask()


@contextlib.contextmanager
def _atomic_target(path: str | Path) -> Iterator[str]:
    """Yield a temp path in ``path``'s folder; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600; honour the umask like open() does
        try:
            os.replace(tmp, path)
        except OSError as err:  # name the destination, not our temp file
            raise OSError(err.errno, err.strerror, str(path)) from None
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
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON artifact ({err})") from None


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


# --------------------------------------------------------------------------- run folders
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _walk_files(root: Path) -> list[str]:
    """Every non-directory entry below ``root`` as a sorted POSIX relative path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        # a symlinked folder is listed as an entry, not followed
        names = filenames + [d for d in dirnames if (here / d).is_symlink()]
        out += [(here / n).relative_to(root).as_posix() for n in names]
    return sorted(out)


def _manifest_entries(root: Path) -> list[dict[str, Any]]:
    return [
        {"path": rel, "size": (root / rel).stat().st_size, "sha256": _sha256(root / rel)}
        for rel in _walk_files(root)
        if rel != MANIFEST_FILE
    ]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class _FolderLock:
    """Exclusive non-blocking ``flock`` on ``<parent>/.<name>.lock`` (holds our pid)."""

    def __init__(self, out: Path, display: str | Path | None = None) -> None:
        self.path = out.parent / f".{out.name}.lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ValueError(
                    f"--out {display or out}: another qkcov run is writing there (pid {holder})"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _check_out(out: str | Path) -> Path:
    if not isinstance(out, (str, Path)) or not str(out).strip():
        raise ValueError(f"--out: expected a folder path, got {out!r}")
    path = Path(out).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out}: is a file, expected a folder")
    if path.name in ("", ".", ".."):
        raise ValueError(f"--out {out}: expected a folder name (not '.' or '..')")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"--out {out}: cannot create its parent folder {path.parent}: {err.strerror}"
        ) from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: its parent folder {path.parent} is not writable")
    return path


def _lock_for(out: str | Path) -> tuple[Path, _FolderLock]:
    path = _check_out(out)
    return path, _FolderLock(path, out)


@contextlib.contextmanager
def lock_run_folder(out: str | Path) -> Iterator[Path]:
    """Hold ``out``'s run lock (the one :class:`RunFolder` takes) to update it in place."""
    path, lock = _lock_for(out)
    try:
        yield path
    finally:
        lock.release()


class RunFolder:
    """One complete run per output folder (context manager; yields the staging folder).

    ``RunFolder(out, command=...)`` checks ``out`` at once (not a file, parent creatable and
    writable), takes an exclusive lock (``ValueError`` if another run holds it) and creates
    a staging folder beside ``out`` on the same filesystem. Callers write every artifact
    (sub-runs in subfolders included) into the folder ``__enter__`` returns. On success
    ``manifest.json`` is written last (each file's relative path, size and sha256, the
    command, the time) and the staging folder replaces ``out`` as a whole; on any error or
    ``KeyboardInterrupt`` the staging folder is deleted and the old ``out`` is untouched.
    """

    def __init__(self, out: str | Path, *, command: str) -> None:
        self.out, self._lock = _lock_for(out)
        self.command = str(command)
        try:
            self.staging = Path(
                tempfile.mkdtemp(prefix=f".{self.out.name}.staging-", dir=self.out.parent)
            )
            os.chmod(self.staging, _dir_mode())
        except BaseException:
            self._lock.release()
            raise
        self._done = False

    def __enter__(self) -> Path:
        if self._done:
            raise ValueError(f"RunFolder {self.out}: already finished; make a new one")
        return self.staging

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self._commit()
            else:
                shutil.rmtree(self.staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise
        finally:
            self._done = True
            self._lock.release()

    def _commit(self) -> None:
        manifest = {
            "format": "qkcov-run/1",
            "command": self.command,
            "created": _now(),
            "files": _manifest_entries(self.staging),
        }
        write_json(self.staging / MANIFEST_FILE, manifest)
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "run")
        try:
            os.replace(self.staging, self.out)
        except BaseException:
            if old is not None:  # put the previous run back
                os.replace(old / "run", self.out)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        """Abandon an unentered run: delete the staging folder and release the lock."""
        if not self._done:
            shutil.rmtree(self.staging, ignore_errors=True)
            self._done = True
            self._lock.release()


def _read_manifest(root: Path) -> dict[str, Any]:
    mpath = root / MANIFEST_FILE
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    if not mpath.is_file():
        raise ValueError(f"{root}: no manifest: incomplete run (or not written by qkcov)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{mpath}: not a valid manifest ({err})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(f.get("path"), str) for f in files
    ):
        raise ValueError(f"{mpath}: not a valid manifest (no 'files' list)")
    return manifest


def verify_run_folder(path: str | Path) -> dict[str, Any]:
    """Check ``path`` against its ``manifest.json``; return the manifest.

    Every listed file must be present with the recorded size and sha256, and no other file
    may be there (a mixed folder). Raises ``ValueError`` naming the first mismatch.
    """
    root = Path(path)
    manifest = _read_manifest(root)
    listed: dict[str, dict[str, Any]] = {}
    for entry in manifest["files"]:
        rel = entry["path"]
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts or rel == MANIFEST_FILE:
            raise ValueError(f"{root}: manifest lists an invalid path {rel!r}")
        listed[rel] = entry
    present = [r for r in _walk_files(root) if r != MANIFEST_FILE]
    for rel, entry in listed.items():
        f = root / rel
        if f.is_symlink() or not f.is_file():
            what = "is a symlink" if f.is_symlink() else "is missing"
            raise ValueError(f"{root}: {rel} {what} (manifest lists it); incomplete run")
        if f.stat().st_size != entry.get("size") or _sha256(f) != entry.get("sha256"):
            raise ValueError(f"{root}: {rel} was modified after the run (size/sha256 mismatch)")
    extra = [r for r in present if r not in listed]
    if extra:
        raise ValueError(
            f"{root}: {extra[0]} is not in the manifest (a file from another run or a "
            f"mixed folder; {len(extra)} unlisted file(s))"
        )
    return manifest


def add_to_manifest(path: str | Path, files: list[str]) -> dict[str, Any]:
    """Record (new or rewritten) ``files`` (relative paths) in ``path``'s manifest, atomically."""
    root = Path(path)
    manifest = _read_manifest(root)
    entries = {e["path"]: e for e in manifest["files"]}
    for rel in files:
        f = root / rel
        if not f.is_file():
            raise ValueError(f"{root}: cannot add {rel} to the manifest: no such file")
        entries[Path(rel).as_posix()] = {
            "path": Path(rel).as_posix(),
            "size": f.stat().st_size,
            "sha256": _sha256(f),
        }
    manifest["files"] = [entries[k] for k in sorted(entries)]
    manifest["updated"] = _now()
    write_json(root / MANIFEST_FILE, manifest)
    return manifest
