"""Label-sensitive causal evidence: permuted-label subspaces, the centroid patch, the causal rank.

A key swap inside the top-r key subspace of ΔC shows that the subspace *moves attention*; it
does not show that the subspace holds the *feature*: ΔC under any relabelling of the records
(positives and negatives swapped at random) still spans the directions in which the two keys
differ, so a label-permuted subspace can move attention as far. This module gives the two
controls that tell the cases apart (plain tensors; nothing here imports transformers):

- **label-permuted subspaces** (:func:`relabel_signs`, :func:`permuted_deltas`): ΔC of the
  build records under the permutation null's relabelling (sign flips within two-sided records,
  side labels permuted across one-sided ones, as :func:`qkcov.core.statistics.permutation_null`),
  from :class:`~qkcov.core.statistics.RecordStats` without recapture. Their top-r key
  subspaces are swapped on the same held-out pairs as the real one.
- **centroid patch** (:func:`centroid_patch`): inside a fixed key subspace ``V``, set the
  negative key's coordinates to the build positives' mean ``Vᵀμ⁺`` and the positive key's to
  the negatives' mean ``Vᵀμ⁻`` ("labelled" patch), and, as its mirror, the negative's to
  ``Vᵀμ⁻`` and the positive's to ``Vᵀμ⁺``. The effect is the mean of
  ``p(labelled) − p(mirrored)`` with ``p = a_tgt / (a_orig + a_tgt)``. Both patches move the
  two keys to the same two points, so everything but the *labels of the centroids* is equal;
  the difference is driven by ``qᵀV Vᵀ(μ⁺ − μ⁻)``, which flips sign with the labels and is
  zero in expectation under the null relabelling (the permuted classes' means coincide).
  It is therefore label-sensitive where the swap is not: a subspace that only spans key
  differences gives ~0 unless the query prefers the build *positives'* side of it.
- :func:`causal_rank`: the smallest rank reaching a fraction of a Δp(r) curve's best.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .intervention import capped_softmax
from .statistics import RecordStats, _batched_weighted_outer, _generator, _null_signs

__all__ = [
    "relabel_signs",
    "permuted_deltas",
    "relabelled_deltas",
    "class_key_means",
    "centroid_patch",
    "causal_rank",
]

_F64 = torch.float64


def relabel_signs(
    stats: RecordStats, n: int, seed: int = 0, group: int | str | None = None
) -> torch.Tensor:
    """``[n, stats.n]`` signs for :meth:`RecordStats.delta` (``signs=``): ``n`` draws of the
    permutation null's relabelling of the records of ``group`` (records outside it keep +1)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    mask = stats.group_mask(group)
    _, _, _, s0, both = stats._linear_terms(group)
    rel = (
        _null_signs(s0, both, stats.group[mask], n, _generator(seed)) * s0
    )  # observed → relabelled
    out = torch.ones(n, stats.n, dtype=_F64)
    out[:, mask] = rel
    return out


def relabelled_deltas(
    stats: RecordStats, signs: torch.Tensor, group: int | str | None = None
) -> torch.Tensor:
    """``[P, D_q, D_k]``: ``stats.delta(group, signs=signs[j])`` for every row of ``signs
    [P, n]`` whose relabellings keep each side's count (as the null's do), batched."""
    base, q, d, s0, _ = stats._linear_terms(group)
    rel = torch.as_tensor(signs, dtype=_F64)[:, stats.group_mask(group)] * s0
    return _batched_weighted_outer(rel, q, d, base)


def permuted_deltas(
    stats: RecordStats, n: int, seed: int = 0, group: int | str | None = None
) -> torch.Tensor:
    """``[n, D_q, D_k]`` ΔC of ``group`` under ``n`` null relabellings (see :func:`relabel_signs`)."""
    return relabelled_deltas(stats, relabel_signs(stats, n, seed, group), group)


def class_key_means(
    stats: RecordStats,
    signs: torch.Tensor | None = None,
    group: int | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean positive and mean negative key ``([D], [D])`` of ``group`` (the records' mean keys
    averaged with equal weight per record, as in ΔC), optionally under relabelling ``signs``
    (``[n]`` or ``[P, n]`` → ``[P, D]`` each)."""
    if signs is None:
        s = torch.ones(1, stats.n, dtype=_F64)
    else:
        s = torch.as_tensor(signs, dtype=_F64)
        s = s[None] if s.ndim == 1 else s
    if s.shape[1] != stats.n or not ((s == 1) | (s == -1)).all():
        raise ValueError(f"signs must be [P, n={stats.n}] values in {{-1, +1}}")
    m = stats.group_mask(group)[None]
    flip = s < 0
    hp = torch.where(flip, stats.has_neg[None], stats.has_pos[None]) & m  # [P, n]
    hn = torch.where(flip, stats.has_pos[None], stats.has_neg[None]) & m
    kp, kn = stats.k_pos[None], stats.k_neg[None]
    f3 = flip[..., None]
    kp_s, kn_s = torch.where(f3, kn, kp), torch.where(f3, kp, kn)  # [P, n, D]
    if not (hp.any(1).all() and hn.any(1).all()):
        raise ValueError("class_key_means: a relabelling leaves one side without records")
    mu_p = (hp[..., None] * kp_s).sum(1) / hp.sum(1, keepdim=True)
    mu_n = (hn[..., None] * kn_s).sum(1) / hn.sum(1, keepdim=True)
    return (mu_p[0], mu_n[0]) if signs is None or torch.as_tensor(signs).ndim == 1 else (mu_p, mu_n)


def centroid_patch(
    q: torch.Tensor,
    k: torch.Tensor,
    orig: torch.Tensor,
    target: torch.Tensor,
    basis: torch.Tensor,
    mu_pos: torch.Tensor,
    mu_neg: torch.Tensor,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """Centroid patch of each query row (see the module docstring), float64.

    Args:
        q ``[n, d]``, k ``[n, S, d]``, orig/target ``[n]`` (the positive / negative key),
        basis ``[d, r]`` or one per centroid pair ``[P, d, r]`` (orthonormal columns),
        mu_pos / mu_neg ``[P, d]`` (or ``[d]``, or per row ``[P, n, d]``, e.g. the centroids
        of each row's group): centroid pairs (row 0 typically the real
        labels with the real subspace, the rest permuted labels with *their* subspace: the
        same estimator on relabelled records, so the null carries the same selection), mask
        ``[n, S]`` (bool True = may attend, or additive float).

    Returns ``{"effect", "delta_p", "p_labelled", "p_mirrored"}`` each ``[P, n]``:
    ``effect = p_labelled − p_mirrored`` and ``delta_p = p_labelled − p_before``.
    """
    if q.ndim != 2 or k.ndim != 3 or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q must be [n, d] and k [n, S, d], got {list(q.shape)}, {list(k.shape)}")
    n, d = q.shape
    if basis.ndim not in (2, 3) or basis.shape[-2] != d:
        raise ValueError(f"basis must be [d={d}, r] or [P, d, r], got {list(basis.shape)}")
    mu_pos, mu_neg = mu_pos.double(), mu_neg.double()
    if mu_pos.shape != mu_neg.shape or mu_pos.shape[-1] != d or mu_pos.ndim > 3:
        raise ValueError("mu_pos and mu_neg must both be [d], [P, d] or [P, n, d]")
    if mu_pos.ndim == 3 and mu_pos.shape[1] != n:
        raise ValueError(f"per-row centroids must be [P, n={n}, d], got {list(mu_pos.shape)}")
    if mu_pos.ndim < 3:  # the same centroids for every row
        mu_pos = mu_pos.reshape(-1, 1, d).expand(-1, n, -1)
        mu_neg = mu_neg.reshape(-1, 1, d).expand(-1, n, -1)
    q, k = q.double(), k.double()
    v = basis.double().to(q.device)
    v = v.expand(mu_pos.shape[0], -1, -1) if v.ndim == 2 else v  # [P, d, r]
    if v.shape[0] != mu_pos.shape[0]:
        raise ValueError(f"{v.shape[0]} bases for {mu_pos.shape[0]} centroid pairs")
    scale = 1.0 / math.sqrt(d) if scaling is None else scaling
    rows = torch.arange(n)
    logits = (k @ q[:, :, None])[..., 0] * scale  # [n, S]
    qv = torch.einsum("nd,pdr->pnr", q, v)
    c_pos = torch.einsum("pnd,pdr->pnr", mu_pos.to(v), v)
    c_neg = torch.einsum("pnd,pdr->pnr", mu_neg.to(v), v)
    ko = torch.einsum("nd,pdr->pnr", k[rows, orig], v)  # current coordinates [P, n, r]
    kt = torch.einsum("nd,pdr->pnr", k[rows, target], v)

    def shift(c: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:  # [P, n] logit change
        return torch.einsum("pnr,pnr->pn", qv, c - cur) * scale

    def p_after(c_orig: torch.Tensor, c_tgt: torch.Tensor) -> torch.Tensor:
        lg = logits.expand(c_orig.shape[0], n, -1).clone()
        lg[:, rows, orig] += shift(c_orig, ko)
        lg[:, rows, target] += shift(c_tgt, kt)
        a = capped_softmax(lg, mask, softcap)
        a_o, a_t = a[:, rows, orig], a[:, rows, target]
        return a_t / (a_o + a_t).clamp_min(1e-30)

    a0 = capped_softmax(logits, mask, softcap)
    before = a0[rows, target] / (a0[rows, orig] + a0[rows, target]).clamp_min(1e-30)
    lab = p_after(c_neg, c_pos)  # positive key -> negatives' centroid, negative -> positives'
    mir = p_after(c_pos, c_neg)
    return {
        "effect": lab - mir,
        "delta_p": lab - before[None],
        "p_labelled": lab,
        "p_mirrored": mir,
    }


def causal_rank(curve: Sequence[float], fraction: float = 0.9) -> int:
    """Smallest ``r`` (1-based) with ``curve[r-1] >= fraction · max(curve)``; 0 when the best
    value is not positive (no rank moves attention)."""
    x = [float(c) for c in curve]
    if not x or any(math.isnan(c) for c in x):
        raise ValueError(f"curve must be a non-empty list of numbers, got {curve!r}")
    best = max(x)
    if best <= 0:
        return 0
    return next(i + 1 for i, c in enumerate(x) if c >= fraction * best)
