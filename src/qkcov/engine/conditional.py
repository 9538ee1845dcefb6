"""Conditional label nulls of one head from its build records' vectors (task-agnostic; the
math is in :mod:`qkcov.core.conditional`).

:func:`conditional_families` turns a head's :class:`~qkcov.engine.contrast.HeadVectors` of the
centroid (build) records, their resolved records and the run's controls (``offset`` and key
attributes) into, per feature, the real and stratified-permuted key labellings and what the
label-sensitive tests need from them: ΔC pooled and per group and the class centroids per
group, row 0 the real labels and rows 1..P the permutations (the same estimator on both, so
the null carries the same selection as the real test), plus how far the controls fix the
labels (:func:`qkcov.core.conditional.confounding`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.conditional import (
    confounding,
    key_class_means,
    key_deltas,
    offset_strata,
    strata_ids,
    stratified_labels,
)

__all__ = ["ConditionalFamily", "key_columns", "conditional_families"]


@dataclass
class ConditionalFamily:
    """One feature's conditional null on one head.

    ``deltas [1+P, D, D]``: ΔC of the centroid records under the real labels (row 0) and each
    within-strata permutation; ``group_deltas {group: [1+P, D, D]}`` the same per group (groups
    holding both labels in every row); ``means {group | None: (mu_pos [1+P, D], mu_neg [1+P, D])}``
    the class centroids (``None`` = pooled); ``confounding`` the controls' mixed fractions;
    ``n_records`` / ``n_keys`` what they were estimated from.
    """

    deltas: torch.Tensor
    group_deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    means: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    confounding: dict[str, Any] = field(default_factory=dict)
    n_records: int = 0
    n_keys: int = 0


def key_columns(resolved: Sequence[Any], controls: Sequence[str]) -> dict[str, list[Any]]:
    """Per control, one value per key of ``resolved`` (keys in record order, positives then
    negatives as the vectors hold them): ``offset`` = query − key position, any other name
    the key span's attribute."""
    cols: dict[str, list[Any]] = {}
    for c in controls:
        vals: list[Any] = []
        for r in resolved:
            spans = (*r.record.positives, *r.record.negatives)
            if c == "offset":
                vals += [int(r.query) - int(k.pos) for k in r.keys]
            else:
                vals += [s.attributes.get(c) for s in spans]
        cols[c] = vals
    return cols


def conditional_families(
    vectors: Any,
    resolved: Sequence[Any],
    feature_of: Sequence[str],
    controls: Sequence[str],
    n: int,
    seed: int,
) -> dict[str, ConditionalFamily | str]:
    """Per feature, its :class:`ConditionalFamily` or the reason there is none.

    ``vectors``: the head's HeadVectors of ``resolved`` (same order); ``feature_of[i]``
    record i's feature; ``controls`` e.g. ``["offset", "role"]``; ``n`` permutations.
    Strata are the controls' values (offsets exact, or quantile bins when sparse) within the
    record's group, so per-group centroids stay per group.
    """
    out: dict[str, ConditionalFamily | str] = {}
    for fi, f in enumerate(dict.fromkeys(feature_of)):
        idx = [i for i, name in enumerate(feature_of) if name == f]
        if len(idx) < 4:
            out[f] = f"{len(idx)} build records with vectors (need 4)"
            continue
        v = vectors.select(idx)
        recs = [resolved[i] for i in idx]
        lab = v.key_positive.bool()
        if not bool(lab.any()) or bool(lab.all()):
            out[f] = "the build records with vectors hold one side only"
            continue
        groups = [r.record.group or "" for r in recs]
        key_group = [groups[int(j)] for j in v.key_record]
        cols = key_columns(recs, controls)
        if "offset" in cols:
            cols["offset"] = offset_strata(cols["offset"]).tolist()
        conf = confounding(cols, lab, base=key_group)
        strata = strata_ids(*cols.values(), key_group)
        labels = torch.cat([lab[None], stratified_labels(strata, lab, n, seed=seed + 7919 * fi)])
        fam = ConditionalFamily(
            key_deltas(v.q, v.keys, v.key_record, labels),
            confounding=conf,
            n_records=len(idx),
            n_keys=int(lab.numel()),
        )
        gid = {g: j for j, g in enumerate(sorted(set(groups)))}
        rec_group = torch.tensor([gid[g] for g in groups])
        fam.means[None] = key_class_means(v.keys, v.key_record, labels)
        for g in sorted(set(groups)):
            if len(set(groups)) < 2:
                break
            mask = rec_group == gid[g]
            kmask = mask[v.key_record]
            if not all(bool(row[kmask].any()) and not bool(row[kmask].all()) for row in labels):
                continue
            sub = v.select([j for j, m in enumerate(mask.tolist()) if m])
            fam.group_deltas[g] = key_deltas(sub.q, sub.keys, sub.key_record, labels[:, kmask])
            # a labelling may leave a side of the group without records: pooled centroids then
            with contextlib.suppress(ValueError):
                fam.means[g] = key_class_means(v.keys, v.key_record, labels, mask)
        out[f] = fam
    return out
