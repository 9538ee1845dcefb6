"""Step: the all-head scan (``--heads auto``) and explicit head specs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...runtime import Timer, sub_seed
from ..config import Head, RunConfig
from ..state import RunState


def _scan_step(
    model: Any, tokenizer: Any, resolved: Sequence[Any], scan_idx: list[int], cfg: RunConfig,
    info: Any, timer: Timer, state: RunState | None, dist: Any,
) -> list[dict[str, Any]] | None:  # fmt: skip
    """The all-head scan over the scan subset (``--heads auto`` only; explicit heads get no
    scan forward at all: the swaps' own base pass finds each head's most-attended key)."""
    from ...engine.scan import attention_rows, scan_heads

    saved = state.load_scan() if state is not None else None
    if saved is not None:
        timer.log("head scan: resumed from the checkpoint")
        return saved
    if not (cfg.heads.strip().lower().startswith("auto") and scan_idx):
        return None
    timer.log(f"head scan over {info.n_layers} layers x {info.n_heads} heads")
    records = [resolved[i] for i in scan_idx]
    rows = attention_rows(model, tokenizer, records, batch_size=cfg.batch_size,
                          progress=not timer.quiet, dist=dist)  # fmt: skip
    scan = scan_heads(rows, records, seed=sub_seed(cfg.seed, "scan"))
    if state is not None:
        state.save_scan(scan)
    return scan


def _explicit_heads(spec: str, info: Any) -> list[Head]:
    from ...models.heads import parse_heads

    return list(parse_heads(spec, info.n_layers, info.n_heads))
