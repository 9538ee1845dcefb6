"""The plan (no model): records grouped by feature, split into build / held-out records and
checked (:func:`plan_records`), and the records of each role of a run (:func:`record_subsets`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..runtime import sub_seed
from ..tasks.records import ContrastRecord
from .config import DEFAULT_FEATURE, RunConfig


@dataclass
class Plan:
    """Records grouped by feature and split, checked before any model is loaded.

    ``features``: feature names in first-seen order (the first is the headline feature and
    has attribution priority). ``split[i]`` is ``"build"`` or ``"heldout"`` for record i.
    """

    records: list[ContrastRecord]
    features: list[str]
    split: list[str]
    notes: list[str] = field(default_factory=list)
    controls: list[str] = field(default_factory=list)  # what the label nulls condition on
    kinds: dict[str, str | None] = field(default_factory=dict)  # feature -> declared kind

    def feature_of(self, i: int) -> str:
        return self.records[i].feature or DEFAULT_FEATURE

    def indices(
        self, split: str | None = None, feature: str | None = None, two_sided: bool | None = None
    ) -> list[int]:
        out = []
        for i, r in enumerate(self.records):
            if split is not None and self.split[i] != split:
                continue
            if feature is not None and self.feature_of(i) != feature:
                continue
            if two_sided is not None and (bool(r.positives) and bool(r.negatives)) != two_sided:
                continue
            out.append(i)
        return out


def _as_records(records: Sequence[ContrastRecord | Mapping[str, Any]]) -> list[ContrastRecord]:
    out = []
    for i, r in enumerate(records):
        if isinstance(r, ContrastRecord):
            out.append(r)
        elif isinstance(r, Mapping):
            try:
                out.append(ContrastRecord.from_dict(dict(r)))
            except ValueError as err:
                raise ValueError(f"records[{i}]: {err}") from None
        else:
            raise ValueError(
                f"records[{i}] must be a ContrastRecord or a dict, got {type(r).__name__}"
            )
    if not out:
        raise ValueError("no records given")
    return out


def plan_records(records: Sequence[ContrastRecord | Mapping[str, Any]], cfg: RunConfig) -> Plan:
    """Group, split and check records (``ValueError`` naming the problem; no model needed)."""
    recs = _as_records(records)
    from ..checks import check_pins
    from ..naming import check_record_names

    check_record_names(recs, DEFAULT_FEATURE)
    check_pins(recs)
    from ..checks import check_controls, check_key_attrs

    check_key_attrs(recs, DEFAULT_FEATURE)
    controls = check_controls(recs, cfg.control)
    features: list[str] = []
    for r in recs:
        f = r.feature or DEFAULT_FEATURE
        if f not in features:
            features.append(f)
    pinned = [r.meta.get("split") for r in recs]
    if not cfg.step_list():  # ΔC only: every record builds it
        split = ["build"] * len(recs)
    elif all(s in ("build", "heldout") for s in pinned):
        split = [str(s) for s in pinned]
    else:
        split = ["build"] * len(recs)
        gen = torch.Generator().manual_seed(sub_seed(cfg.seed, "split"))
        for f in features:
            idx = [i for i, r in enumerate(recs) if (r.feature or DEFAULT_FEATURE) == f]
            n_held = min(len(idx) - 1, max(1, round(cfg.holdout * len(idx)))) if len(idx) > 1 else 0
            for j in torch.randperm(len(idx), generator=gen)[:n_held].tolist():
                split[idx[j]] = "heldout"
    from ..tasks.records import feature_kinds

    kinds = {k or DEFAULT_FEATURE: v for k, v in feature_kinds(recs).items()}
    plan = Plan(recs, features, split, controls=controls, kinds=kinds)
    for f in features:
        build = plan.indices("build", f)
        n_pos = sum(1 for i in build if recs[i].positives)
        n_neg = sum(1 for i in build if recs[i].negatives)
        if not build or not n_pos or not n_neg:
            where = "" if f == DEFAULT_FEATURE else f" of feature {f!r}"
            side = "positive" if not n_pos else "negative"
            raise ValueError(
                f"the build records{where} have no {side} key: ΔC = E[q k+ᵀ] − E[q k−ᵀ] needs "
                f"both sides ({len(build)} build records, {n_pos} with positives, {n_neg} with negatives)"
            )
    if cfg.heads.strip().lower().startswith("auto") and not plan.indices("build", two_sided=True):
        raise ValueError(
            "--heads auto scans heads on records holding both a positive and a negative key, "
            "and no build record does; name the heads instead (e.g. --heads L3H1,L5H0)"
        )
    if "swaps" in cfg.step_list() and not plan.indices("heldout", two_sided=True):
        plan.notes.append(
            "swaps skipped: no held-out record holds both a positive and a negative key, so no "
            "swap pair exists"
        )
    return plan


def _subset(idx: list[int], k: int, seed: int, purpose: str) -> list[int]:
    """``k`` of ``idx`` drawn at random (seeded per purpose), in record order; all when k = 0."""
    if k == 0 or k >= len(idx):
        return idx
    gen = torch.Generator().manual_seed(sub_seed(seed, purpose))
    return [idx[i] for i in sorted(torch.randperm(len(idx), generator=gen)[:k].tolist())]


def record_subsets(plan: Plan, cfg: RunConfig) -> dict[str, list[int]]:
    """Record indices of each role of a run (the one definition the pipeline and the
    benchmarks use): ``build``/``heldout`` (the split), ``scan`` (build records for the head
    scan, auto heads), ``swaps`` (two-sided held-out records), ``centroid`` (build records
    the figures' centroids are fitted on, with projections), ``attribution``, ``projections``
    (held-out records projected)."""
    steps = cfg.step_list()
    held = plan.indices("heldout")
    proj = held if "projections" in steps else []
    return {
        "build": plan.indices("build"),
        "heldout": held,
        "scan": _subset(plan.indices("build", two_sided=True), cfg.n_scan, cfg.seed, "scan-subset"),
        "swaps": _subset(plan.indices("heldout", two_sided=True), cfg.n_swap, cfg.seed, "swap-subset")
        if "swaps" in steps
        else [],
        "projections": proj,
        "centroid": _subset(plan.indices("build"), cfg.n_centroid, cfg.seed, "centroid-subset")
        if proj
        else [],
        "attribution": _subset(held, cfg.n_attribution, cfg.seed, "attribution-subset")
        if "attribution" in steps
        else [],
    }  # fmt: skip
