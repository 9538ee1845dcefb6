"""Step: one head, start to end — its subspaces, projections, swaps, token view, attribution,
position and verdict — from the passes every head shares (:class:`HeadInputs`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...results import AttributionResult, HeadResult
from ...runtime import Timer, sub_seed
from ..config import Head, RunConfig
from ..plan import Plan
from ..verdict import _verdict
from .attribution import _attribution
from .causal import _conditional
from .collect import Collected
from .contrast import Contrasts, _subspace_results
from .position import _head_position
from .projections import _name_points, _projection
from .swaps import SwapBase, _swaps
from .token_view import _token_view


@dataclass
class HeadInputs:
    """What every head's step reads: the model, the plan and its record subsets
    (``cent``: centroid records, ``held``: projected held-out records, ``swap_records``:
    the swap prompts), the shared passes (ΔC, collection, swap base), the head scan and the
    rotary specs per layer (``no_rotary``: why there are none)."""

    model: Any
    tokenizer: Any
    plan: Plan
    cfg: RunConfig
    timer: Timer
    resolved: Sequence[Any]
    cent: list[int]
    held: list[int]
    swap_records: list[Any]
    contrast: Contrasts
    collected: Collected
    swap_base: SwapBase
    scan: list[dict[str, Any]] | None
    specs: Mapping[int, Any]
    no_rotary: str | None


def _head_step(x: HeadInputs, head: Head) -> HeadResult:
    """Every per-head step of one head, in order, and its verdict."""
    model, tokenizer, plan, cfg, timer = x.model, x.tokenizer, x.plan, x.cfg, x.timer
    resolved, cent, held, swap_records = x.resolved, x.cent, x.held, x.swap_records
    contrasts, stats = x.contrast.contrasts, x.contrast.stats
    vecs, full, tokens = x.collected.vecs, x.collected.full, x.collected.tokens
    steps, progress, name = cfg.step_list(), not timer.quiet, f"L{head[0]}H{head[1]}"
    with timer.phase("subspaces"):
        features = {
            f: _subspace_results(contrasts[f], head, f, cfg, (stats[f] or {}).get(head))
            for f in plan.features
        }
    projections = {}
    with timer.phase("projections"):
        if held:
            v = vecs[head]
            n_cent = len(cent)
            groups_all = [plan.records[i].group or "" for i in cent + held]
            for f, feat in features.items():
                tr = [j for j, i in enumerate(cent) if plan.feature_of(i) == f]
                te = [n_cent + j for j, i in enumerate(held) if plan.feature_of(i) == f]
                if not te:
                    continue
                projections[f] = _projection(
                    feat, v.select(tr) if tr else None, v.select(te), [groups_all[j] for j in tr], [groups_all[j] for j in te], cfg,
                    sub_seed(cfg.seed, f"proj:{name}:{f}"),
                )  # fmt: skip
                _name_points(projections[f], tokenizer, [resolved[held[j - n_cent]] for j in te])
    with timer.phase("swaps"):
        timer.log(f"{name}: swaps")
        cond = _conditional(vecs.get(head), resolved, cent, plan, cfg, name)
        swaps = _swaps(
            model, tokenizer, swap_records, x.swap_base, head, features, cfg, progress,
            None if "swaps" in steps else "step off (--steps)",
            {f: (stats[f] or {}).get(head) for f in plan.features}, cond,
            plan.kinds.get(plan.features[0]), _build_patterns(plan, resolved),
        )  # fmt: skip
    with timer.phase("token_view"):
        token_view = _token_view(
            model, tokenizer, swap_records, x.swap_base if swap_records else None, head,
            features, swaps, cfg,
        )  # fmt: skip
    with timer.phase("attribution"):
        attribution = (
            _attribution(full[head], features, tokens, cfg)
            if full
            else AttributionResult(
                [], 0, math.nan, math.nan, {}, {}, math.nan, skipped="no held-out records"
            )
        )
    scan_row = next(
        (r for r in x.scan or [] if r["layer"] == head[0] and r["head"] == head[1]), None
    )
    with timer.phase("position"):
        position = _head_position(
            features, x.specs.get(head[0]), vecs.get(head), [resolved[i] for i in cent],
            [plan.feature_of(i) for i in cent], cfg, name, x.no_rotary,
        )  # fmt: skip
    result = HeadResult(
        head[0], head[1], features, projections, swaps, attribution, scan_row,
        token_view=token_view, position=position,
    )  # fmt: skip
    result.verdict = _verdict(result, cfg)
    return result


def _build_patterns(plan: Any, resolved: Any) -> list[str | None]:
    """Each build record's position pattern (:mod:`qkcov.core.transfer`) of the headline
    feature, in the record statistics' order (records with a resolved key)."""
    from ...core.transfer import position_patterns

    b0 = [r for r in (resolved[i] for i in plan.indices("build", plan.features[0])) if r.keys]
    return position_patterns(
        [r.query for r in b0], [r.positives for r in b0], [r.negatives for r in b0]
    )
