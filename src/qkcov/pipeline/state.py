"""Checkpoints and resume of one run (:class:`RunState`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..results import HeadResult
from ..tasks.records import ContrastRecord
from .config import Head, RunConfig


def checkpoint_dir(out: str | Path) -> Path:
    """The checkpoint folder of a run writing ``out``: ``.<out>.checkpoint/`` beside it."""
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.checkpoint"


def check_resume(out: str | Path) -> None:
    """``--resume`` with no checkpoint of ``out``: one line, before anything is said or
    written about ``--out``."""
    d = checkpoint_dir(out)
    if not (d / "fingerprint.json").is_file():
        raise ValueError(
            f"--resume: no checkpoint to resume in {d} (a run makes one with "
            "--checkpoint-every N); run without --resume to start afresh"
        )


class RunState:
    """Checkpoints of one run in ``.<out>.checkpoint/`` beside ``out``: the contrast
    accumulators (every ``checkpoint_every`` batches, per rank), the head scan and each
    finished head. ``resume=True`` continues from them when the fingerprint (settings, a hash
    of the records, the model) matches, and refuses otherwise; a finished run deletes them."""

    def __init__(
        self,
        out: str | Path,
        cfg: RunConfig,
        records: Sequence[ContrastRecord],
        *,
        resume: bool,
        dist: Any = None,
    ) -> None:
        from ..engine.checkpoint import data_hash

        self.dir = checkpoint_dir(out)
        self.cfg, self.resume, self.dist = cfg, resume, dist
        settings = {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"}
        self.fingerprint = {
            "settings": settings,
            "records": data_hash([r.to_dict() for r in records]),
        }
        self.enabled = cfg.checkpoint_every > 0 or resume
        if not self.enabled:
            return
        from ..artifacts import read_json, write_json

        fp = self.dir / "fingerprint.json"
        if resume:
            check_resume(out)
            saved = read_json(fp)
            for key in ("records", "settings"):
                if saved.get(key) != self.fingerprint[key]:
                    diff = (
                        key
                        if key == "records"
                        else next(
                            (k for k in settings if saved["settings"].get(k) != settings[k]), key
                        )
                    )
                    raise ValueError(
                        f"--resume: checkpoint in {self.dir} was made with different settings or "
                        f"data: {'the records differ' if diff == 'records' else f'--{diff.replace(chr(95), chr(45))} differs'}"
                    )
            from ..artifacts import dir_owner, mark_owned_dir

            if (
                self._main and dir_owner(self.dir) is None
            ):  # an older qkcov's (its fingerprint matched)
                mark_owned_dir(self.dir)
        elif self._main:
            from ..artifacts import make_owned_dir, remove_owned_dir

            remove_owned_dir(self.dir, refuse=True)  # only a checkpoint qkcov made
            make_owned_dir(self.dir)
            write_json(fp, self.fingerprint)
        self._barrier()

    @property
    def _main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def _barrier(self) -> None:
        from ..engine.distributed import barrier

        barrier(self.dist)

    def contrast(self, feature: str) -> Any:
        if not self.enabled:
            return None
        from ..engine.checkpoint import Checkpoint
        from ..naming import safe_component

        return Checkpoint(
            self.dir / f"contrast-{safe_component(feature)}.safetensors", self.fingerprint,
            every=max(self.cfg.checkpoint_every, 1), resume=self.resume,
        )  # fmt: skip

    def load_scan(self) -> list[dict[str, Any]] | None:
        from ..engine.checkpoint import load_checked

        if not (self.resume and (self.dir / "scan.json").is_file()):
            return None
        data, _ = load_checked(self.dir / "scan.json", self.dir / "scan.safetensors")
        return data["scan"]

    def save_scan(self, scan: list[dict[str, Any]]) -> None:
        from ..engine.checkpoint import save_checked

        if self.enabled and self._main:
            import torch

            # one small tensor: a safetensors file with none reads back as invalid
            save_checked(self.dir / "scan.json", self.dir / "scan.safetensors", {"scan": scan},
                         {"n_heads": torch.tensor([len(scan)])})  # fmt: skip

    def load_head(self, name: str) -> HeadResult | None:
        from ..engine.checkpoint import load_checked
        from ..results import _head_from_dict

        if not (self.resume and (self.dir / f"head-{name}.json").is_file()):
            return None
        return _head_from_dict(
            *load_checked(self.dir / f"head-{name}.json", self.dir / f"head-{name}.safetensors")
        )

    def load_heads(self, heads: Sequence[Head]) -> dict[Head, HeadResult]:
        """The heads a resumed run finished before (none without ``resume``)."""
        done = {}
        for head in heads:
            result = self.load_head(f"L{head[0]}H{head[1]}")
            if result is not None:
                done[head] = result
        return done

    def save_head(self, head: HeadResult) -> None:
        from ..engine.checkpoint import save_checked

        if self.enabled and self._main:
            save_checked(
                self.dir / f"head-{head.name}.json", self.dir / f"head-{head.name}.safetensors",
                head.to_dict(), head.tensors(factor_deltas=False),
            )  # fmt: skip

    def discard_if_empty(self) -> None:
        """Delete a checkpoint that holds nothing but its fingerprint (no work to resume)."""
        from ..artifacts import OWNER_FILE, remove_owned_dir

        names = {p.name for p in self.dir.iterdir()} if self.dir.is_dir() else set()
        if self.enabled and self._main and names <= {"fingerprint.json", OWNER_FILE}:
            remove_owned_dir(self.dir)

    def finish(self) -> None:
        from ..artifacts import remove_owned_dir

        self._barrier()
        if self.enabled and self._main:
            remove_owned_dir(self.dir)
