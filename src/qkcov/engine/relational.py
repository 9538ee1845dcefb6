"""The relational test and the transfer across position patterns on the swaps' unedited forward.

Both read what :func:`qkcov.engine.swaps.capture_swap_base` already holds (every batch's query
row and keys of the studied head, in the bases' frame): no forward of their own.

- :func:`relation_inputs`: per swap record the query, the most-attended positive and the
  most-attended negative key (one rule for both sides, :func:`qkcov.core.relational.pick_pair_keys`)
  and their positions, for the cross-record exchange.
- :func:`relational_result`: the exchange inside a key subspace (and label-permuted ones, as a
  reported baseline), its exact sign-flip test and the build-side relational share
  (:mod:`qkcov.core.relational`), as the dict ``run.json`` stores under ``swaps.relation_test``.
- :func:`swap_patterns` / :func:`transfer_result`: where each swap pair's positive sits relative
  to its negative, and the pattern-split swaps (:mod:`qkcov.core.transfer`) summarised beside
  the in-distribution ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..core.intervention import capped_softmax
from ..core.relational import (
    pair_partners,
    pick_pair_keys,
    relation_patch,
    relation_share,
    relation_test,
)
from ..core.transfer import PATTERNS

__all__ = [
    "RELATION_SHARE",
    "relation_inputs",
    "relational_result",
    "swap_patterns",
    "transfer_result",
]

RELATION_SHARE = 0.5  # detected kind: relational share of ΔC above this → the relational test
MIN_PATTERN = 8  # held-out records a pattern needs for a transfer row


def relation_inputs(views: Sequence[Any], resolved: Sequence[Any]) -> dict[str, Any]:
    """``{"rows", "q", "k_pos", "k_neg" ([n, D] float64), "positions" [n, 3], "groups" (the
    records' group), "scaling", "softcap"}`` from the swap base's views of one head (``View.rows`` index ``resolved``)."""
    rows, qs, kps, kns, pos, groups = [], [], [], [], [], []
    scaling, softcap = None, None
    for v in views:
        q, k = v.query.double(), v.keys.double()
        row = capped_softmax((k @ q[:, :, None])[..., 0] * v.scaling, v.mask, v.softcap)
        recs = [resolved[i] for i in v.rows]
        ip, in_ = pick_pair_keys(row, [r.positives for r in recs], [r.negatives for r in recs])
        b = torch.arange(len(recs))
        rows += list(v.rows)
        groups += [r.record.group for r in recs]
        qs.append(q)
        kps.append(k[b, ip])
        kns.append(k[b, in_])
        pos.append(torch.stack([torch.tensor([r.query for r in recs]), ip, in_], 1))
        scaling, softcap = v.scaling, v.softcap
    if not rows:
        raise ValueError("relation_inputs: no swap record")
    return {"rows": rows, "q": torch.cat(qs), "k_pos": torch.cat(kps), "k_neg": torch.cat(kns),
            "positions": torch.cat(pos), "groups": groups, "scaling": scaling,
            "softcap": softcap}  # fmt: skip


def relational_result(
    inputs: Mapping[str, Any],
    bases: torch.Tensor,
    stats: Any = None,
    seed: int = 0,
    n_draws: int = 9999,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """The relational test of ``bases[0]`` (``[1+P, D, r]``: the real key subspace, then the
    label-permuted ones, reported as a baseline) on ``inputs`` (:func:`relation_inputs`), and the
    relational share of ``stats`` (the build records' :class:`~qkcov.core.statistics.RecordStats`)
    inside ``bases[0]``."""
    from ..core.statistics import paired_bootstrap_ci

    partner, shares = pair_partners(inputs["positions"], seed=seed, groups=inputs.get("groups"))
    out = relation_patch(inputs["q"], inputs["k_pos"], inputs["k_neg"], partner, bases,
                         inputs["scaling"], inputs["softcap"])  # fmt: skip
    eff = out["effect"]
    ok = torch.isfinite(eff[0])
    try:
        test = relation_test(eff[0], partner, n_draws=n_draws, seed=seed)
    except ValueError as err:
        return {"available": False, "reason": f"relational test: {err}"}
    perm = eff[1:, ok].mean(1) if eff.shape[0] > 1 else None
    lo, hi = (
        paired_bootstrap_ci(eff[0, ok], n_boot=n_boot, seed=seed)
        if int(ok.sum()) >= 10
        else (None, None)
    )
    share = None if stats is None else relation_share(stats, bases[0])
    return {
        "available": True, "reason": "", "test": "cross-record exchange",
        "effect": test.effect, "ci": [lo, hi],
        "effect_pos": float(out["effect_pos"][0, ok].mean()),
        "effect_neg": float(out["effect_neg"][0, ok].mean()),
        "delta_p": float(out["delta_p"][0, ok].mean()),
        "p_value": test.p_value, "p_floor": test.p_floor, "exact": test.exact,
        "n_pairs": test.n_pairs, "null_std": test.null_std, "partners": shares,
        "permuted": None if perm is None else {"mean": float(perm.mean()), "std": float(perm.std()) if perm.numel() > 1 else 0.0},
        "relation_share": share,
    }  # fmt: skip


def swap_patterns(pairs: Sequence[Any]) -> list[str | None]:
    """Per swap record the pattern of its swap pair: ``"positive-farther"`` when the swapped
    positive key (``orig``) is farther from the query than the negative (``target``)."""
    out: list[str | None] = []
    for p in pairs:
        if p is None:
            out.append(None)
            continue
        o, t = p
        out.append(None if o == t else PATTERNS[0] if o < t else PATTERNS[1])
    return out


def transfer_result(
    per_prompt: Mapping[str, torch.Tensor],
    patterns: Sequence[str | None],
    headline: torch.Tensor,
    random: torch.Tensor,
    rank: int,
    min_records: int = MIN_PATTERN,
) -> dict[str, Any]:
    """Transfer rows from per-prompt swap Δp ``[n]``: ``per_prompt[p]`` the subspace built on
    the build records of pattern ``p``; ``headline [n]`` the headline subspace (built on all);
    ``random [draws, n]`` equal-rank random subspaces; ``patterns [n]`` each swap record's
    pattern (:func:`swap_patterns`). One row per (built on, tested on) pair of patterns with
    ``min_records`` held-out records."""
    pats = list(patterns)
    rows = []
    for test in PATTERNS:
        m = torch.tensor([p == test for p in pats], dtype=torch.bool)
        if int(m.sum()) < min_records:
            continue
        for built in PATTERNS:
            if built not in per_prompt:
                continue
            rows.append({
                "built_on": built, "tested_on": test, "n": int(m.sum()),
                "delta_p": float(per_prompt[built][m].mean()),
                "in_distribution": built == test,
                "headline_delta_p": float(headline[m].mean()),
                "random_mean": float(random[:, m].mean()),
            })  # fmt: skip
    counts = {p: sum(x == p for x in pats) for p in PATTERNS}
    if not any(not r["in_distribution"] for r in rows):
        return {"available": False, "rank": rank, "counts": counts,
                "reason": f"too few held-out swap pairs of the other position pattern (need "
                f"{min_records} of each; {counts[PATTERNS[0]]} with the positive farther from "
                f"the query than the negative, {counts[PATTERNS[1]]} nearer)"}  # fmt: skip
    return {"available": True, "rank": rank, "counts": counts, "rows": rows}
