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
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigMixin
from .runtime import is_main_process

__all__ = [
    "atomic_write_bytes",
    "write_json",
    "read_json",
    "save_tensors",
    "load_tensors",
    "read_tensor_metadata",
    "to_jsonable",
    "RunFolder",
    "OutputConfig",
    "verify_run_folder",
    "read_run_files",
    "add_to_manifest",
    "lock_run_folder",
    "MANIFEST_FILE",
    "current_umask",
    "read_regular_bytes",
    "artifact_errors",
    "seal_json",
    "seal_html",
    "is_sealed",
    "check_replaceable",
    "make_owned_dir",
    "remove_owned_dir",
    "MAX_JSON_BYTES",
    "MAX_TENSOR_BYTES",
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


SEAL_KEY = "qkcov_seal"
_HTML_SEAL = "<!--qkcov-seal:{}-->"


def _json_digest(obj: Any) -> str:
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(text.encode()).hexdigest()


def seal_json(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` (a JSON object) with ``"qkcov_seal"``: the sha256 of the rest of its content,
    so qkcov can later tell its own unedited file from anything else (:func:`is_sealed`)."""
    plain = {k: v for k, v in to_jsonable(dict(obj)).items() if k != SEAL_KEY}
    return {**plain, SEAL_KEY: _json_digest(plain)}


def seal_html(page: str) -> str:
    """``page`` with a trailing comment holding the sha256 of everything before it."""
    return page + _HTML_SEAL.format(hashlib.sha256(page.encode()).hexdigest())


def _sealed_bytes(data: bytes) -> bool:
    tail = data[-90:].decode("ascii", errors="replace")
    if tail.endswith("-->") and "<!--qkcov-seal:" in tail:
        body, _, digest = data.rpartition(b"<!--qkcov-seal:")
        return hashlib.sha256(body).hexdigest() == digest[:-3].decode("ascii", errors="replace")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    if not isinstance(obj, dict) or not isinstance(obj.get(SEAL_KEY), str):
        return False
    plain = {k: v for k, v in obj.items() if k != SEAL_KEY}
    try:
        return _json_digest(plain) == obj[SEAL_KEY]
    except ValueError:
        return False


def is_sealed(path: str | Path) -> bool:
    """Whether ``path`` is a regular file qkcov wrote with a seal (:func:`seal_json`,
    :func:`seal_html`) and nobody changed since: its content matches the hash it carries."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        return _sealed_bytes(read_regular_bytes(path, what="file"))
    except (OSError, ValueError):
        return False


def check_replaceable(path: str | Path, *, force: bool = False, flag: str = "--out") -> None:
    """The one overwrite rule for a single output file: a missing ``path`` is fine; an
    existing one is replaced only when it is a regular file qkcov sealed and nobody changed
    since (or with ``force``); a folder, link or device never. ``ValueError`` (one line)."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    shown = f"{flag} {path}" if flag else str(path)
    if stat.S_ISLNK(mode) and not force:
        raise ValueError(f"{shown}: is a symbolic link; not replacing it (add --force)")
    if stat.S_ISDIR(mode) or (not stat.S_ISLNK(mode) and not stat.S_ISREG(mode)):
        raise ValueError(f"{shown}: is {file_kind(mode)}, expected a file path")
    if force or is_sealed(path):
        return
    raise ValueError(
        f"{shown}: exists and was not written by qkcov (or was changed since); not "
        "overwriting it: pick another path, or add --force to replace it"
    )


def write_json(path: str | Path, obj: Any, *, compact: bool = False, seal: bool = False) -> Path:
    """``compact``: no indentation (``run.json``, whose random draws and scan rows would
    double its size indented; ``python -m json.tool`` prints it readably). ``seal``: add
    :func:`seal_json`'s hash (``obj`` must be a mapping)."""
    if seal:
        obj = seal_json(obj)
    if compact:
        text = json.dumps(to_jsonable(obj), separators=(",", ":"), allow_nan=False)
    else:
        text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


MAX_JSON_BYTES = 256 << 20
"""Largest JSON artifact read (run.json, section.json, manifest.json, specs): 256 MiB."""
MAX_TENSOR_BYTES = 16 << 30
"""Largest safetensors artifact read: 16 GiB (its header: the library's own 100 MB cap)."""

_KINDS = (
    (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
)  # fmt: skip


def file_kind(mode: int) -> str:
    """``"a FIFO"``, ``"a socket"``, ... for a non-regular ``st_mode`` (``"a file"`` else)."""
    return next((name for test, name in _KINDS if test(mode)), "a file")


def _regular_stat(path: Path, what: str) -> os.stat_result:
    """``os.stat`` of a regular file; a missing one is ``FileNotFoundError`` and a FIFO,
    device, socket or folder one ``ValueError``, each naming ``path`` and ``what``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: is {file_kind(st.st_mode)}, expected a regular {what}")
    return st


def read_regular_bytes(path: str | Path, *, cap: int = MAX_JSON_BYTES, what: str = "file") -> bytes:
    """The bytes of ``path``, refused with one line (``ValueError``) unless it is a regular
    file of at most ``cap`` bytes: a FIFO, device or socket is never opened for a blocking
    read, and nothing past the cap is read."""
    path = Path(path)
    _regular_stat(path, what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the two looks
            raise ValueError(f"{path}: is {file_kind(st.st_mode)}, expected a regular {what}")
        if st.st_size > cap:
            raise ValueError(f"{path}: {st.st_size} bytes, over the {cap}-byte cap for a {what}")
        chunks, n = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            n += len(chunk)
            if n > cap:
                raise ValueError(f"{path}: over the {cap}-byte cap for a {what}")
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_json(
    data: bytes | str, where: str | Path, *, expect: type | None = None, what: str = "JSON artifact"
) -> Any:
    """Decode a JSON artifact's bytes; every problem is one ``ValueError`` naming ``where``
    (bad UTF-8 or JSON, nesting too deep for the parser, not an ``expect``)."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        obj = json.loads(text)
    except RecursionError:
        raise ValueError(f"{where}: not a valid {what} (nested too deeply)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: not a valid {what} ({err})") from None
    if expect is not None and not isinstance(obj, expect):
        want = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise ValueError(f"{where}: expected {want}, got a JSON {type(obj).__name__}")
    return obj


def read_json(path: str | Path, *, expect: type | None = None) -> Any:
    """A JSON artifact (a regular file of at most :data:`MAX_JSON_BYTES`); ``expect=dict``
    also refuses any other top-level type. Errors are one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact not found: {path}")
    return parse_json(read_regular_bytes(path, what="JSON artifact"), path, expect=expect)


@contextlib.contextmanager
def artifact_errors(path: str | Path, what: str = "artifact") -> Iterator[None]:
    """Turn what a tampered artifact makes the loading code raise (a missing key, a wrong
    type, deep nesting, a bad safetensors header, linear algebra on bad numbers) into one
    ``ValueError`` naming ``path``. Errors that already are ``ValueError``/``OSError`` pass."""
    from safetensors import SafetensorError

    try:
        yield
    except (ValueError, OSError):
        raise
    except KeyError as err:
        raise ValueError(f"{path}: not a valid {what} (missing {err})") from None
    except (TypeError, AttributeError, IndexError, RecursionError, OverflowError) as err:
        raise ValueError(f"{path}: not a valid {what} ({type(err).__name__}: {err})") from None
    except SafetensorError as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from None
    except RuntimeError as err:  # torch.linalg.LinAlgError and shape errors on bad tensors
        msg = " ".join(str(err).split())[:200]
        raise ValueError(f"{path}: not a valid {what} ({type(err).__name__}: {msg})") from None


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save tensors as safetensors atomically. ``metadata`` values are JSON-encoded strings."""
    meta = {str(k): json.dumps(to_jsonable(v)) for k, v in (metadata or {}).items()}
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with _atomic_target(path) as tmp:
        try:
            save_file(clean, tmp, metadata=meta)
        except OSError:
            raise
        except Exception as err:  # safetensors reports a full disk as SafetensorError
            raise OSError(
                errno.EIO, f"cannot write ({err}); is the disk full?", str(path)
            ) from None
    return Path(path)


def _check_tensor_file(path: Path) -> None:
    st = _regular_stat(path, "safetensors file")
    if st.st_size > MAX_TENSOR_BYTES:
        raise ValueError(f"{path}: {st.st_size} bytes, over the {MAX_TENSOR_BYTES}-byte cap")


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors artifact (regular file, at most :data:`MAX_TENSOR_BYTES`); a bad file
    is one ``ValueError`` naming it."""
    path = Path(path)
    _check_tensor_file(path)
    with artifact_errors(path, "safetensors file"):
        return load_file(str(path))


def read_tensor_header(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """``{name: (dtype, shape)}`` declared by a safetensors file, read from its header only
    (nothing materialised); one ``ValueError`` naming the file when it is not one."""
    path = Path(path)
    _check_tensor_file(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= 100_000_000:
            raise ValueError(f"{path}: not a valid safetensors file (header length {n})")
        header = parse_json(fh.read(n), path, expect=dict)
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not (isinstance(v, dict) and isinstance(v.get("shape"), list)
                and all(isinstance(x, int) and x >= 0 for x in v["shape"])):  # fmt: skip
            raise ValueError(f"{path}: not a valid safetensors file (tensor {k!r})")
        out[k] = (str(v.get("dtype")), list(v["shape"]))
    return out


def read_tensor_metadata(path: str | Path) -> dict[str, Any]:
    """Decode the JSON metadata stored by :func:`save_tensors`."""
    from safetensors import safe_open

    path = Path(path)
    _check_tensor_file(path)
    with artifact_errors(path, "safetensors file"):
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return {k: parse_json(v, f"{path} (metadata {k!r})") for k, v in meta.items()}


# --------------------------------------------------------------------------- run folders
def _sha256(path: Path) -> str:
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):  # a FIFO would block the read forever
        raise ValueError(f"{path}: is {file_kind(mode)}, expected a regular file")
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


LOCK_TAG = "qkcov-lock"


def _is_lock_text(data: bytes) -> bool:
    """Whether ``data`` is what a qkcov lock holds: ``qkcov-lock <pid> <token>`` (or the
    bare pid older versions wrote)."""
    parts = data.decode("ascii", errors="replace").split()
    if parts[:1] == [LOCK_TAG]:
        parts = parts[1:]
    return 1 <= len(parts) <= 2 and parts[0].isdigit()


class _FolderLock:
    """Exclusive non-blocking ``flock`` on ``<parent>/.<name>.lock`` (holds our pid).

    The lock file is created with ``O_EXCL | O_NOFOLLOW`` and removed on release (while
    still held), so no ``.lock`` is left behind; one left by a killed run (its content is a
    qkcov lock's) is taken over by the next. A symbolic link, a non-regular file or a file
    whose content is not a qkcov lock is never opened for writing, truncated or removed: it
    is refused with one line. Taking the lock re-checks that the locked file is still the
    one at the path (a holder may have just removed it)."""

    def __init__(self, out: Path, display: str | Path | None = None) -> None:
        self.path = out.parent / f".{out.name}.lock"
        shown = display or out
        flags = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        for attempt in range(200):
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, _file_mode())
                os.write(fd, f"{LOCK_TAG} {os.getpid()}\n".encode())
                created = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, flags | os.O_NONBLOCK)
                except FileNotFoundError:
                    continue  # its holder just removed it
                except OSError as err:
                    what = "a symbolic link" if err.errno == errno.ELOOP else err.strerror
                    raise ValueError(
                        f"--out {shown}: {self.path} is {what}, not a qkcov lock; qkcov leaves "
                        "it alone: move it away or pick another folder"
                    ) from None
                created = False
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                os.close(fd)
                raise ValueError(
                    f"--out {shown}: {self.path} is {file_kind(mode)}, not a qkcov lock; move it away"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 64, 0).decode(errors="replace").split()
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    pid = next((x for x in holder if x.isdigit()), "?")
                    raise ValueError(
                        f"--out {shown}: another qkcov run is writing there (pid {pid})"
                    ) from None
                raise
            if not created:
                text = os.pread(fd, 256, 0)
                if not _is_lock_text(text):
                    os.close(fd)
                    if not text and attempt < 20:  # its creator has not written its pid yet
                        import time

                        time.sleep(0.01)
                        continue
                    raise ValueError(
                        f"--out {shown}: {self.path} exists and was not written by qkcov (not a "
                        "qkcov lock); qkcov leaves it alone: move it away or pick another folder"
                    )
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise ValueError(f"--out {shown}: could not take the lock {self.path}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{LOCK_TAG} {os.getpid()}\n".encode(), 0)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):  # only the lock file we hold
                if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(self.path)
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _check_out(out: str | Path) -> Path:
    if not isinstance(out, (str, Path)) or not str(out).strip():
        raise ValueError(f"--out: expected a folder path, got {out!r}")
    path = Path(out).expanduser().absolute()
    if path.is_symlink() and not path.exists():
        raise ValueError(f"--out {out}: is a broken symbolic link, expected a folder")
    if path.is_symlink() and path.is_dir():  # write to the folder the link names; keep the link
        path = Path(os.path.realpath(path))
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
    for above in path.parents:  # a run inside a complete run would make that run a mix
        if (above / MANIFEST_FILE).is_file() and _out_state(above)[0] == "run":
            raise ValueError(
                f"--out {out}: is inside the complete qkcov run {above}, which would then hold "
                "files its manifest does not list; pick a folder outside it"
            )
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


# names a run writes at the top of its folder; --force never lets them replace a user's file
RUN_FILE_NAMES = (
    MANIFEST_FILE, "run.json", "run.safetensors", "section.json", "report.html", "report_index.json"
)  # fmt: skip


def _protected_place(out: str | Path, protect: Sequence[str | Path] = ()) -> None:
    """Refuse an ``--out`` that is the filesystem root, the home folder, the working
    directory, or holds one of them or a ``protect`` path (e.g. the records file)."""
    display = str(out)
    raw = Path(out).expanduser()
    real = Path(os.path.realpath(raw))
    places = [("the working directory", Path.cwd())]
    with contextlib.suppress(RuntimeError, KeyError):  # no home folder known
        places.append(("your home folder", Path.home()))
    places += [(f"a folder holding {p}", Path(p)) for p in protect]
    what = "the filesystem root" if real == Path(real.anchor) else None
    for name, place in places:
        if what is not None:
            break
        place = Path(os.path.realpath(Path(place).expanduser()))
        if name.startswith("a folder holding "):
            what = name if real in place.parents else None
        elif real == place or real in place.parents:
            what = name if real == place else f"a parent of {name}"
    if what is not None:
        inside = os.path.join(display or ".", "qkcov-run")
        raise ValueError(
            f"--out {display!r}: is {what} ({real}); qkcov writes a run into a folder of its "
            f"own: pick a new folder, e.g. --out {inside}"
        )


def _owned_files(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` a qkcov manifest in ``root`` lists, or empty. Listing a
    path proves nothing: a file is qkcov's only while its content matches that hash
    (:meth:`RunFolder._ours`)."""
    with contextlib.suppress(ValueError, OSError):
        manifest = _read_manifest(root)
        if str(manifest.get("format", "")).startswith("qkcov-run/"):
            return {
                Path(f["path"]).as_posix(): str(f.get("sha256"))
                for f in manifest["files"]
                if not Path(f["path"]).is_absolute() and ".." not in Path(f["path"]).parts
            }
    return {}


# top-level names a run may write besides RUN_FILE_NAMES (figures, specs): --force checks
# them before any work, so a user's file of such a name is refused at once
RUN_FILE_PATTERNS = (
    "scan.png", "offsets.png", "plotly.min.js", "L*H*.*.png", "L*H*.*.json",
    "causal_rank_*.png", "rotary_*.png",
)  # fmt: skip


def _run_subfolders(path: Path) -> list[str]:
    """Names of the sub-folders of ``path`` (two levels) that hold a qkcov run."""
    found = []
    with contextlib.suppress(OSError):
        for child in sorted(path.iterdir()):
            if not child.is_dir() or child.is_symlink():
                continue
            if (child / MANIFEST_FILE).is_file() or any(
                (g / MANIFEST_FILE).is_file() for g in child.iterdir() if g.is_dir()
            ):
                found.append(child.name)
    return found


def describe_run(path: Path) -> str:
    """``"the run of <date> on <records>"`` for a run folder (what replacing it loses)."""
    when, what = "unknown date", "unknown records"
    with contextlib.suppress(ValueError, OSError):
        created = _read_manifest(path).get("created")
        if created:
            when = str(created).replace("T", " ")[:16] + " UTC"
    with contextlib.suppress(ValueError, OSError, KeyError, TypeError, AttributeError):
        info = json.loads((path / "run.json").read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise TypeError("run.json is not an object")
        recs = ((info.get("provenance") or {}).get("records") or {}).get("path")
        what = Path(str(recs)).name if recs else f"{info.get('n_records', '?')} records"
        what += f" ({info.get('model', '?')})"
    return f"the run of {when} on {what}"


def _out_state(path: Path) -> tuple[str, str]:
    """``("new" | "empty" | "run" | "runs" | "foreign", why)`` of an output folder (``runs``:
    a folder of run folders, ``why`` naming them)."""
    if not path.exists() and not path.is_symlink():
        return "new", ""
    if not any(path.iterdir()):
        return "empty", ""
    if not (path / MANIFEST_FILE).is_file():
        runs = _run_subfolders(path)
        if runs:
            return "runs", ", ".join(runs[:3]) + (" …" if len(runs) > 3 else "")
        return "foreign", "it has no qkcov manifest.json"
    try:
        manifest = verify_run_folder(path)
    except ValueError as err:
        return "foreign", str(err).removeprefix(f"{path}: ")
    if manifest.get("shared"):
        return "foreign", "a run was written into it beside files qkcov did not write (--force)"
    return "run", ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


OWNER_FILE = ".qkcov-owner"
_OWNER_FORMAT = "qkcov-owner/1"


def _note(line: str) -> None:
    """One line on stderr about a path qkcov leaves alone."""
    print(f"qkcov: {line}", file=sys.stderr, flush=True)


def make_owned_dir(path: str | Path, token: str | None = None) -> str:
    """Create the folder ``path`` (it must not exist) holding the qkcov marker file
    ``.qkcov-owner`` (this process's pid and a random token); return the token. Only a
    folder carrying a valid marker is ever removed by :func:`remove_owned_dir`."""
    path = Path(path)
    token = token or secrets.token_hex(8)
    os.mkdir(path, 0o777)  # the umask applies
    write_json(path / OWNER_FILE, {"format": _OWNER_FORMAT, "pid": os.getpid(), "token": token})
    return token


def mark_owned_dir(path: str | Path) -> str:
    """Add the qkcov marker to an existing folder qkcov has just proved is its own."""
    token = secrets.token_hex(8)
    write_json(
        Path(path) / OWNER_FILE, {"format": _OWNER_FORMAT, "pid": os.getpid(), "token": token}
    )
    return token


def dir_owner(path: str | Path) -> dict[str, Any] | None:
    """The marker of a folder qkcov made (``{"pid", "token"}``), or ``None`` (not a folder,
    a symbolic link, no marker or a marker that is not qkcov's)."""
    path = Path(path)
    marker = path / OWNER_FILE
    try:
        if path.is_symlink() or not path.is_dir() or marker.is_symlink():
            return None
        data = parse_json(read_regular_bytes(marker, cap=4096), marker, expect=dict)
    except (OSError, ValueError):
        return None
    pid, token = data.get("pid"), data.get("token")
    if (
        data.get("format") != _OWNER_FORMAT
        or not isinstance(pid, int)
        or not isinstance(token, str)
    ):
        return None
    return data


def remove_owned_dir(path: str | Path, *, refuse: bool = False) -> bool:
    """Delete ``path`` only if it carries qkcov's marker (:func:`make_owned_dir`); True when
    it is gone. A folder without the marker is left alone, named in one line on stderr, or
    with ``refuse=True`` in one ``ValueError``."""
    path = Path(path)
    if not os.path.lexists(path):
        return True
    if dir_owner(path) is None:
        line = f"{path} exists and was not made by qkcov (no {OWNER_FILE} marker); left alone"
        if refuse:
            raise ValueError(f"{line}: move it away or pick another --out")
        _note(line)
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def _clean_leftovers(out: Path) -> None:
    """Under ``out``'s lock: put back a previous run a killed commit left in ``.old-*`` (when
    ``out`` is missing) and delete staging / old folders of dead runs. Only folders whose
    qkcov marker names this token and a process that is gone are touched; any other
    ``.NAME.staging-*`` / ``.NAME.old-*`` is the user's and is left alone (one line)."""
    prefixes = (f".{out.name}.staging-", f".{out.name}.old-")
    for entry in sorted(os.listdir(out.parent)):
        if not entry.startswith(prefixes):
            continue
        p = out.parent / entry
        owner = dir_owner(p)
        if owner is None or not entry.endswith(f"-{owner['token']}"):
            _note(f"{p} was not made by qkcov (no matching {OWNER_FILE} marker); left alone")
            continue
        pid = owner["pid"]
        if pid != os.getpid() and _pid_alive(pid):
            continue
        if entry.startswith(prefixes[1]) and not out.exists() and (p / "run").is_dir():
            os.replace(p / "run", out)
        shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@dataclasses.dataclass
class OutputConfig(ConfigMixin):
    """How a command may write its output folder (``--force``; flags derive from it)."""

    force: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "write into an --out folder that holds files qkcov did not write, keeping "
            "every one of them (refused if a run file name is taken by one)"
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.force, bool):
            raise ValueError(f"--force must be true or false, got {self.force!r}")


class RunFolder:
    """One complete run per output folder (context manager; yields the staging folder).

    ``RunFolder(out, command=...)`` checks ``out`` at once (not a file, parent creatable and
    writable; not the filesystem root, the home folder, the working directory or a folder
    holding a ``protect`` path), takes an exclusive lock (``ValueError`` if another run holds
    it), cleans what killed runs left beside ``out`` and creates a staging folder beside
    ``out`` on the same filesystem. An existing ``out`` is replaced only when it is empty or
    a complete qkcov run (its manifest verifies); any other folder is refused, or with
    ``force=True`` the run is written inside it file by file, keeping every file the
    folder's manifest does not list (a run file name taken by such a file is refused, at
    once: the usual run files and ``files``, the names this command will write).

    Callers write every artifact (sub-runs in subfolders included) into the folder
    ``__enter__`` returns. On success ``manifest.json`` is written last (each file's relative
    path, size and sha256, the command, the time) and the staging folder replaces ``out`` as
    a whole in one atomic exchange (two renames where the system cannot exchange; a commit
    killed between them is put back by the next run); on any error or ``KeyboardInterrupt``
    the staging folder is deleted and the old ``out`` is untouched.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        command: str,
        force: bool = False,
        protect: Sequence[str | Path] = (),
        files: Sequence[str] = (),
    ) -> None:
        if isinstance(out, (str, Path)) and str(out).strip():
            _protected_place(out, protect)
        self.out, self._lock = _lock_for(out)
        self.command = str(command)
        self.force = bool(force)
        try:
            _clean_leftovers(self.out)
            state, why = _out_state(self.out)
            self._inplace = state in ("foreign", "runs")
            self._owned = _owned_files(self.out) if self._inplace else {}
            # its manifest is qkcov's when sealed, or (older runs) when every file it lists
            # still has the content qkcov wrote
            self._manifest_ours = bool(self._owned) and (
                is_sealed(self.out / MANIFEST_FILE) or all(self._ours(r) for r in self._owned)
            )
            if state == "runs" and not self.force:
                raise ValueError(
                    f"--out {out}: is a folder of qkcov runs ({why}), not one run; qkcov "
                    "replaces only an empty folder or one complete run. Name a new folder "
                    f"inside it (e.g. --out {Path(str(out)) / 'new-run'})"
                )
            if state == "run" and (self.out / "run.json").is_file() and is_main_process():
                print(  # said before the old run goes (a pipeline run's folder)
                    f"--out {out}: replacing {describe_run(self.out)} (kept if this run fails)",
                    file=sys.stderr,
                )
            if self._inplace and not self.force:
                raise ValueError(
                    f"--out {out}: holds files qkcov did not write ({why}); qkcov replaces only "
                    "an empty folder or a complete qkcov run. Pick a new folder, or add --force "
                    "to write the run inside it (files its manifest does not list are kept)"
                )
            if self._inplace:
                import fnmatch

                present = [
                    e for e in sorted(os.listdir(self.out))
                    if any(fnmatch.fnmatchcase(e, pat) for pat in RUN_FILE_PATTERNS)
                ]  # fmt: skip
                self._check_names([*RUN_FILE_NAMES, *files, *present])
            token = secrets.token_hex(8)
            self.staging = self.out.parent / f".{self.out.name}.staging-{os.getpid()}-{token}"
            make_owned_dir(self.staging, token)
        except BaseException:
            self._lock.release()
            raise
        self._done = False

    def _ours(self, rel: str) -> bool:
        """Whether ``out/rel`` is a file the folder's qkcov manifest lists and whose content
        still matches the hash qkcov wrote for it (so qkcov may replace or remove it)."""
        dst = self.out / rel
        want = self._owned.get(rel)
        if want is None or dst.is_symlink() or not dst.is_file():
            return False
        try:
            return _sha256(dst) == want
        except (OSError, ValueError):
            return False

    def _check_names(self, names: Sequence[str]) -> None:
        """--force: refuse when a run file would replace a file qkcov did not write (or one
        it wrote that was changed since)."""
        for rel in names:
            parts = Path(rel).parts
            for i in range(1, len(parts) + 1):
                sub = Path(*parts[:i]).as_posix()
                dst = self.out / sub
                last = i == len(parts)
                if not (dst.exists() or dst.is_symlink()) or (not last and dst.is_dir()):
                    continue
                if last and sub == MANIFEST_FILE and self._manifest_ours:
                    continue  # the manifest itself: qkcov's own, rewritten
                if last and self._ours(sub):
                    continue
                why = (
                    "one qkcov wrote but that was changed since (its sha256 no longer matches "
                    "the manifest)"
                    if last and sub in self._owned
                    else "one the run would replace"
                )
                raise ValueError(
                    f"--out {self.out}: --force keeps files qkcov did not write, and "
                    f"{dst} is {why}; move it away or pick a new folder"
                )

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

    def _keep_staging(self) -> Path:
        """Move the finished run beside ``out`` as ``NAME.new-run`` (a new name) and return it."""
        kept = self.out.parent / f"{self.out.name}.new-run"
        n = 1
        while os.path.lexists(kept):
            n += 1
            kept = self.out.parent / f"{self.out.name}.new-run-{n}"
        os.replace(self.staging, kept)
        return kept

    def _commit(self) -> None:
        with contextlib.suppress(FileNotFoundError):  # the marker is no part of the run
            os.unlink(self.staging / OWNER_FILE)
        manifest: dict[str, Any] = {
            "format": "qkcov-run/1",
            "command": self.command,
            "created": _now(),
            "files": _manifest_entries(self.staging),
        }
        if self._inplace:
            self._commit_inplace(manifest)
            return
        write_json(self.staging / MANIFEST_FILE, manifest, seal=True)
        state, why = _out_state(self.out)
        if state == "foreign":  # files appeared during the run: leave them, keep the new run
            kept = self._keep_staging()
            raise ValueError(
                f"--out {self.out}: files qkcov did not write appeared there during the run "
                f"({why}); it was left alone and the new run is in {kept}"
            )
        if state == "new" or state == "empty":
            os.replace(self.staging, self.out)
            return
        if _exchange(self.staging, self.out):
            mark_owned_dir(self.staging)  # now the previous (verified) run; a kill leaves it marked
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        token = secrets.token_hex(8)
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{token}"
        make_owned_dir(old, token)
        os.replace(self.out, old / "run")
        try:
            os.replace(self.staging, self.out)
        except BaseException:
            os.replace(old / "run", self.out)  # put the previous run back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)

    def _commit_inplace(self, manifest: dict[str, Any]) -> None:
        """--force into a folder holding other files: move the run's files in one by one
        (the manifest goes first and comes back last, so a reader sees no half run). A file
        is replaced or removed only while its content matches the hash qkcov wrote for it."""
        files = [e["path"] for e in manifest["files"]]
        try:
            self._check_names(files)
        except ValueError as err:  # keep the computed run rather than lose it
            kept = self._keep_staging()
            raise ValueError(f"{err}; the new run is in {kept}") from None
        if self._manifest_ours:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.out / MANIFEST_FILE)
        for rel in files:
            (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / rel, self.out / rel)
        for rel in sorted(set(self._owned) - set(files) - {MANIFEST_FILE}):
            if self._ours(rel):  # the previous qkcov run's own, unchanged file
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    (self.out / rel).unlink()
            elif os.path.lexists(self.out / rel):
                _note(f"{self.out / rel} is listed by the old manifest but was changed; kept")
        manifest["shared"] = True  # files beside the run are not the manifest's business
        write_json(self.out / MANIFEST_FILE, manifest, seal=True)
        shutil.rmtree(self.staging, ignore_errors=True)

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
    manifest = parse_json(read_regular_bytes(mpath, what="manifest"), mpath)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(f.get("path"), str) for f in files
    ):
        raise ValueError(f"{mpath}: not a valid manifest (no 'files' list)")
    return manifest


def verify_run_folder(path: str | Path) -> dict[str, Any]:
    """Check ``path`` against its ``manifest.json``; return the manifest.

    Every listed file must be present with the recorded size and sha256, and no other file
    may be there (a mixed folder) unless the manifest says the run was written with
    ``--force`` into a folder of other files (``"shared"``). Raises ``ValueError`` naming
    the first mismatch.
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
    for rel in present:  # a FIFO, device or socket would block or lie to a reader
        mode = os.lstat(root / rel).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise ValueError(f"{root}: {rel} is {file_kind(mode)}, not a regular file; refused")
    for rel, entry in listed.items():
        f = root / rel
        if f.is_symlink() or not f.is_file():
            what = "is a symlink" if f.is_symlink() else "is missing"
            raise ValueError(f"{root}: {rel} {what} (manifest lists it); incomplete run")
        if f.stat().st_size != entry.get("size") or _sha256(f) != entry.get("sha256"):
            raise ValueError(f"{root}: {rel} was modified after the run (size/sha256 mismatch)")
    extra = [r for r in present if r not in listed]
    if extra and not manifest.get("shared"):
        raise ValueError(
            f"{root}: {extra[0]} is not in the manifest (a file from another run or a "
            f"mixed folder; {len(extra)} unlisted file(s))"
        )
    return manifest


def read_run_files(path: str | Path, names: Sequence[str]) -> dict[str, bytes]:
    """The bytes of ``names`` (relative paths) of a verified run folder, all from one run:
    each file's sha256 must match the manifest that was verified, so a run replacing the
    folder while it is read is retried rather than mixed with the previous one."""
    import time

    root = Path(path)
    for attempt in range(20):
        try:
            listed = {e["path"]: e for e in verify_run_folder(root)["files"]}
        except (ValueError, FileNotFoundError):
            if attempt >= 2:  # a folder being replaced settles at once; a bad one stays bad
                raise
            time.sleep(0.05)
            continue
        out: dict[str, bytes] = {}
        for rel in names:
            if rel not in listed:
                raise ValueError(f"{root}: {rel} is not in the manifest (not a complete run)")
            try:
                data = read_regular_bytes(root / rel, cap=MAX_TENSOR_BYTES, what="run file")
            except FileNotFoundError:
                break
            if hashlib.sha256(data).hexdigest() != listed[rel].get("sha256"):
                break
            out[rel] = data
        else:
            return out
        time.sleep(0.05 * (attempt + 1))
    raise ValueError(
        f"{root}: the run kept changing while it was read (another run is replacing it)"
    )


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
    manifest.pop(SEAL_KEY, None)
    write_json(root / MANIFEST_FILE, manifest, seal=True)
    return manifest
