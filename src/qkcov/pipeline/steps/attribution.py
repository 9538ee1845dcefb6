"""Step: exact attribution of held-out logits over the features' query subspaces, explained
fraction against random subspaces."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ...core.attribution import explain_logits
from ...core.subspace import random_orthonormal
from ...results import AttributionResult, FeatureResult
from ...runtime import sub_seed
from ..config import ATTRIBUTION_RANDOM, RunConfig


def _query_bases(features: Mapping[str, FeatureResult]) -> dict[str, torch.Tensor]:
    """Query-side basis per feature for the attribution: the pooled subspace, or the group
    union when the pooled rank is 0 (features without either are left out)."""
    return {
        name: f.pooled.query_basis if f.pooled.rank > 0 else f.union_query
        for name, f in features.items()
        if f.pooled.rank > 0 or (f.union_query is not None and f.union_query.shape[1] > 0)
    }


def _attribution(
    full: Mapping[str, Any],
    features: Mapping[str, FeatureResult],
    tokens: list[str],
    cfg: RunConfig,
) -> AttributionResult:
    qb = _query_bases(features)
    if not qb:
        reason = next(
            (
                f.pooled.significance.get("reason")
                for f in features.values()
                if f.pooled.significance and f.pooled.significance.get("reason")
            ),
            "every feature has rank 0",
        )
        return AttributionResult([], 0, math.nan, math.nan, {}, {}, math.nan, skipped=reason)
    if not len(full["keys"]):
        return AttributionResult(
            [], 0, math.nan, math.nan, {}, {}, math.nan, skipped="no held-out records"
        )
    order = list(qb)
    ex = explain_logits(full["q"], full["keys"], qb, priority=order, scaling=full["scaling"])
    D = full["q"].shape[1]
    fr, fc = [], []
    for d in range(min(cfg.n_random, ATTRIBUTION_RANDOM)):
        rb = {
            n: random_orthonormal(D, b.shape[1], seed=sub_seed(cfg.seed, f"attr-random:{n}", d))
            for n, b in qb.items()
        }
        rex = explain_logits(full["q"], full["keys"], rb, priority=order, scaling=full["scaling"])
        fr.append(rex["explained_fraction"])
        fc.append(rex["explained_fraction_centred"])
    rf, rc = torch.tensor(fr, dtype=torch.float64), torch.tensor(fc, dtype=torch.float64)
    a0 = ex["attributions"][0]
    return AttributionResult(
        names=ex["names"], n=len(full["keys"]), explained_fraction=ex["explained_fraction"],
        explained_fraction_centred=ex["explained_fraction_centred"],
        random={"mean": float(rf.mean()), "std": float(rf.std()), "centred_mean": float(rc.mean()), "centred_std": float(rc.std())},
        share=ex["share"], max_abs_error=ex["max_abs_error"], example_parts=a0.parts.double(),
        example_total=a0.total.double(), example_tokens=tokens,
    )  # fmt: skip
