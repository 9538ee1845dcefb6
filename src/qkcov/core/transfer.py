"""Transfer across position patterns, and a causal rank random subspaces cannot reach.

**Position patterns** (:func:`position_patterns`). A record's pattern is where its positive
keys sit relative to its negative keys as seen from the query: ``"positive-farther"`` (median
query − key offset of the positives above the negatives'), ``"positive-nearer"``, or ``None``
(ties, one-sided records). Pinned patterns (e.g. a task's ``meta["order"]``) can be given
instead. When both patterns hold enough records, a subspace built on one pattern is swapped
on the held-out records of the other (:func:`pattern_bases`): a subspace that carries the
feature moves attention on both; one that carries *where the positive sits* moves it only on
the pattern it was built on.

**Guarded causal rank** (:func:`guarded_causal_rank`). The causal rank is the smallest rank
whose swap reaches ``fraction`` of the curve's best Δp; on a curve that keeps rising with the
rank it can land where random subspaces of the same rank already move attention by a
sizeable share of the effect (at rank 14 of a 64-dim head random swaps move Δp by 0.15). The
guarded rule only considers ranks where the random mean stays within ``max_random_share`` of
the subspace's own Δp, and says when no rank qualifies.

Plain tensors only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .statistics import RecordStats
from .subspace import feature_subspace

__all__ = [
    "PATTERNS",
    "MAX_RANDOM_SHARE",
    "position_patterns",
    "subset_stats",
    "pattern_bases",
    "guarded_causal_rank",
]

PATTERNS = ("positive-farther", "positive-nearer")
MAX_RANDOM_SHARE = 0.25


def position_patterns(
    query: Sequence[int], positives: Sequence[Sequence[int]], negatives: Sequence[Sequence[int]]
) -> list[str | None]:
    """Each record's pattern from its query position and key positions (see the module
    docstring)."""
    if not len(query) == len(positives) == len(negatives):
        raise ValueError("position_patterns: query, positives and negatives differ in length")
    out: list[str | None] = []
    for qp, pos, neg in zip(query, positives, negatives, strict=True):
        if not len(pos) or not len(neg):
            out.append(None)
            continue
        op = float(torch.tensor([qp - p for p in pos], dtype=torch.float64).median())
        on = float(torch.tensor([qp - p for p in neg], dtype=torch.float64).median())
        out.append(None if op == on else PATTERNS[0] if op > on else PATTERNS[1])
    return out


def subset_stats(stats: RecordStats, mask: torch.Tensor) -> RecordStats:
    """The records of ``stats`` selected by ``mask [n]`` (bool)."""
    m = torch.as_tensor(mask, dtype=torch.bool).reshape(-1)
    if m.numel() != stats.n:
        raise ValueError(f"mask must have n={stats.n} entries, got {m.numel()}")
    return RecordStats(stats.q[m], stats.k_pos[m], stats.k_neg[m], stats.has_pos[m],
                       stats.has_neg[m], stats.group[m], list(stats.groups))  # fmt: skip


def pattern_bases(
    stats: RecordStats, patterns: Sequence[str | None], rank: int, min_records: int = 8
) -> dict[str, torch.Tensor]:
    """Top-``rank`` key basis ``[D, rank]`` of ΔC over the build records of each pattern that
    holds at least ``min_records`` records with both sides (patterns with fewer are left
    out)."""
    if len(patterns) != stats.n:
        raise ValueError(f"{len(patterns)} patterns for {stats.n} records")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    out = {}
    both = stats.has_pos & stats.has_neg
    for name in PATTERNS:
        m = torch.tensor([p == name for p in patterns], dtype=torch.bool) & both
        if int(m.sum()) >= min_records:
            sub = subset_stats(stats, m)
            out[name] = feature_subspace(
                sub.delta(), rank=min(rank, stats.k_pos.shape[1])
            ).key_basis
    return out


def guarded_causal_rank(
    curve: Sequence[float],
    random: Sequence[float],
    fraction: float = 0.9,
    max_random_share: float = MAX_RANDOM_SHARE,
) -> dict[str, object]:
    """The causal rank among ranks whose random mean Δp is at most ``max_random_share`` of the
    subspace's Δp: the smallest such rank reaching ``fraction`` of the best of them.

    Returns ``{"rank", "unguarded", "max_random_share", "random_share", "guarded"}``:
    ``unguarded`` is :func:`qkcov.core.causal.causal_rank`'s rank on the whole curve,
    ``random_share`` the random / subspace ratio at the chosen rank, ``guarded`` whether the
    guard changed the rank; ``rank`` is 0 (with ``"reason"``) when no rank qualifies."""
    from .causal import causal_rank

    x, rnd = [float(c) for c in curve], [float(c) for c in random]
    if len(x) != len(rnd) or not x or any(math.isnan(v) for v in x + rnd):
        raise ValueError("curve and random must be non-empty lists of numbers of equal length")
    if not 0 < max_random_share < 1:
        raise ValueError(f"max_random_share must be in (0, 1), got {max_random_share}")
    unguarded = causal_rank(x, fraction)
    ok = [
        i
        for i, (c, r) in enumerate(zip(x, rnd, strict=True))
        if c > 0 and r <= max_random_share * c
    ]
    out: dict[str, object] = {"unguarded": unguarded, "max_random_share": max_random_share}
    if not ok:
        return out | {
            "rank": 0, "guarded": unguarded != 0, "random_share": None,
            "reason": f"at every rank random subspaces move attention by more than "
            f"{max_random_share:.0%} of the subspace's own Δp",
        }  # fmt: skip
    best = max(x[i] for i in ok)
    i = next(i for i in ok if x[i] >= fraction * best)
    return out | {"rank": i + 1, "guarded": i + 1 != unguarded, "random_share": rnd[i] / x[i]}
