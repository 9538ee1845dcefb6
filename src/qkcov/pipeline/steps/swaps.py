"""Step: key swaps of every condition against equal-rank random and label-permuted subspaces
and the full-key ceiling, with CIs and p-values; the causal plan (:mod:`.causal`) adds the
causal rank curve (guarded against ranks random subspaces reach), the label-sensitive centroid
patch and the pattern-split subspaces of the transfer; the relational test
(:mod:`qkcov.engine.relational`) runs on the same unedited forward."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ...core.subspace import feature_subspace
from ...results import FeatureResult, SwapCondition, SwapResult
from ...runtime import sub_seed
from ..config import CAUSAL_MAX, Head, RunConfig
from .causal import _Causal, _causal_plan, _conditioning_info


def _swap_conditions(
    features: Mapping[str, FeatureResult], energy: float
) -> dict[str, torch.Tensor]:
    """Key bases to swap in: each feature's pooled subspace (and, when the rank in force
    differs, its energy-rank subspace ``<feature>@energy``), its group union, all features."""
    bases: dict[str, torch.Tensor] = {}
    for name, f in features.items():
        if f.pooled.rank > 0:
            bases[name] = f.pooled.key_basis
            r_e = f.pooled.rank_energy
            if 0 < r_e != f.pooled.rank:
                bases[f"{name}@energy"] = feature_subspace(
                    f.pooled.delta, energy, rank=r_e
                ).key_basis
        if f.union_key is not None and f.union_key.shape[1] > 0:
            bases[f"{name}:groups"] = f.union_key
    if len(features) > 1:
        from ...core.subspace import union_basis

        parts = [f.pooled.key_basis for f in features.values() if f.pooled.rank > 0]
        if len(parts) > 1:
            bases["all"] = union_basis(parts)
    return bases


def _swaps(
    model: Any,
    tokenizer: Any,
    resolved: Sequence[Any],
    swap_base: Callable[[], Any],
    head: Head,
    features: Mapping[str, FeatureResult],
    cfg: RunConfig,
    progress: bool,
    skip_reason: str | None,
    stats: Mapping[str, Any] | None = None,
    cond: Mapping[str, Any] | str | None = None,
    kind: str | None = None,
    build_patterns: Sequence[str | None] | None = None,
) -> SwapResult:
    """Swaps of every condition against random and label-permuted subspaces, the causal rank
    curve (its causal-rank subspace becomes the headline) and the label-sensitive centroid
    patch on the headline, all from the unedited forward every head shares (``swap_base()``,
    :func:`qkcov.engine.swaps.capture_swap_base`; see :func:`_causal_plan`), then the relational
    test and the transfer across position patterns from the same forward (``kind``: the
    feature's declared kind; ``build_patterns``: each build record's position pattern in the
    record statistics' order, see :mod:`qkcov.core.transfer`)."""
    from ...engine.swaps import run_swaps

    headline_feature = next(iter(features))
    if skip_reason is None and not resolved:
        skip_reason = (
            "no held-out record holds both a positive and a negative key, so no swap pair exists"
        )
    bases = _swap_conditions(features, cfg.energy)
    # headline: the first feature's pooled subspace, or the union of its significant group
    # subspaces when the pooled contrast is not significant (a categorical feature can live
    # in per-value directions that pooling averages away)
    headline = next(
        (c for c in (headline_feature, f"{headline_feature}:groups") if c in bases), None
    )
    if skip_reason is None and headline is None:
        sig = features[headline_feature].pooled.significance or {}
        skip_reason = sig.get("reason") or f"feature {headline_feature!r} has rank 0"
    if skip_reason is not None:
        return SwapResult(0, None, {}, None, None, cfg.n_random, skipped=skip_reason,
                          label_test={"available": False, "reason": skip_reason,
                                      "conditioning": _conditioning_info(cond, list(features))})  # fmt: skip
    base = swap_base()
    pairs = base.pairs[head]
    D = next(iter(bases.values())).shape[0]
    causal = _causal_plan(
        features, bases, headline, stats or {}, cfg, D, f"L{head[0]}H{head[1]}",
        [r.record.group for r in resolved], cond, build_patterns,
    )  # fmt: skip
    sw = run_swaps(
        model, tokenizer, resolved, head[0], head[1], pairs, {k: v.float() for k, v in bases.items()},
        n_random=cfg.n_random, n_random_downstream=min(cfg.n_random_downstream, cfg.n_random),
        seed=cfg.seed, batch_size=cfg.batch_size, progress=progress,
        offline=causal.offline, late=causal.late, base=base,
    )  # fmt: skip
    per = sw.get("per_prompt", {})
    conditions = {
        name: SwapCondition(
            name,
            int(sw["ranks"][name]),
            dict(sw["conditions"][name]),
            sw["random"][name],
            per.get(name),
        )
        for name in sw["conditions"]
    }
    _swap_statistics(conditions, cfg)
    _permuted_baselines(conditions, sw["offline"], causal)
    ceiling = SwapCondition(
        "ceiling", int(model_head_dim(model)), dict(sw["ceiling"]), None, per.get("ceiling")
    )
    relation, transfer = _relation_and_transfer(
        base, head, resolved, sw, causal, (stats or {}).get(headline_feature), kind, cfg
    )
    return SwapResult(
        int(sw["n"]), causal.headline or headline, conditions, ceiling, dict(sw["null"]),
        cfg.n_random, causal_rank=causal.curve_result(sw["offline"], cfg),
        label_test=causal.label_result(sw["patches"], cfg), answers=sw.get("answers"),
        scored_token=_scored_token(resolved), n_permuted=causal.n_permuted,
        permuted_skipped=causal.skipped, relation_test=relation, transfer=transfer,
    )  # fmt: skip


def _relation_and_transfer(
    base: Any, head: Head, resolved: Sequence[Any], sw: Mapping[str, Any], causal: _Causal,
    st: Any, kind: str | None, cfg: RunConfig,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The relational test on the headline subspace (label-permuted subspaces as its reported
    baseline) and the transfer rows (:mod:`qkcov.engine.relational`)."""
    from ...engine.relational import (
        relation_inputs,
        relational_result,
        swap_patterns,
        transfer_result,
    )

    name = f"L{head[0]}H{head[1]}"
    if causal.label_stack is None:
        relation: dict[str, Any] = {"available": False, "reason": "no headline subspace"}
    else:
        relation = relational_result(
            relation_inputs(base.views[head], resolved), causal.label_stack, st,
            seed=sub_seed(cfg.seed, f"relation:{name}"), n_boot=max(cfg.n_bootstrap, 200),
        )  # fmt: skip
    relation["declared_kind"] = kind
    if causal.transfer_skipped:
        return relation, {"available": False, "reason": causal.transfer_skipped}
    pats = swap_patterns(base.pairs[head])
    held = [pats[i] for i in base.keep]
    fam = sw["offline"]
    per = {
        p[len("transfer:") :]: v["delta_p"][0] for p, v in fam.items() if p.startswith("transfer:")
    }
    head_dp = torch.tensor(sw["per_prompt"][causal.headline]["delta_p"], dtype=torch.float64)
    transfer = transfer_result(
        per, held, head_dp, fam["transfer-random"]["delta_p"], causal.transfer_rank
    )
    return relation, transfer


def _scored_token(resolved: Sequence[Any]) -> str:
    """Which token the swaps' log-prob shift scores (said in run.json and the report)."""
    n = sum(r.answer_id is not None for r in resolved)
    if n == len(resolved):
        return "answer: each record's answer token (shift = −Δ log p(answer))"
    first = "first token of each key span (shift = Δ[log p(target's) − log p(orig's)])"
    return first if n == 0 else f"answer where given ({n} of {len(resolved)} records), else {first}"


def _permuted_baselines(
    conditions: Mapping[str, SwapCondition], offline: Mapping[str, Any], plan: _Causal
) -> None:
    """Each condition's label-permuted baseline (mean ± std over the permutations) and the
    p of its Δp against it."""
    from ...core import statistics as st

    for name, c in conditions.items():
        fam = offline.get(plan.families.get(name, ""))
        if fam is None:
            continue
        c.permuted = {
            m: {"mean": float(v.mean(1).mean()), "std": float(v.mean(1).std()), "draws": v.mean(1).tolist()}
            for m, v in fam.items() if m in ("delta_p", "flip_items", "flip_all")
        }  # fmt: skip
        c.p_permuted = st.random_p_value(float(c.metrics["delta_p"]), fam["delta_p"].mean(1))


def _condition_basis(
    features: Mapping[str, FeatureResult], swaps: SwapResult, cfg: RunConfig, D: int
) -> torch.Tensor | None:
    """The key basis of the headline swap condition: one of :func:`_swap_conditions` or the
    causal-rank subspace ``<condition>@causal`` (the first r directions the curve ordered)."""
    name = swaps.headline or ""
    bases = _swap_conditions(features, cfg.energy)
    if name in bases or not name.endswith("@causal"):
        return bases.get(name)
    r = int((swaps.causal_rank or {}).get("rank") or 0)
    base, f0 = name[: -len("@causal")], next(iter(features))
    if not r:
        return None
    if base == f0:
        pooled = features[f0].pooled
        return feature_subspace(pooled.delta, cfg.energy, rank=min(D, CAUSAL_MAX)).key_basis[:, :r]
    union = features[f0].union_key
    return None if union is None else union[:, :r]


def _swap_statistics(conditions: Mapping[str, SwapCondition], cfg: RunConfig) -> None:
    """Paired bootstrap CIs over prompts and the p-value against the random subspaces."""
    try:
        from ...core import statistics as st
    except ImportError:  # statistics layer not available
        return
    for c in conditions.values():
        if c.random is not None and "delta_p" in c.random:
            draws = torch.tensor(c.random["delta_p"]["draws"], dtype=torch.float64)
            c.p_value = st.random_p_value(float(c.metrics["delta_p"]), draws)
        if c.per_prompt and cfg.n_bootstrap:
            c.ci = {
                m: list(
                    st.paired_bootstrap_ci(
                        torch.tensor(v, dtype=torch.float64),
                        n_boot=max(cfg.n_bootstrap, 200),
                        seed=sub_seed(cfg.seed, f"ci:{c.name}:{m}"),
                    )
                )
                for m, v in c.per_prompt.items()
            }


def model_head_dim(model: Any) -> int:
    from ...models.loading import model_info

    return model_info(model).head_dim


class SwapBase:
    """The swaps' unedited forward (:func:`qkcov.engine.swaps.capture_swap_base`), captured
    on first use (``base()``), once for all the heads still to do; :meth:`clear` drops its
    hidden states."""

    def __init__(
        self, model: Any, tokenizer: Any, records: Sequence[Any], heads: list[Head],
        cfg: RunConfig, specs: Mapping[int, Any], progress: bool, dist: Any,
    ) -> None:  # fmt: skip
        self.model, self.tokenizer, self.records, self.heads = model, tokenizer, records, heads
        self.cfg, self.specs, self.progress, self.dist = cfg, specs, progress, dist
        self._base: Any = None

    def __call__(self) -> Any:
        if self._base is None:
            from ...engine.swaps import capture_swap_base

            cfg = self.cfg
            self._base = capture_swap_base(
                self.model, self.tokenizer, self.records, self.heads,
                seed=sub_seed(cfg.seed, "pairs"), batch_size=cfg.batch_size,
                progress=self.progress, specs=self.specs if cfg.frame == "query" else None,
                dist=self.dist,
            )  # fmt: skip
        return self._base

    def clear(self) -> None:
        self._base = None
