"""Step: the all-head scan (``--heads auto``) and explicit head specs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...runtime import Timer, sub_seed
from ..config import Head, RunConfig
from ..plan import Plan
from ..state import RunState

# the most bytes the one-pass capture (every head's q/k at every build record's sites) may
# keep; beyond it the scan runs as its own forward over the scan records (two passes)
ONE_PASS_MAX_BYTES = 2 * 2**30


def _scan_step(
    model: Any, tokenizer: Any, resolved: Sequence[Any], plan: Plan, scan_idx: list[int],
    cfg: RunConfig, info: Any, timer: Timer, state: RunState | None, dist: Any,
    one_pass: bool = True,
) -> tuple[list[dict[str, Any]] | None, Any]:  # fmt: skip
    """The all-head scan over the scan subset (``--heads auto`` only; explicit heads get no
    scan forward at all: the swaps' own base pass finds each head's most-attended key).

    Returns ``(scan, captured)``. With ``one_pass`` (and the capture within
    :data:`ONE_PASS_MAX_BYTES`) the scan is computed inside ONE forward over every build
    record that also captures every head's q/k at the records' sites
    (:func:`qkcov.engine.scan.scan_capture`); ``captured`` then feeds the ΔC step, which
    runs no forward of its own. Otherwise (``one_pass=False``, a scan resumed from its
    checkpoint, a capture too large) ``captured`` is ``None``: the scan forwards the scan
    records alone and the ΔC step forwards the build records for the chosen heads."""
    from ...engine.scan import attention_rows, one_pass_bytes, scan_capture, scan_heads

    saved = state.load_scan() if state is not None else None
    if saved is not None:
        timer.log("head scan: resumed from the checkpoint")
        return saved, None
    if not (cfg.heads.strip().lower().startswith("auto") and scan_idx):
        return None, None
    lists = [plan.indices("build", f) for f in plan.features]
    size = one_pass_bytes(model, [resolved[i] for ids in lists for i in ids])
    records = [resolved[i] for i in scan_idx]
    captured = None
    if one_pass and size <= ONE_PASS_MAX_BYTES:
        timer.log(f"head scan over {info.n_layers} layers x {info.n_heads} heads, in the one "
                  f"forward over the build records that captures q/k for ΔC "
                  f"({size / 2**20:.0f} MiB)")  # fmt: skip
        captured = scan_capture(model, tokenizer, resolved, lists, scan_idx,
                                batch_size=cfg.batch_size, progress=not timer.quiet, dist=dist)  # fmt: skip
        rows = captured.rows
    else:
        timer.log(f"head scan over {info.n_layers} layers x {info.n_heads} heads"
                  + ("" if not one_pass else f" (its own forward: capturing every head for ΔC "
                     f"would keep {size / 2**30:.1f} GiB)"))  # fmt: skip
        rows = attention_rows(model, tokenizer, records, batch_size=cfg.batch_size,
                              progress=not timer.quiet, dist=dist)  # fmt: skip
    scan = scan_heads(rows, records, seed=sub_seed(cfg.seed, "scan"))
    if state is not None:
        state.save_scan(scan)
    return scan, captured


def _explicit_heads(spec: str, info: Any) -> list[Head]:
    from ...models.heads import parse_heads

    return list(parse_heads(spec, info.n_layers, info.n_heads))
