"""Checkpoint/resume of streaming accumulators (long runs over thousands of prompts).

A :class:`Checkpoint` file holds the float64 accumulator state, the index of the next batch to
run and a *fingerprint* (settings + a hash of the data + model name). Files are written
atomically (temp file + rename, :func:`qkcov.artifacts.save_tensors`), so a run killed at any
moment leaves either the previous or the new checkpoint. Resuming with a different fingerprint
is refused. In a distributed run each rank keeps its own file (``name.rank{r}.safetensors``)
with its local (not yet reduced) sums.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..artifacts import load_tensors, read_tensor_metadata, save_tensors, to_jsonable
from .distributed import Dist

__all__ = [
    "Checkpoint",
    "CheckpointState",
    "data_hash",
    "tensors_hash",
    "save_checked",
    "load_checked",
]

_FORMAT = "qkcov-checkpoint-1"


def data_hash(obj: Any) -> str:
    """sha256 (hex) of ``obj`` as canonical JSON (tensors/tuples/paths converted first)."""
    text = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over the names, dtypes, shapes and bytes of ``tensors``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tampered(path: str | Path) -> ValueError:
    return ValueError(
        f"--resume: {path} was changed after qkcov wrote it (checksum mismatch); it is not "
        f"resumed: delete {Path(path).parent} to start afresh"
    )


def save_checked(
    json_path: str | Path, tensor_path: str | Path, obj: Any, tensors: Mapping[str, torch.Tensor]
) -> None:
    """A checkpoint pair: tensors first, then JSON carrying both files' checksums."""
    from ..artifacts import write_json

    save_tensors(tensor_path, tensors)
    data = to_jsonable(obj)
    digest = data_hash({"data": data, "tensors": tensors_hash(tensors)})
    write_json(json_path, {"format": _FORMAT, "data": data, "sha256": digest})


def load_checked(
    json_path: str | Path, tensor_path: str | Path
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Read a pair written by :func:`save_checked`; ValueError if either file was changed."""
    from ..artifacts import read_json

    saved = read_json(json_path)
    if not isinstance(saved, dict) or saved.get("format") != _FORMAT or "data" not in saved:
        raise _tampered(json_path)
    try:
        tensors = load_tensors(tensor_path)
    except Exception:  # missing or not safetensors
        raise _tampered(tensor_path) from None
    if data_hash({"data": saved["data"], "tensors": tensors_hash(tensors)}) != saved.get("sha256"):
        raise _tampered(json_path)
    return saved["data"], tensors


@dataclass
class CheckpointState:
    """What a checkpoint holds: ``tensors`` (name → float64 sums), ``next_batch`` (index into
    this rank's batch list of the first batch not yet accumulated) and ``n_batches``."""

    tensors: dict[str, torch.Tensor]
    next_batch: int
    n_batches: int


@dataclass
class Checkpoint:
    """Save accumulator state to ``path`` every ``every`` batches; ``resume=True`` continues
    from an existing file (a missing file starts from scratch; without ``resume`` an existing
    file is overwritten by the first save). A finished run leaves its final state, so
    resuming it again runs no batch.

    ``fingerprint`` must identify everything the accumulated numbers depend on: settings, a
    hash of the data/records (:func:`data_hash`) and the model name. Engine functions add
    their own fields (heads, batch size, world size, a hash of the resolved records, ...).
    """

    path: str | Path
    fingerprint: dict[str, Any] = field(default_factory=dict)
    every: int = 1
    resume: bool = False

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"checkpoint every must be a positive integer, got {self.every!r}")
        if not isinstance(self.fingerprint, Mapping):
            raise ValueError(
                f"checkpoint fingerprint must be a dict, got {type(self.fingerprint).__name__}"
            )
        self.fingerprint = to_jsonable(dict(self.fingerprint))

    def file(self, dist: Dist | None = None) -> Path:
        """This rank's file: ``path`` in one process, ``stem.rank{r}.suffix`` otherwise."""
        path = Path(self.path)
        if dist is None or not dist.enabled:
            return path
        return path.with_name(f"{path.stem}.rank{dist.rank}{path.suffix or '.safetensors'}")

    def with_fields(self, **extra: Any) -> Checkpoint:
        """A copy whose fingerprint also holds ``extra`` (engine-level settings)."""
        return Checkpoint(self.path, {**self.fingerprint, **extra}, self.every, self.resume)

    def due(self, batches_done: int, n_batches: int) -> bool:
        """Save after ``batches_done`` batches? Every ``every`` batches and after the last."""
        return batches_done % self.every == 0 or batches_done == n_batches

    def save(
        self,
        tensors: Mapping[str, torch.Tensor],
        next_batch: int,
        n_batches: int,
        dist: Dist | None = None,
    ) -> Path:
        """Write the state atomically (temp file + rename)."""
        meta = {
            "format": _FORMAT,
            "fingerprint": self.fingerprint,
            "next_batch": int(next_batch),
            "n_batches": int(n_batches),
        }
        meta["sha256"] = data_hash({**meta, "tensors": tensors_hash(tensors)})
        return save_tensors(self.file(dist), tensors, meta)

    def load(self, dist: Dist | None = None) -> CheckpointState | None:
        """The saved state when ``resume`` is set and the file exists, else ``None``.

        Raises ValueError when the file was written with a different fingerprint.
        """
        path = self.file(dist)
        if not self.resume or not path.is_file():
            return None
        try:
            meta = read_tensor_metadata(path)
        except Exception as err:  # not a safetensors file at all
            raise ValueError(f"--resume: {path} is not a qkcov checkpoint ({err})") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(
                f"--resume: {path} is not a qkcov checkpoint (format {meta.get('format')!r})"
            )
        self.check_fingerprint(meta.get("fingerprint") or {}, path)
        tensors = load_tensors(path)
        fields = {k: v for k, v in meta.items() if k != "sha256"}
        if data_hash({**fields, "tensors": tensors_hash(tensors)}) != meta.get("sha256"):
            raise _tampered(path)
        return CheckpointState(tensors, int(meta["next_batch"]), int(meta["n_batches"]))

    def check_fingerprint(self, saved: Mapping[str, Any], where: str | Path) -> None:
        """ValueError naming the first field that differs between ``saved`` and this run."""
        for key in sorted(set(saved) | set(self.fingerprint)):
            old, new = saved.get(key, "<missing>"), self.fingerprint.get(key, "<missing>")
            if old != new:
                raise ValueError(
                    f"--resume: checkpoint in {where} was made with different settings or data: "
                    f"field {key!r} differs (checkpoint: {_short(old)}, now: {_short(new)})"
                )


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
