"""Relational features: a label-sensitive causal test when the positive key's content differs
per record (token match, induction, lexical binding, name identity).

The centroid patch (:func:`qkcov.core.causal.centroid_patch`) asks whether a *record-independent*
key coordinate marks the positives (a class feature). A head that attends to the key that
*matches its query* — the token after the query's earlier occurrence, the name not repeated —
has no such coordinate: the positive key's subspace coordinates differ per record, and only
their agreement with *this* record's query marks them. This module tests that agreement.

**Cross-record exchange** (:func:`relation_patch`). For held-out record ``i`` with query
``q_i``, positive key ``k⁺_i`` and negative key ``k⁻_i``, and a partner record ``j``, inside a
key subspace ``V`` (coordinates ``c = Vᵀk``):

- *positive exchange*, labelled: the negative key gets the record's own positive coordinates
  ``c⁺_i`` and the positive key the partner's ``c⁺_j``; mirrored: the positive keeps ``c⁺_i``
  and the negative gets ``c⁺_j``. Both put the two keys on the same two points, so only *whose*
  positive coordinates sit on which key differs; ``effect⁺ = p(labelled) − p(mirrored)`` with
  ``p = a⁻/(a⁺ + a⁻)``. It is > 0 when the query prefers its own positive's coordinates to
  another record's, i.e. when ``q_iᵀV(c⁺_i − c⁺_j) > 0``.
- *negative exchange*: the same with ``c⁻_i`` and ``c⁻_j`` (``effect⁻``).

The per-record **relational effect** is ``effect⁺ − effect⁻``: how much more the query prefers
its own positive over a foreign positive than its own negative over a foreign negative. A class
feature gives ≈ 0 (own and foreign positives share the class coordinate, and so do the
negatives); context that every key of a prompt shares with its query (topic, prompt-specific
tokens) cancels between the two sides; a relational feature gives up to 1. ``delta_p`` (positive
key given the partner's positive coordinates, the rest unchanged) says how far attention falls
toward the negative when the match is broken.

**Null** (:func:`relation_test`). Records are paired (a perfect matching: ``j`` is ``i``'s partner
and ``i`` is ``j``'s). Exchanging the positive and negative labels of both records of a pair
negates both records' relational effects *exactly* (the two exchanges trade places, and
``p ↦ 1 − p`` on both patches), whatever the head, the subspace or the softcap. Under "the labels
carry nothing about the query–key match" (a coin flip per record) the pair sums are therefore
symmetric about 0, and the sign-flip distribution of their mean is an exact null. ``V`` is
estimated on the *build* records, independent of the held-out ones, so the test is valid
conditionally on it (no selection to reproduce). The p is exact (all ``2^m`` sign patterns) for
up to :data:`EXACT_PAIRS` pairs, else Monte Carlo; its floor is reported with it.

**Partners** (:func:`pair_partners`). In the post-RoPE frame a key carries its absolute
position: a foreign key at another position would lose its "match" by rotation alone. Records
are therefore paired with a record whose query, positive and negative keys sit at the *same
positions* where one exists (then own and foreign coordinates carry the same position), else
the same query–key offsets (exact in the query frame), else the nearest offsets; the shares
are reported. Partners are drawn within the record's group (the query's feature value)
wherever it has one left, so a class feature per group (the verb's number, the asked
category) does not pass for a relation.

**Which test** (:func:`relation_share`): on the build records, restricted to the feature's
subspaces, ΔC_r = E[q̃ d̃ᵀ] (q̃ = Uᵀq, d̃ = Vᵀ(k⁺ − k⁻), per group) splits into a *class* part
``E[q̃] E[d̃]ᵀ`` (the mean query reads a key difference shared across records) and a
*relational* part ``Cov(q̃, d̃)`` (the query varies with the record's own key difference). The
relational share of the two parts' energy picks the test when the records do not declare it;
computed on build records only, it does not touch the held-out test it chooses.

Plain tensors only; nothing here imports transformers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .statistics import RecordStats

__all__ = [
    "EXACT_PAIRS",
    "KINDS",
    "RelationTest",
    "pair_partners",
    "relation_patch",
    "relation_test",
    "relation_share",
    "pick_pair_keys",
]

_F64 = torch.float64
EXACT_PAIRS = 16  # up to 2^16 sign patterns enumerated; more pairs: Monte Carlo
KINDS = ("class", "relation")


def pick_pair_keys(
    scores: torch.Tensor, positives: Sequence[Sequence[int]], negatives: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row the most-attended positive and the most-attended negative key ``([n], [n])``.

    ``scores [n, S]``: the query row's attention (or logits). One rule for both sides, so
    exchanging a record's labels exchanges the two picks (the null's symmetry needs it; the
    swap's "most-attended positive, random negative" pair would favour the positive)."""
    if scores.ndim != 2 or scores.shape[0] != len(positives) or len(positives) != len(negatives):
        raise ValueError(f"scores must be [n, S] for n={len(positives)} records")
    pick = []
    for side in (positives, negatives):
        out = []
        for row, keys in zip(scores, side, strict=True):
            if not len(keys):
                raise ValueError("pick_pair_keys: every record needs both sides")
            idx = torch.as_tensor(list(keys), dtype=torch.long)
            out.append(int(idx[row[idx].argmax()]))
        pick.append(torch.tensor(out, dtype=torch.long))
    return pick[0], pick[1]


def pair_partners(
    positions: torch.Tensor | None,
    n: int | None = None,
    seed: int = 0,
    groups: Sequence[object] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """A perfect matching of records: ``partner [n]`` (``partner[partner[i]] == i``; with odd
    ``n`` one record gets ``-1`` and is left out) and the shares of pairs matched on the same
    positions / the same offsets.

    ``positions [n, 3]``: each record's query, positive and negative key positions (``None``:
    random pairs). Pairs are drawn at random within records of the same positions, then of
    the same offsets (query − key), then the rest in order of their offsets (nearest).
    ``groups [n]`` (e.g. the query's feature value): pairs stay inside a group wherever the
    group has a partner left, so a class feature per group (the verb's number) does not pass
    for a relation; ``"same_group"`` gives the share."""
    g = torch.Generator().manual_seed(int(seed))
    if positions is None:
        if n is None:
            raise ValueError("pair_partners: give positions or n")
        positions = torch.zeros(n, 3, dtype=torch.long)
    positions = torch.as_tensor(positions, dtype=torch.long)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must be [n, 3], got {list(positions.shape)}")
    n = positions.shape[0]
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups must have n={n} entries, got {len(groups)}")
    ids: dict[object, int] = {}
    gid = [0] * n if groups is None else [ids.setdefault(x, len(ids)) for x in groups]
    partner = torch.full((n,), -1, dtype=torch.long)
    offsets = torch.stack([positions[:, 0] - positions[:, 1], positions[:, 0] - positions[:, 2]], 1)
    counts = {"same_positions": 0, "same_offsets": 0, "same_group": 0}
    left = torch.randperm(n, generator=g).tolist()
    none = torch.zeros(n, 0, dtype=torch.long)
    for level, key in (
        ("same_positions", positions),
        ("same_offsets", offsets),
        ("same_group", none),
    ):
        by: dict[tuple[int, ...], list[int]] = {}
        for i in left:
            by.setdefault((gid[i], *key[i].tolist()), []).append(i)
        left = []
        for members in by.values():
            for a, b in zip(members[0::2], members[1::2], strict=False):
                partner[a], partner[b] = b, a
                counts[level] += 2
            if len(members) % 2:
                left.append(members[-1])
    left.sort(key=lambda i: tuple(offsets[i].tolist()))
    for a, b in zip(left[0::2], left[1::2], strict=False):
        partner[a], partner[b] = b, a
    paired = max(1, int((partner >= 0).sum()))
    shares = {k: v / paired for k, v in counts.items()}
    # each level pairs within the group: same positions imply same offsets and same group
    shares["same_offsets"] += shares["same_positions"]
    shares["same_group"] += shares["same_offsets"]
    return partner, shares


def relation_patch(
    q: torch.Tensor,
    k_pos: torch.Tensor,
    k_neg: torch.Tensor,
    partner: torch.Tensor,
    basis: torch.Tensor,
    scaling: float | None = None,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """Cross-record exchange of each row (see the module docstring), float64.

    Args:
        q, k_pos, k_neg ``[n, d]``: held-out queries and their positive / negative key.
        partner ``[n]``: :func:`pair_partners` (rows with ``-1`` get NaN).
        basis ``[d, r]`` or ``[P, d, r]`` (orthonormal columns).

    Returns ``{"effect", "effect_pos", "effect_neg", "delta_p"}`` each ``[P, n]`` and
    ``"p_before"`` ``[n]`` (``p = a⁻/(a⁺ + a⁻)``, which depends only on the two keys' logits).
    """
    if q.ndim != 2 or k_pos.shape != q.shape or k_neg.shape != q.shape:
        raise ValueError(
            f"q, k_pos, k_neg must all be [n, d], got {list(q.shape)}, {list(k_pos.shape)}, "
            f"{list(k_neg.shape)}"
        )
    n, d = q.shape
    partner = torch.as_tensor(partner, dtype=torch.long)
    if partner.shape != (n,):
        raise ValueError(f"partner must be [n={n}], got {list(partner.shape)}")
    v = basis.double()
    v = v[None] if v.ndim == 2 else v
    if v.ndim != 3 or v.shape[1] != d:
        raise ValueError(f"basis must be [d={d}, r] or [P, d, r], got {list(basis.shape)}")
    q, kp, kn = q.double(), k_pos.double(), k_neg.double()
    scale = 1.0 / math.sqrt(d) if scaling is None else scaling
    ok = partner >= 0
    j = torch.where(ok, partner, torch.arange(n))

    def logit(x: torch.Tensor) -> torch.Tensor:  # [..., n] raw dot products → capped logits
        z = x * scale
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    qv = torch.einsum("nd,pdr->pnr", q, v)
    cp, cn = torch.einsum("nd,pdr->pnr", kp, v), torch.einsum("nd,pdr->pnr", kn, v)
    dot_p, dot_n = (q * kp).sum(1), (q * kn).sum(1)  # [n]
    own_p, own_n = (qv * cp).sum(-1), (qv * cn).sum(-1)  # [P, n] q·V c of the own coordinates

    def m(c: torch.Tensor) -> torch.Tensor:  # q_i · V c_j for the partner's coordinates
        return (qv * c[:, j]).sum(-1)

    out_p, out_n = dot_p - own_p, dot_n - own_n  # logits outside V

    def p(pos_in: torch.Tensor, neg_in: torch.Tensor) -> torch.Tensor:
        # p = a⁻/(a⁺ + a⁻) = σ(ℓ⁻ − ℓ⁺): only the two keys' logits matter
        return torch.sigmoid(logit(out_n + neg_in) - logit(out_p + pos_in))

    fp, fn = m(cp), m(cn)  # the partner's positive / negative coordinates, read by q_i
    eff_pos = p(fp, own_p) - p(own_p, fp)
    eff_neg = p(fn, own_n) - p(own_n, fn)
    before = torch.sigmoid(logit(dot_n) - logit(dot_p))
    delta_p = p(fp, own_n) - before
    nan = torch.tensor(float("nan"), dtype=_F64)
    res = {"effect": eff_pos - eff_neg, "effect_pos": eff_pos, "effect_neg": eff_neg,
           "delta_p": delta_p}  # fmt: skip
    res = {k: torch.where(ok, x, nan) for k, x in res.items()}
    res["p_before"] = before
    return res


@dataclass(frozen=True)
class RelationTest:
    """The relational test's outcome on the held-out pairs.

    Attributes:
        effect: mean relational effect over the paired records (attention-share units).
        p_value: one-sided sign-flip p (pairs' label exchange), exact or Monte Carlo.
        p_floor: the smallest p the draw scheme can give (``1/2^m`` exact, ``1/(1+draws)``).
        exact: whether every sign pattern was enumerated.
        n_pairs: pairs used (records with a partner / 2).
        null_mean, null_std: the sign-flip distribution's mean and std of the mean effect.
    """

    effect: float
    p_value: float
    p_floor: float
    exact: bool
    n_pairs: int
    null_mean: float
    null_std: float

    def to_dict(self) -> dict[str, float | int | bool]:
        return dict(self.__dict__)


def relation_test(
    effect: torch.Tensor, partner: torch.Tensor, n_draws: int = 9999, seed: int = 0
) -> RelationTest:
    """Sign-flip test of per-record relational effects ``[n]`` over the pairs of ``partner``
    (see the module docstring): the statistic is the mean effect, the null flips each pair's
    sum by a fair coin."""
    effect = torch.as_tensor(effect, dtype=_F64).reshape(-1)
    partner = torch.as_tensor(partner, dtype=torch.long).reshape(-1)
    if effect.shape != partner.shape:
        raise ValueError(f"effect [{effect.numel()}] and partner [{partner.numel()}] differ")
    if not isinstance(n_draws, int) or n_draws < 1:
        raise ValueError(f"n_draws must be a positive integer, got {n_draws!r}")
    idx = torch.arange(partner.numel())
    first = (partner > idx) & torch.isfinite(effect)
    a = idx[first]
    b = partner[first]
    keep = torch.isfinite(effect[b])
    u = (effect[a] + effect[b])[keep]  # pair sums [m]
    m = int(u.numel())
    if m == 0:
        raise ValueError("relation_test: no complete pair")
    obs = float(u.sum()) / (2 * m)
    if m <= EXACT_PAIRS:
        signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=m)), dtype=_F64)
        exact, floor = True, 1.0 / 2**m
    else:
        g = torch.Generator().manual_seed(int(seed))
        signs = torch.randint(0, 2, (n_draws, m), generator=g).to(_F64) * 2 - 1
        exact, floor = False, 1.0 / (1 + n_draws)
    null = (signs @ u) / (2 * m)
    tol = 1e-12 * max(1.0, abs(obs))
    hits = int((null >= obs - tol).sum())
    p = hits / null.numel() if exact else (1 + hits) / (1 + n_draws)
    return RelationTest(obs, float(p), floor, exact, m, float(null.mean()), float(null.std()))


def relation_share(
    stats: RecordStats,
    key_basis: torch.Tensor,
    query_basis: torch.Tensor | None = None,
    group: int | str | None = None,
    by_group: bool = True,
) -> float | None:
    """Relational share of ΔC inside the feature's subspaces, on the build records: with
    ``q̃ = Uᵀq`` and ``d̃ = Vᵀ(k⁺ − k⁻)`` over the two-sided records (per group when
    ``by_group``, weighted by the group's records), ``‖Cov(q̃, d̃)‖² / (‖E q̃ E d̃ᵀ‖² +
    ‖Cov(q̃, d̃)‖²)``, each part's energy less its expected energy from sampling noise
    alone (a dominant shared query direction would otherwise inflate the class part by the
    noise of ``E d̃``). ``None`` without two two-sided records or when neither part stands
    above its noise.

    ``query_basis`` ``None``: the query directions that read ``V`` in the pooled ΔC
    (``orth(ΔC V)``)."""
    mask = stats.group_mask(group) & stats.has_pos & stats.has_neg
    if int(mask.sum()) < 2:
        return None
    v = key_basis.double()
    if query_basis is None:
        query_basis = torch.linalg.qr(stats.delta() @ v).Q
    qt = stats.q[mask] @ query_basis.double()
    dt = (stats.k_pos[mask] - stats.k_neg[mask]) @ v
    grp = stats.group[mask] if by_group else torch.zeros(int(mask.sum()), dtype=torch.long)
    cls = torch.zeros(qt.shape[1], dt.shape[1], dtype=_F64)
    rel = torch.zeros_like(cls)
    noise_c = noise_r = 0.0  # expected energy of each part's estimate when it is zero
    n = qt.shape[0]
    for gi in grp.unique():
        sel = grp == gi
        ng = int(sel.sum())
        w = ng / n
        mq, md = qt[sel].mean(0), dt[sel].mean(0)
        cq, cd = qt[sel] - mq, dt[sel] - md
        cls += w * torch.outer(mq, md)
        rel += w * (cq.T @ cd) / ng
        noise_c += w**2 * float(mq @ mq) * float((cd**2).sum()) / ng**2
        noise_r += w**2 * float(((cq**2).sum(1) * (cd**2).sum(1)).sum()) / ng**2
    c2 = max(float((cls**2).sum()) - noise_c, 0.0)
    r2 = max(float((rel**2).sum()) - noise_r, 0.0)
    return r2 / (c2 + r2) if c2 + r2 > 0 else None
