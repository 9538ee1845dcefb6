"""Position or feature? Offsets of a contrast's keys, rotary-band profiles of its subspaces
and the position-only control (task-agnostic; the math is in :mod:`qkcov.core.position`
and :mod:`qkcov.core.rotary`).

- :func:`offset_diagnostics`: per feature and group, the query–key offsets of positive and
  negative keys and a Mann–Whitney test; a warning names each feature whose sides differ.
- :func:`rotary_profiles`: the rotary-band profile of every subspace (query and key side).
- :func:`position_controls`: ΔC of a position-only relabelling beside the real one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..core.position import OFFSET_AUC, OFFSET_KS, OFFSET_P, offset_test, position_control
from ..core.rotary import RotarySpec, band_profile

__all__ = ["key_offsets", "offset_diagnostics", "rotary_profiles", "position_controls"]


def key_offsets(resolved: Sequence[Any]) -> tuple[list[int], list[int]]:
    """Query–key token offsets (``query − key``, ≥ 0) of every positive and negative key."""
    pos, neg = [], []
    for r in resolved:
        for k in r.keys:
            (pos if k.positive else neg).append(int(r.query) - int(k.pos))
    return pos, neg


def offset_diagnostics(
    by_feature: Mapping[str, Sequence[Any]],
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``({feature: {group | "pooled": offset_test}}, warnings)`` over the given records
    (each feature's build records)."""
    out: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for f, recs in by_feature.items():
        groups: dict[str, list[Any]] = {}
        for r in recs:
            groups.setdefault(r.record.group or "all", []).append(r)
        tests = {"pooled": offset_test(*key_offsets(recs))}
        if len(groups) > 1:
            tests |= {g: offset_test(*key_offsets(rs)) for g, rs in sorted(groups.items())}
        out[f] = tests
        flagged = [g for g, t in tests.items() if t["confounded"]]
        if flagged:
            t = tests[flagged[0]]
            where = "pooled" if flagged[0] == "pooled" else f"group {flagged[0]!r}"
            more = f" (also {', '.join(flagged[1:])})" if len(flagged) > 1 else ""
            warnings.append(
                f"position confound: feature {f!r} ({where}{more}) has its positive keys at "
                f"median offset {t['median_pos']:g} from the query and its negative keys at "
                f"{t['median_neg']:g} (Mann–Whitney p = {t['p_value']:.2g}, AUC = "
                f"{t['auc']:.2f}; Kolmogorov–Smirnov D = {t['ks']:.2f}, p = "
                f"{t['ks_p_value']:.2g}; flagged at p < {OFFSET_P} with |AUC − 0.5| ≥ "
                f"{OFFSET_AUC} or D ≥ {OFFSET_KS}); "
                "its subspace may carry where the key is as well as what it is — see the "
                "rotary-band profile and the position control, or use --frame query"
            )
    return out, warnings


def _profile(sub: Any, spec: RotarySpec) -> dict[str, Any]:
    r = sub.rank if sub.rank > 0 else sub.rank_energy
    s = sub.subspace
    if r < 1:
        return {"rank_used": 0}
    w = s.singular_values[:r].double() ** 2
    from ..core.subspace import feature_subspace

    if s.key_basis.shape[1] < r:  # bases hold the rank in force; recover the energy rank
        s = feature_subspace(sub.delta, 0.99, rank=r)
    return {
        "rank_used": int(r),
        "query": band_profile(s.query_basis[:, :r], spec, w),
        "key": band_profile(s.key_basis[:, :r], spec, w),
    }


def rotary_profiles(features: Mapping[str, Any], spec: RotarySpec) -> dict[str, Any]:
    """``{feature: {group: {"rank_used", "query": band_profile, "key": band_profile}}}``
    for every subspace of one head (rank in force, else the energy rank; weights s²)."""
    return {
        f: {g: _profile(sub, spec) for g, sub in feat.groups.items()}
        for f, feat in features.items()
    }


def position_controls(
    vectors: Any,
    resolved: Sequence[Any],
    features: Mapping[str, Any],
    feature_of: Sequence[str],
    *,
    n_draws: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Position-only control of each feature from build-record vectors of one head.

    ``vectors``: :class:`~qkcov.engine.contrast.HeadVectors` of ``resolved`` (same order),
    ``feature_of[i]`` record i's feature. Compared with each feature's pooled key subspace
    (rank in force, else the energy rank); with groups, each group's records against its
    own subspace under ``"groups"`` (a categorical feature lives in per-group directions
    that pooling can average away).
    """
    from ..core.subspace import feature_subspace

    def one(idx: list[int], sub: Any, salt: int) -> dict[str, Any]:
        if len(idx) < 4:
            return {"skipped": f"{len(idx)} build records with vectors (need 4)"}
        v = vectors.select(idx)
        pos = v.key_positive.bool()
        if not bool(pos.any()) or bool(pos.all()):
            return {"skipped": "the records hold one side only"}
        offsets = torch.tensor(
            [int(resolved[i].query) - int(k.pos) for i in idx for k in resolved[i].keys]
        )
        r = sub.rank if sub.rank > 0 else sub.rank_energy
        basis = feature_subspace(sub.delta, 0.99, rank=r).key_basis if r > 0 else None
        return position_control(
            v.q, v.keys, v.key_record, pos, offsets, real_key_basis=basis,
            n_draws=n_draws, seed=seed + salt,
        )  # fmt: skip

    out: dict[str, Any] = {}
    for f, feat in features.items():
        idx = [i for i, name in enumerate(feature_of) if name == f]
        out[f] = one(idx, feat.pooled, 0)
        groups = {
            g: one([i for i in idx if (resolved[i].record.group or "all") == g], sub, j + 1)
            for j, (g, sub) in enumerate(feat.groups.items())
            if g != "pooled"
        }
        if groups:
            out[f]["groups"] = groups
    return out
