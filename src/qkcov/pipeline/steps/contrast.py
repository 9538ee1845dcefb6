"""Step: ΔC per feature, group and head on the build records (one forward per record), the
subspaces under the rank rule and their significance (permutation null, bootstrap, max-T over
groups), from the kept per-record statistics."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...core.subspace import energy_ordered_union, feature_subspace, principal_angles
from ...results import POOLED, FeatureResult, HeadResult, SubspaceResult
from ...runtime import Timer, sub_seed
from ..config import Head, RunConfig
from ..plan import Plan
from ..state import RunState


@dataclass
class Contrasts:
    """What the ΔC pass gives the later steps.

    ``contrasts[feature]``: the feature's contrast (accumulators per head, groups);
    ``stats[feature]``: its kept per-record statistics per head (``None`` when the null and
    the bootstrap are off); ``cent_vecs[head]``: the centroid records' vectors in ``cent``
    order (``None`` when a pass resumed from a checkpoint: the collection pass forwards them).
    """

    contrasts: dict[str, Any]
    stats: dict[str, Any]
    cent_vecs: dict[Head, Any] | None


def _contrast_step(
    model: Any, tokenizer: Any, resolved: Sequence[Any], plan: Plan, heads: list[Head],
    cent: list[int], cfg: RunConfig, timer: Timer, state: RunState | None, dist: Any,
    captured: Any = None,
) -> Contrasts:  # fmt: skip
    """One forward per build record: every feature's ΔC (and record statistics), and the
    centroid records' vectors in ``cent`` order (see :class:`Contrasts`). ``captured``: the
    ``--heads auto`` pass (:class:`qkcov.engine.scan.ScanCapture`, one record list per
    feature in ``plan.features`` order) already holds every head's q/k: no forward here."""
    from ...engine.contrast import HeadVectors, run_contrast

    contrasts, stats, parts = {}, {}, []
    mine = set(cent)
    for fi, f in enumerate(plan.features):
        idx_f = plan.indices("build", f)
        contrasts[f] = run_contrast(
            model, tokenizer, [resolved[i] for i in idx_f], heads, batch_size=cfg.batch_size,
            progress=not timer.quiet, keep_records=cfg.n_permutations > 0 or cfg.n_bootstrap > 0,
            dist=dist, checkpoint=None if state is None else state.contrast(f),
            frame=cfg.frame, vectors_for=[j for j, i in enumerate(idx_f) if i in mine],
            captured=None if captured is None else captured.captures[fi],
        )  # fmt: skip
        stats[f] = contrasts[f].record_stats
        parts.append(([i for i in idx_f if i in mine], contrasts[f].vectors))
    if not cent or any(v is None for ids, v in parts if ids):
        return Contrasts(contrasts, stats, None)
    at = {i: j for j, i in enumerate(i for ids, _ in parts for i in ids)}
    cent_vecs = {
        h: HeadVectors.concat([v[h] for ids, v in parts if ids]).select(
            [at[i] for i in cent], renumber=False
        )
        for h in heads
    }
    return Contrasts(contrasts, stats, cent_vecs)


def _feature_info(plan: Plan, contrast: Contrasts) -> list[dict[str, Any]]:
    """``run.json``'s ``features``: each feature's groups and record counts."""
    return [
        {
            "name": f,
            "groups": contrast.contrasts[f].groups,
            "n_build": len(plan.indices("build", f)),
            "n_heldout": len(plan.indices("heldout", f)),
            "n_two_sided": len(plan.indices(None, f, True)),
        }
        for f in plan.features
    ]


def _subspace_results(
    contrast: Any, head: Head, feature: str, cfg: RunConfig, stats: Any = None
) -> FeatureResult:
    acc = contrast.accumulators[head]
    groups: dict[str, SubspaceResult] = {}
    names = [g for g in contrast.groups if all(acc.counts(g))] + [POOLED]
    for g in names:
        key = None if g == POOLED else g
        delta = acc.delta(key)
        sub = feature_subspace(delta, cfg.energy)
        n_pos, n_neg = acc.counts(key)
        sig = _significance(stats, key, delta, cfg) if stats is not None else None
        rank, rule = sub.rank, "energy"  # the energy rule stands in when the null is unavailable
        if cfg.rank_rule == "null" and sig is not None and sig["available"]:
            rank, rule = (int(sig["rank_null"]) if sig["significant"] else 0), "null"
        # the bases hold the rank in force; rank_energy is kept beside it
        in_force = sub if rank == sub.rank else feature_subspace(delta, cfg.energy, rank=rank)
        groups[g] = SubspaceResult(
            feature, g, rank, sub.rank, rule, in_force, delta, int(n_pos), int(n_neg), sig
        )
    per_group = [s for g, s in groups.items() if g != POOLED and s.rank > 0]
    union_k = union_q = None
    angles: list[dict[str, Any]] = []
    if len(per_group) > 1:
        trimmed = [
            dataclasses.replace(
                s.subspace, rank=s.rank, key_basis=s.key_basis, query_basis=s.query_basis
            )
            for s in per_group
        ]
        union_k = energy_ordered_union(trimmed, "key")
        union_q = energy_ordered_union(trimmed, "query")
        for i, a in enumerate(per_group):
            for b in per_group[i + 1 :]:
                ang = principal_angles(a.key_basis, b.key_basis)
                angles.append(
                    {"a": a.group, "b": b.group, "min_degrees": math.degrees(float(ang.min()))}
                )
    combined = _groups_max_t(groups)
    for sr in groups.values():
        if sr.significance:
            sr.significance.pop(NULL_TOP, None)
            sr.significance.pop(OBS_TOP, None)
    return FeatureResult(feature, groups, union_k, union_q, angles, combined)


NULL_TOP = "_null_top"
OBS_TOP = "_obs_top"  # the observed statistic matching NULL_TOP (raw top when absent)


def _groups_max_t(groups: Mapping[str, SubspaceResult]) -> float | None:
    """p of "some group's ΔC is above its null": a max-T permutation test over the groups.

    Groups hold disjoint records, so the j-th draws of the per-group nulls together are one
    permutation of the whole design; each group's top singular value is standardised by its
    null median, and the observed maximum is compared with the permuted maxima (exact at the
    permutations' resolution, unlike a Bonferroni bound, whose floor G/(P+1) can exceed α)."""
    obs, draws = [], []
    for g, sr in groups.items():
        sig = sr.significance or {}
        if g == POOLED or not sig.get("available") or NULL_TOP not in sig:
            continue
        null = sig[NULL_TOP].double()
        scale = float(null.median()) or 1.0
        obs.append(float(sig.get(OBS_TOP, sr.subspace.singular_values[0])) / scale)
        draws.append(null / scale)
    if not obs or len({d.numel() for d in draws}) != 1:
        return None
    t_null = torch.stack(draws).max(0).values
    return float((1 + (t_null >= max(obs)).sum()) / (1 + t_null.numel()))


def _significance(
    stats: Any, group: str | None, delta: torch.Tensor, cfg: RunConfig
) -> dict[str, Any]:
    """Permutation null (p-value, null rank, 5–95 % band) and record bootstrap (rank CI,
    stability) of one ΔC, from the kept per-record statistics (no recapture)."""
    import warnings

    from ...core import statistics as st

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st.StatisticsWarning)
        null = st.permutation_null(
            stats, cfg.n_permutations, seed=sub_seed(cfg.seed, f"null:{group}"), group=group
        )
        sig = st.significance(delta, null, alpha=cfg.alpha, energy=cfg.energy)
        null_top = null.singular_values[:, 0].clone() if null.available else None
        if sig.step_null is not None and len(sig.step_null):  # the rank test's first step
            null_top = sig.step_null[0].clone()
        rule = cfg.rank_rule if sig.available else "energy"
        boot = (
            st.bootstrap(stats, cfg.n_bootstrap, seed=sub_seed(cfg.seed, f"boot:{group}"), group=group,
                         rank_rule=rule, null=null if null.available else None, alpha=cfg.alpha, energy=cfg.energy,
                         sig=sig if null.available else None)
            if cfg.n_bootstrap
            else None
        )  # fmt: skip
    out = {
        "available": sig.available,
        "significant": sig.significant,
        "reason": sig.reason,
        "p_value": sig.p_value,
        "p_value_frobenius": sig.p_value_frobenius,
        "rank_null": sig.rank_null,
        "rank_energy": sig.rank_energy,
        "test": sig.test,
        "p_value_raw_top": sig.p_value_raw_top,
        "rank_parallel": sig.rank_parallel,
        "step_p_values": sig.step_p_values,
        "n_records": null.n_records,
        "n_distinct": null.n_distinct,
        "duplicates": None
        if null.n_distinct is None or null.n_distinct >= null.n_records
        else st.duplicates_note(null.n_records, null.n_distinct),
        "alpha": cfg.alpha,
        "n_permutations": cfg.n_permutations,
        # the band reaches well beyond the ranks, so the scree shows where the rank ends
        "null_band": None
        if sig.null_band is None
        else sig.null_band[
            :, : max(16, max(sig.rank_null or 0, sig.rank_energy or 0) + 16)
        ].tolist(),
        # the rank rule's own null for the scree: the whitened spectrum the sequential test
        # reads and its per-step deflated null (5 % / 95 % / 1 − α quantiles, [3, K])
        "whitened_singular_values": None
        if sig.whitened_singular_values is None
        else sig.whitened_singular_values[
            : max(16, max(sig.rank_null or 0, sig.rank_energy or 0) + 16)
        ].tolist(),
        "step_null_band": sig.to_dict()["step_null_band"],
        "rank_ci": None,
        "stability_deg": None,
        "singular_value_ci": None,
        "bootstrap": None
        if boot is None
        else {"available": boot.available, "reason": boot.reason, "n_boot": boot.n_boot},
    }
    if boot is not None and boot.available:
        out["rank_ci"] = list(boot.rank_ci) if boot.rank_ci is not None else None
        out["rank_ci_percentile"] = boot.rank_ci_percentile and list(boot.rank_ci_percentile)
        out["stability_deg"] = boot.stability_deg
        out["singular_value_ci"] = boot.singular_value_ci[:, :16].tolist()
    if null_top is not None:
        out[NULL_TOP] = null_top  # for the max-T test over groups; dropped before saving
        if sig.whitened_singular_values is not None and len(sig.step_null):
            out[OBS_TOP] = float(sig.whitened_singular_values[0])
    return out


def _zero_delta_notes(heads: Sequence[HeadResult]) -> list[str]:
    """One run note per head and feature whose pooled ΔC is numerically zero (no rank)."""
    return [
        f"{h.name} {f}: ΔC is numerically zero (the positive and negative keys give the same "
        "q–k covariance to rounding): no subspace, so no rank"
        for h in heads
        for f, fr in h.features.items()
        if fr.pooled.delta.numel() and not bool(fr.pooled.delta.any())
    ]


def _duplicate_notes(heads: Sequence[HeadResult]) -> list[str]:
    """One run note per feature and group whose build records hold exact duplicates."""
    notes: dict[str, None] = {}
    for h in heads:
        for f, feat in h.features.items():
            for g, sr in feat.groups.items():
                if sr.significance and sr.significance.get("duplicates"):
                    where = f"feature {f!r}, " if len(heads[0].features) > 1 else ""
                    notes[f"statistics: {where}{g}: {sr.significance['duplicates']}"] = None
    return list(notes)
