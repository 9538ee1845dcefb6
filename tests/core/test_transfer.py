"""Position patterns, pattern-split bases and the guarded causal rank on planted tensors."""

from __future__ import annotations

import pytest
import torch

from qkcov.core.intervention import swap_metrics_per_prompt, swapped_attention
from qkcov.core.statistics import RecordStats
from qkcov.core.transfer import (
    guarded_causal_rank,
    pattern_bases,
    position_patterns,
    subset_stats,
)

F64 = torch.float64
D = 16


def test_position_patterns():
    pats = position_patterns([10, 10, 10, 10], [[4], [8, 9], [5], []], [[8], [2], [5], [1]])
    assert pats == ["positive-farther", "positive-nearer", None, None]
    with pytest.raises(ValueError, match="length"):
        position_patterns([1], [[0]], [])


def test_subset_stats():
    g = torch.Generator().manual_seed(0)
    st = RecordStats(*(torch.randn(6, D, generator=g, dtype=F64) for _ in range(3)),
                     torch.ones(6), torch.ones(6), torch.tensor([0, 1] * 3), ["a", "b"])  # fmt: skip
    m = torch.tensor([True, False, True, True, False, False])
    sub = subset_stats(st, m)
    assert sub.n == 3 and sub.groups == ["a", "b"]
    torch.testing.assert_close(sub.delta(), st.q[m].T @ (st.k_pos[m] - st.k_neg[m]) / 3)


def _planted(seed: int, n: int, position_only: bool):
    """Two position patterns; the positive key carries a pattern-specific direction (where it
    sits: e1 when farther, e2 when nearer) and, unless ``position_only``, a shared feature
    direction e3 the query reads."""
    g = torch.Generator().manual_seed(seed)
    pats = ["positive-farther" if i % 2 == 0 else "positive-nearer" for i in range(n)]
    q = 0.3 * torch.randn(n, D, generator=g, dtype=F64)
    q[:, [1, 2]] += 2.0
    if not position_only:
        q[:, 3] += 2.0
    kp = 0.3 * torch.randn(n, D, generator=g, dtype=F64)
    kn = 0.3 * torch.randn(n, D, generator=g, dtype=F64)
    far = torch.tensor([p == "positive-farther" for p in pats])
    w = 3.0 if position_only else 1.0  # with the feature, position is the weaker part
    kp[:, 1] += torch.where(far, w, 0.0)
    kp[:, 2] += torch.where(far, 0.0, w)
    if not position_only:
        kp[:, 3] += 3.0
    return pats, q, kp, kn


def _transfer(position_only: bool) -> tuple[float, float]:
    pats, q, kp, kn = _planted(0, 200, position_only)
    build, held = slice(0, 120), slice(120, 200)
    ones = torch.ones(120, dtype=torch.bool)
    st = RecordStats(q[build], kp[build], kn[build], ones, ones, torch.zeros(120, dtype=torch.long))
    bases = pattern_bases(st, pats[build], rank=1)
    assert set(bases) == {"positive-farther", "positive-nearer"}
    keys = torch.stack([kp[held], kn[held]], 1)
    hp = pats[held]
    near = torch.tensor([p == "positive-nearer" for p in hp])
    orig, target = torch.zeros(80, dtype=torch.long), torch.ones(80, dtype=torch.long)
    attn = swapped_attention(q[held], keys, orig, target, [None, bases["positive-farther"],
                             bases["positive-nearer"]])  # fmt: skip
    dp = swap_metrics_per_prompt(attn[0], attn[1:], orig, target)["delta_p"]
    return float(dp[0, near].mean()), float(dp[1, near].mean())  # transfer, in-distribution


def test_pattern_bases_transfer_separates_feature_from_position():
    """Built on one pattern and swapped on the other: a shared feature transfers (the
    transfer Δp is most of the in-distribution one), a position-only positive does not."""
    t, i = _transfer(position_only=False)
    assert i > 0.5 and t > 0.7 * i
    t, i = _transfer(position_only=True)
    assert i > 0.5 and t < 0.2 * i


def test_pattern_bases_needs_records():
    g = torch.Generator().manual_seed(0)
    st = RecordStats(*(torch.randn(10, D, generator=g, dtype=F64) for _ in range(3)),
                     torch.ones(10), torch.ones(10), torch.zeros(10))  # fmt: skip
    pats = ["positive-farther"] * 9 + ["positive-nearer"]
    assert set(pattern_bases(st, pats, rank=2)) == {"positive-farther"}
    with pytest.raises(ValueError, match="rank"):
        pattern_bases(st, pats, rank=0)


def test_guarded_causal_rank():
    # the case: the curve keeps rising, random draws catch up at high ranks
    curve = [0.04, 0.05, 0.1, 0.3, 0.5, 0.6, 0.62]
    rnd = [0.01, 0.01, 0.02, 0.05, 0.15, 0.2, 0.25]
    g = guarded_causal_rank(curve, rnd, fraction=0.9)
    assert g["unguarded"] == 6
    assert g["rank"] == 4 and g["guarded"] and g["random_share"] == pytest.approx(0.05 / 0.3)
    ok = guarded_causal_rank([0.85, 0.9, 0.91], [0.01, 0.02, 0.03])
    assert ok["rank"] == ok["unguarded"] == 1 and not ok["guarded"]
    bad = guarded_causal_rank([0.1, 0.2], [0.05, 0.1])
    assert bad["rank"] == 0 and "every rank" in bad["reason"]
    with pytest.raises(ValueError, match="equal length"):
        guarded_causal_rank([0.1], [])
