"""Step: ONE forward over the held-out (and centroid) records collecting the vectors the
projections and the attribution read; the swap records' unedited forward (the swaps' shared
base) is that forward for them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...runtime import Timer
from ..config import Head, RunConfig


@dataclass
class Collected:
    """What the collection pass gives the projections and the attribution.

    ``vecs[head]``: the projections' vectors (centroid records first, in ``cent`` order, then
    the held-out records; empty without held-out records); ``full[head]``: the attribution
    records' q and full keys (empty without attribution records); ``tokens``: the first
    attribution record's tokens up to its query (the attribution's example)."""

    vecs: dict[Head, Any] = field(default_factory=dict)
    full: dict[Head, Any] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)


def _base_vectors(base: Any, swap_idx: list[int], coll: list[int], heads: list[Head]) -> dict:
    """What the swaps' base (:class:`qkcov.engine.swaps.SwapBase`) captured of the records of
    ``coll``, per head as :class:`qkcov.engine.contrast.KnownVectors` (positions in ``coll``;
    ``swap_idx``: the resolved index of each swap record, which ``View.rows`` index)."""
    from ...engine.contrast import KnownVectors

    at = {i: j for j, i in enumerate(coll)}
    out = {}
    for h in heads:
        vectors, scaling = {}, None
        for v in base.views[h]:
            scaling = v.scaling
            for j, row in enumerate(v.rows):
                if swap_idx[row] in at:
                    vectors[at[swap_idx[row]]] = (v.query[j], v.keys[j])
        if scaling is None:
            return {}
        out[h] = KnownVectors(vectors, scaling)
    return out


def _collect_step(
    model: Any, tokenizer: Any, resolved: Sequence[Any], heads: list[Head], cent: list[int],
    held: list[int], attr_idx: list[int], cent_vecs: dict[Head, Any] | None, cfg: RunConfig,
    timer: Timer, dist: Any, base: Any = None, swap_idx: list[int] | None = None,
) -> Collected:  # fmt: skip
    """ONE forward over the held-out records (and the centroid records when the ΔC pass did
    not keep them): the projections' vectors (centroid records first, in ``cent`` order,
    then ``held``) and the attribution's full keys (attribution records are held-out).
    ``base``: the swaps' unedited forward of the records ``swap_idx`` (every head of
    ``heads``), whose vectors are taken instead of forwarding those records again."""
    from ...engine.contrast import HeadVectors, collect_qk

    pre = [] if cent_vecs is not None else cent
    coll = pre + held + [i for i in attr_idx if i not in set(held)]
    tokens = (
        [
            tokenizer.decode([t])
            for t in resolved[attr_idx[0]].input_ids[: resolved[attr_idx[0]].query + 1]
        ]
        if attr_idx
        else []
    )
    if not coll:
        return Collected({}, {}, tokens)
    at = {i: j for j, i in enumerate(coll) if j >= len(pre)}
    known = _base_vectors(base, swap_idx or [], coll, heads) if base is not None else None
    vecs, full = collect_qk(
        model, tokenizer, [resolved[i] for i in coll], heads, batch_size=cfg.batch_size,
        progress=not timer.quiet, dist=dist, frame=cfg.frame,
        full_keys=[at[i] for i in attr_idx], known=known,
    )  # fmt: skip
    if not held:
        vecs = {}
    elif cent_vecs is not None:
        vecs = {h: HeadVectors.concat([cent_vecs[h], vecs[h]]) for h in heads}
    return Collected(vecs, full if attr_idx else {}, tokens)
