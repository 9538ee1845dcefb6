"""The swaps' causal plan: label-permuted subspaces of every condition, the causal rank curve
Δp(1..R) and, once the curve is known, the causal-rank condition and the centroid patch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...core.subspace import (
    energy_ordered_union,
    feature_subspace,
    feature_subspaces,
    random_orthonormal,
)
from ...results import POOLED, FeatureResult
from ...runtime import sub_seed
from ..config import CAUSAL_FRACTION, CAUSAL_MAX, CURVE_RANDOM, RunConfig
from ..plan import Plan


@dataclass
class _Causal:
    """What :func:`_causal_plan` asks the swap engine for, and how to read it back."""

    headline_feature: str
    headline: str | None = None  # set by the late step: the causal-rank condition
    offline: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    families: dict[str, str] = field(default_factory=dict)  # condition -> permuted family
    n_permuted: int = 0
    skipped: str | None = None
    R: int = 0
    note: str = ""
    curve_source: torch.Tensor | None = None  # [D, R] ordered real basis of the curve
    perm_source: list[torch.Tensor] = field(default_factory=list)  # [D, >=R] per permutation
    means: tuple[torch.Tensor, torch.Tensor] | None = None  # [1+P, D] real + permuted centroids
    label_condition: str | None = None
    rank: int = 0
    late: Any = None
    conditioning: dict[str, Any] = field(default_factory=dict)  # what the label nulls condition on
    guard: dict[str, Any] | None = None  # the guarded causal rank (core.transfer)
    label_stack: torch.Tensor | None = None  # [1+P, D, r] headline + label-permuted bases
    transfer_skipped: str | None = "no position patterns"
    transfer_rank: int = 0

    def curve_result(self, offline: Mapping[str, Any], cfg: RunConfig) -> dict[str, Any] | None:
        if not self.R:
            return None

        curve = []
        for r in range(1, self.R + 1):
            dp = offline[f"curve:{r}"]["delta_p"][0]
            rnd = offline[f"curve-random:{r}"]["delta_p"].mean(1)
            prm = offline.get(f"curve-permuted:{r}", {}).get("delta_p")
            ci = _quiet_ci(dp, cfg, f"curve-ci:{r}")
            curve.append({
                "r": r, "delta_p": float(dp.mean()), "ci": _finite(ci),
                "random_mean": float(rnd.mean()), "random_std": float(rnd.std()),
                "permuted_mean": None if prm is None else float(prm.mean(1).mean()),
                "permuted_std": None if prm is None else float(prm.mean(1).std()),
            })  # fmt: skip
        return {
            "feature": self.headline_feature, "rank": self.rank, "R": self.R,
            "fraction": CAUSAL_FRACTION, "condition": self.headline, "note": self.note,
            "guard": self.guard, "curve": curve,
        }  # fmt: skip

    def label_result(self, patches: Mapping[str, Any], cfg: RunConfig) -> dict[str, Any] | None:
        from ...core.conditional import p_floor

        if "label" not in patches:
            return {"available": False, "reason": self.skipped or "label-sensitive test off",
                    "conditioning": self.conditioning}  # fmt: skip
        from ...core import statistics as st

        eff = patches["label"]["effect"]  # [1+P, n]
        dp = patches["label"]["delta_p"]
        real, perm = eff[0], eff[1:].mean(1)
        ci = _quiet_ci(real, cfg, "label-ci")
        return {
            "available": True, "reason": "", "condition": self.label_condition,
            "effect": float(real.mean()), "ci": _finite(ci), "delta_p": float(dp[0].mean()),
            "permuted": {"mean": float(perm.mean()), "std": float(perm.std()), "draws": perm.tolist()},
            "p_value": st.random_p_value(float(real.mean()), perm), "n_permuted": int(perm.numel()),
            "p_floor": p_floor(int(perm.numel())), "conditioning": self.conditioning,
        }  # fmt: skip


def _finite(values: Sequence[float]) -> list[float | None]:
    """NaN (too few prompts for a CI) as None, as ``run.json`` stores it."""
    return [None if math.isnan(float(x)) else float(x) for x in values]


def _quiet_ci(values: torch.Tensor, cfg: RunConfig, purpose: str) -> tuple[float, float]:
    """Paired-bootstrap CI over prompts ((nan, nan) with fewer than 10, without a warning)."""
    import warnings

    from ...core import statistics as st

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st.StatisticsWarning)
        return st.paired_bootstrap_ci(
            values, n_boot=max(cfg.n_bootstrap, 200), seed=sub_seed(cfg.seed, purpose)
        )


def _conditional(
    vecs: Any, resolved: Sequence[Any], cent: list[int], plan: Plan, cfg: RunConfig, name: str
) -> dict[str, Any] | str:
    """Each feature's conditional null family on one head (:mod:`qkcov.engine.conditional`)
    from the centroid (build) records' vectors, or why the label nulls run unconditioned."""
    if not plan.controls:
        return "unconditioned (--control none)"
    if not cfg.n_permuted:
        return "label-permuted baselines off (--n-permuted 0)"
    if vecs is None or not cent:
        return (
            "unconditioned: the conditional nulls need the build records' key vectors, which "
            "the projections step collects (--steps with projections and held-out records)"
        )
    from ...engine.conditional import conditional_families

    return conditional_families(
        vecs.select(list(range(len(cent)))), [resolved[i] for i in cent],
        [plan.feature_of(i) for i in cent], plan.controls, cfg.n_permuted,
        sub_seed(cfg.seed, f"conditional:{name}"),
    )  # fmt: skip


def _conditioning_info(
    cond: Mapping[str, Any] | str | None, features: Sequence[str]
) -> dict[str, Any]:
    """What the label nulls were conditioned on (the headline feature's confounding, from
    :func:`qkcov.core.conditional.confounding`, and what it was estimated from) when every
    feature has its conditional family, else the note saying why they ran unconditioned."""
    from ...engine.conditional import ConditionalFamily

    fams = cond if isinstance(cond, Mapping) else {}
    if features and all(isinstance(fams.get(f), ConditionalFamily) for f in features):
        fam = fams[features[0]]
        return {**fam.confounding, "n_records": fam.n_records, "n_keys": fam.n_keys, "note": ""}
    if isinstance(cond, Mapping):
        why = next((f"unconditioned: feature {f!r}: {v}" for f, v in cond.items()
                    if isinstance(v, str)), "unconditioned")  # fmt: skip
    else:
        why = cond or "unconditioned"
    return {"conditioned_on": [], "note": why}


def _causal_plan(
    features: Mapping[str, FeatureResult],
    bases: Mapping[str, torch.Tensor],
    headline: str,
    stats: Mapping[str, Any],
    cfg: RunConfig,
    D: int,
    head_name: str,
    record_groups: Sequence[str | None] = (),
    cond: Mapping[str, Any] | str | None = None,
    build_patterns: Sequence[str | None] | None = None,
) -> _Causal:
    """Offline families for the swap engine: label-permuted subspaces of every condition
    (``permuted:<condition>``, the null's relabellings of the build records, from the kept
    record statistics), the causal rank curve (``curve:<r>``, ``curve-random:<r>``,
    ``curve-permuted:<r>``, r = 1..R) and, once the curve is known (``late``), the
    causal-rank condition and the centroid patch on the headline subspace."""
    from ...core.causal import causal_rank, class_key_means, relabel_signs, relabelled_deltas
    from ...core.subspace import union_basis
    from ...core.transfer import guarded_causal_rank, pattern_bases

    f0 = next(iter(features))
    plan = _Causal(f0, headline)
    P = cfg.n_permuted
    perm_key: dict[str, list[torch.Tensor]] = {}  # feature -> full key bases per permutation
    perm_groups: dict[str, list[torch.Tensor]] = {}  # feature -> energy-ordered group unions
    signs0 = None
    from ...engine.conditional import ConditionalFamily

    fams = cond if isinstance(cond, Mapping) else {}
    real_key: dict[
        str, torch.Tensor
    ] = {}  # conditional: the real labels through the same estimator
    real_groups: dict[str, torch.Tensor] = {}
    conditioned = (
        bool(P) and bool(fams) and all(isinstance(fams.get(f), ConditionalFamily) for f in features)
    )
    if conditioned:
        for f, feat in features.items():
            fam = fams[f]
            vk = torch.linalg.svd(fam.deltas).Vh.transpose(1, 2)  # [1+P, D, D]
            real_key[f], perm_key[f] = vk[0], list(vk[1:])
            groups = [g for g, sr in feat.groups.items() if g != POOLED and sr.rank > 0]
            if (f"{f}:groups" in bases and groups
                    and all(g in fam.group_deltas for g in groups)):  # fmt: skip
                per_group = [feature_subspaces(fam.group_deltas[g][: P + 1],
                                               cfg.energy, rank=feat.groups[g].rank)
                             for g in groups]  # fmt: skip
                unions = [energy_ordered_union([sub[j] for sub in per_group]) for j in range(P + 1)]
                real_groups[f], perm_groups[f] = unions[0], unions[1:]
            elif f"{f}:groups" in bases and groups:
                missing = [g for g in groups if g not in fam.group_deltas]
                plan.skipped = (
                    f"no conditional label null for {f}:groups: group(s) "
                    f"{', '.join(map(repr, missing))} hold one label among the centroid records "
                    "(raise --n-centroid, 0 = all build records)"
                )
        plan.n_permuted = P
    plan.conditioning = _conditioning_info(
        cond if P else "label-permuted baselines off (--n-permuted 0)", list(features)
    )
    if not conditioned and P and all(stats.get(f) is not None for f in features):
        for f, feat in features.items():
            st_f = stats[f]
            signs = relabel_signs(st_f, P, seed=sub_seed(cfg.seed, f"permuted:{head_name}:{f}"))
            if f == f0:
                signs0 = signs
            deltas = relabelled_deltas(st_f, signs)
            perm_key[f] = list(torch.linalg.svd(deltas).Vh.transpose(1, 2))
            groups = [g for g, sr in feat.groups.items() if g != POOLED and sr.rank > 0]
            if f"{f}:groups" in bases and groups:
                group_deltas = {g: relabelled_deltas(st_f, signs, g) for g in groups}
                per_group = [feature_subspaces(dg[:P], cfg.energy, rank=feat.groups[g].rank)
                             for g, dg in group_deltas.items()]  # fmt: skip
                perm_groups[f] = [energy_ordered_union([sub[j] for sub in per_group])
                                  for j in range(P)]  # fmt: skip
        plan.n_permuted = P
    elif not conditioned:
        plan.skipped = (
            "label-permuted baselines off (--n-permuted 0)"
            if not P
            else "label-permuted baselines need the record statistics (--n-permutations or "
            "--n-bootstrap > 0)"
        )

    def permuted_bases(name: str, r: int) -> list[torch.Tensor] | None:
        if not perm_key:
            return None
        base = name.split("@")[0]
        if name == "all":
            return [
                union_basis([perm_key[f][j][:, : features[f].pooled.rank]
                             for f in features if features[f].pooled.rank > 0])[:, :r]
                for j in range(P)
            ]  # fmt: skip
        if base.endswith(":groups"):
            src = perm_groups.get(base[: -len(":groups")])
            return None if src is None else [u[:, :r] for u in src]
        return [v[:, :r] for v in perm_key[base]]

    def real_bases(name: str, r: int) -> torch.Tensor | None:
        """Conditional nulls: the real labels' basis of ``name`` through the nulls' estimator."""
        base = name.split("@")[0]
        if name == "all":
            return union_basis([real_key[f][:, : features[f].pooled.rank]
                                for f in features if features[f].pooled.rank > 0])[:, :r]  # fmt: skip
        if base.endswith(":groups"):
            src = real_groups.get(base[: -len(":groups")])
            return None if src is None else src[:, :r]
        return real_key[base][:, :r] if base in real_key else None

    for name, b in bases.items():
        pb = permuted_bases(name, int(b.shape[1]))
        if pb:
            plan.offline[f"permuted:{name}"] = pb
            plan.families[name] = f"permuted:{name}"
    # the causal rank curve over the headline's ordered directions
    pooled = features[f0].pooled
    if headline == f0:
        source = feature_subspace(pooled.delta, cfg.energy, rank=min(D, CAUSAL_MAX)).key_basis
        perm_src = perm_key.get(f0, [])
    else:
        source = features[f0].union_key
        perm_src = perm_groups.get(f0, [])
    if cfg.causal_max_rank:
        want = max(cfg.causal_max_rank, int(bases[headline].shape[1]))
        R = min(want, CAUSAL_MAX, source.shape[1])
        notes = []
        if want > CAUSAL_MAX:
            notes.append(f"R capped at {CAUSAL_MAX} (the rank in force is {want})")
        if min(want, CAUSAL_MAX) > R:
            notes.append(
                f"R clamped to {R}, the "
                + ("head dimension" if headline == f0 else "width of the group union")
            )
        plan.R, plan.note = R, "; ".join(notes)
        plan.curve_source = source[:, :R]
        # the first r columns of a Haar-random rank-R basis are a Haar-random rank-r basis
        rand = [
            random_orthonormal(D, R, seed=sub_seed(cfg.seed, "curve-random", d))
            for d in range(min(cfg.n_random, CURVE_RANDOM))
        ]
        for r in range(1, R + 1):
            plan.offline[f"curve:{r}"] = [source[:, :r]]
            plan.offline[f"curve-random:{r}"] = [u[:, :r] for u in rand]
            if perm_src:
                plan.offline[f"curve-permuted:{r}"] = [
                    u[:, :r] for u in perm_src if u.shape[1] >= r
                ]
    if conditioned and record_groups:
        # the same estimator's centroids: each held-out record's group where the family has
        # both sides in it, else pooled; row 0 the real labels, rows 1.. the permutations
        fm = fams[f0].means
        per = [fm.get(g, fm[None]) if g is not None else fm[None] for g in record_groups]
        plan.means = (torch.stack([m[0] for m in per], 1), torch.stack([m[1] for m in per], 1))
    elif signs0 is not None and record_groups:
        # centroids of each held-out record's group (the query's feature value in categorical
        # designs, where pooled means would average the matching values away); pooled for
        # records without a group that has both sides among the build records
        st0 = stats[f0]
        signs = torch.cat([torch.ones(1, st0.n, dtype=torch.float64), signs0])

        def means(group: str | None) -> tuple[torch.Tensor, torch.Tensor]:
            return class_key_means(st0, signs, group)

        cache = {None: means(None)}
        for g in set(record_groups):
            if g is not None and g in st0.groups and all(st0.counts(g)):
                cache[g] = means(g)
        per = [cache.get(g, cache[None]) for g in record_groups]
        plan.means = (torch.stack([m[0] for m in per], 1), torch.stack([m[1] for m in per], 1))

    def late(out: Mapping[str, Any]) -> dict[str, Any]:
        chosen, extra, extra_offline = headline, {}, {}
        if plan.R:
            curve = [
                float(out["offline"][f"curve:{r}"]["delta_p"].mean()) for r in range(1, plan.R + 1)
            ]
            rnd = [
                float(out["offline"][f"curve-random:{r}"]["delta_p"].mean())
                for r in range(1, plan.R + 1)
            ]
            # never settle where random subspaces move more than MAX_RANDOM_SHARE of the
            # effect; when no rank qualifies keep the plain rule's rank and say so
            plan.guard = guarded_causal_rank(curve, rnd, CAUSAL_FRACTION)
            plan.rank = int(plan.guard["rank"]) or causal_rank(curve, CAUSAL_FRACTION)
            if plan.rank:
                same = [n for n in (headline, f"{f0}@energy") if n in bases
                        and int(bases[n].shape[1]) == plan.rank
                        and torch.allclose(bases[n].double(), source[:, : plan.rank].double())]  # fmt: skip
                if same:
                    chosen = same[0]
                else:
                    chosen = f"{headline}@causal"
                    extra[chosen] = source[:, : plan.rank].float()
                    pb = permuted_bases(headline, plan.rank)
                    if pb:
                        plan.families[chosen] = f"permuted:{chosen}"
                        extra_offline[f"permuted:{chosen}"] = pb
        plan.headline = chosen
        basis = (extra.get(chosen) if chosen in extra else bases[chosen]).double()
        more: dict[str, Any] = {"bases": extra, "offline": extra_offline, "patches": {}}
        # the centroid patch: real labels in the real subspace, each permutation's labels in
        # its own subspace (the same estimator on relabelled records)
        pbl = permuted_bases(chosen, int(basis.shape[1]))
        # the relational exchange reads the headline subspace and the label-permuted ones
        plan.label_stack = torch.stack([basis, *[b.double() for b in pbl or []]])
        row0 = real_bases(chosen, int(basis.shape[1])) if conditioned else basis
        if plan.means is not None and pbl and row0 is not None:
            plan.label_condition = chosen
            stack = torch.stack([row0.double(), *[b.double() for b in pbl]])
            more["patches"]["label"] = (stack, *plan.means)
        # transfer: the headline's rank built on each position pattern's build records
        st0 = stats.get(f0)
        r = int(basis.shape[1])
        if st0 is None:
            plan.transfer_skipped = (
                "needs the record statistics (--n-permutations or --n-bootstrap > 0)"
            )
        elif build_patterns is None or len(build_patterns) != st0.n:
            plan.transfer_skipped = "no position pattern per build record"
        else:
            pb = pattern_bases(st0, build_patterns, r)
            if len(pb) < 2:
                plan.transfer_skipped = (
                    "the build records hold one position pattern only (the positives always "
                    "farther from the query than the negatives, or always nearer): nothing to "
                    "build the other pattern's subspace on"
                )
            else:
                plan.transfer_skipped, plan.transfer_rank = None, r
                more["offline"].update(
                    {f"transfer:{p}": [b.float().double()] for p, b in pb.items()}
                )
                more["offline"]["transfer-random"] = [
                    random_orthonormal(D, r, seed=sub_seed(cfg.seed, "transfer-random", d))
                    for d in range(CURVE_RANDOM)
                ]
        return more

    plan.late = late
    return plan
