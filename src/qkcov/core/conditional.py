"""Conditional (stratified) label nulls: what the labels say *beyond* position and named rivals.

The label-sensitive nulls of :mod:`qkcov.core.causal` relabel records at random. When the
labels are (partly) a function of something the claim must go beyond — where the key sits
relative to the query, or a rival attribute of the key such as its syntactic role — a random
relabelling breaks that dependence too, and a head that reads *only* the confound beats it.
Here the labels are permuted **only among keys of the same stratum** (same offset bin, same
rival values, same record group), so each relabelled ΔC keeps everything the strata explain
and loses only what the labels add beyond them (plain tensors; nothing here imports
transformers):

- :func:`strata_ids` / :func:`offset_strata`: one stratum id per key from its columns (query–key
  offset, exact when there are few distinct values, else quantile bins; attribute values;
  the record's group).
- :func:`mixed_fraction`: the share of keys in strata holding both labels. 0 means the labels
  are a function of the strata: no relabelling changes anything, and nothing beyond the
  controls can be tested (:func:`confounding` names which control fixes the labels).
- :func:`stratified_labels`: ``n`` within-strata permutations of the key labels.
- :func:`key_deltas` / :func:`key_class_means`: ΔC (each record's query times the mean of its
  positive keys minus its negative keys, averaged over the records having each side, as the
  pipeline forms it) and the class centroids for a batch of key labellings.
- :func:`p_floor` / :func:`min_draws` / :func:`floor_errors`: the smallest p a count of draws
  can give, the draws needed for a floor ≤ α / :data:`FLOOR_FACTOR`, and the one-line refusal
  of a combination whose floor reaches α (every test here rejects at ``p < α``).

Permuting keys across records, a relabelled record may hold two positives or none, which the
design's labelling never does; where keys of one record share a record-level component this
makes the null wider than the real labels' sampling spread (conservative, never liberal).
The false-positive rate measured on planted records is in ``benchmarks/conditional_calibration.py``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import torch

from .position import offset_bins

__all__ = [
    "CONFOUNDED_MIXED",
    "FLOOR_FACTOR",
    "MIN_LABEL_EFFECT",
    "MIN_SWAP_EFFECT",
    "OFFSET_BINS",
    "p_floor",
    "min_draws",
    "floor_errors",
    "strata_ids",
    "offset_strata",
    "mixed_fraction",
    "confounding",
    "stratified_labels",
    "key_deltas",
    "key_class_means",
]

_F64 = torch.float64

# below this mixed fraction the strata leave the labels (almost) fixed: verdict `confounded`
CONFOUNDED_MIXED = 0.25
# default draw counts give a smallest attainable p of at most α / FLOOR_FACTOR
FLOOR_FACTOR = 5
# effect-size floors of a positive verdict (beyond each null's mean; see docs/method.md)
MIN_LABEL_EFFECT = 0.1  # centroid-patch effect − its permuted-label mean
#: Fewest record pairs for the relational exchange's failure to reject to count against the
#: feature: on planted relational heads (``benchmarks/relational_power.py``) the test rejects
#: 20–79 % of seeds with 7 pairs and 90–100 % with 12 at the planted strengths ≥ 1.0.
MIN_RELATION_PAIRS = 12
MIN_SWAP_EFFECT = 0.1  # swap Δp − the equal-rank random subspaces' mean
OFFSET_BINS = 8  # distinct offsets kept exact up to this many, else this many quantile bins


def p_floor(n: int) -> float:
    """Smallest p of ``(1 + #draws ≥ observed) / (1 + n)``: ``1 / (n + 1)``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return 1.0 / (n + 1)


def min_draws(alpha: float, factor: int = FLOOR_FACTOR) -> int:
    """Fewest draws whose floor ``1/(n+1)`` is at most ``alpha / factor`` (α = 0.05 → 99)."""
    if not 0 < float(alpha) < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return max(1, math.ceil(factor / float(alpha) - 1 - 1e-9))


def floor_errors(alpha: float, draws: Mapping[str, int]) -> list[str]:
    """One message per ``{flag: n}`` (``n`` > 0: the test is on) whose p floor is α or more: the
    tests reject at ``p < α``, so such a test can never reject and a verdict resting on it is
    decided before it runs (``--n-random 19`` at α = 0.05: floor 0.05, refused)."""
    out = []
    for flag, n in draws.items():
        if isinstance(n, int) and not isinstance(n, bool) and n > 0 and p_floor(n) >= alpha:
            out.append(
                f"{flag} {n} gives p-values no smaller than 1/{n + 1} = {p_floor(n):.3g} ≥ --alpha "
                f"{alpha:g}, so that test can never reject; use {flag} {min_draws(alpha)} or more "
                f"(floor ≤ α/{FLOOR_FACTOR}), or 0 to turn it off"
            )
    return out


def strata_ids(*columns: Sequence[Hashable] | torch.Tensor) -> torch.Tensor:
    """``[m]`` long: one id per distinct combination of the columns' values (each column has
    one value per key; no column → one stratum)."""
    cols = [c.tolist() if isinstance(c, torch.Tensor) else list(c) for c in columns]
    if not cols:
        raise ValueError("strata_ids needs at least one column")
    m = len(cols[0])
    if any(len(c) != m for c in cols):
        raise ValueError(
            f"strata columns must all have one value per key, got {[len(c) for c in cols]}"
        )
    seen: dict[tuple, int] = {}
    return torch.tensor(
        [seen.setdefault(t, len(seen)) for t in zip(*cols, strict=True)], dtype=torch.long
    )


def offset_strata(
    offsets: Sequence[int] | torch.Tensor, max_bins: int = OFFSET_BINS
) -> torch.Tensor:
    """``[m]`` offset stratum per key: the exact offset when at most ``max_bins`` distinct
    offsets occur, else ``max_bins`` quantile bins (:func:`qkcov.core.position.offset_bins`)."""
    o = torch.as_tensor(offsets, dtype=_F64).reshape(-1)
    if o.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    return offset_bins(o, max_bins)


def _check(strata: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(strata).reshape(-1).long()
    y = torch.as_tensor(labels).reshape(-1).bool()
    if s.numel() != y.numel():
        raise ValueError(
            f"strata ({s.numel()}) and labels ({y.numel()}) must have one entry per key"
        )
    return s, y


def mixed_fraction(strata: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of keys whose stratum holds both labels (0: labels are a function of the strata)."""
    s, y = _check(strata, labels)
    if not s.numel():
        return 0.0
    _, inv = torch.unique(s, return_inverse=True)
    n_b = torch.bincount(inv).double()
    pos_b = torch.bincount(inv, weights=y.double())
    mixed = (pos_b > 0) & (pos_b < n_b)
    return float(n_b[mixed].sum() / s.numel())


def confounding(
    controls: Mapping[str, Sequence[Hashable] | torch.Tensor],
    labels: torch.Tensor,
    base: Sequence[Hashable] | torch.Tensor | None = None,
    threshold: float = CONFOUNDED_MIXED,
) -> dict[str, object]:
    """How far the controls fix the labels.

    ``controls``: ``{name: per-key stratum column}`` (e.g. ``{"offset": offset_strata(o),
    "role": roles}``); ``base``: a column every stratum includes (the record's group).
    Returns ``{"conditioned_on": [names], "mixed_fraction": all controls together,
    "by_control": {name: mixed fraction of that control alone}, "confounded": mixed <
    threshold, "fixed_by": [names that alone leave the labels fixed] (or all names when only
    their combination does), "threshold"}``.
    """
    y = torch.as_tensor(labels).reshape(-1).bool()
    extra = [] if base is None else [base]
    names = list(controls)
    by = {n: mixed_fraction(strata_ids(controls[n], *extra), y) for n in names}
    both = (
        mixed_fraction(strata_ids(*[controls[n] for n in names], *extra), y)
        if names
        else (mixed_fraction(strata_ids(*extra), y) if extra else 1.0)
    )
    conf = both < threshold
    fixed = [n for n in names if by[n] < threshold] if conf else []
    if conf and not fixed:
        fixed = names
    return {
        "conditioned_on": names,
        "mixed_fraction": both,
        "by_control": by,
        "confounded": bool(conf),
        "fixed_by": fixed,
        "threshold": threshold,
    }


def stratified_labels(
    strata: torch.Tensor, labels: torch.Tensor, n: int, seed: int = 0
) -> torch.Tensor:
    """``[n, m]`` bool: ``n`` draws of the key labels, each permuted uniformly within every
    stratum (each stratum keeps its count of positives)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    s, y = _check(strata, labels)
    m = s.numel()
    gen = torch.Generator().manual_seed(int(seed))
    # sort keys by (stratum, random key): the ranks inside each stratum are a uniform
    # permutation; keys then take the labels of the stratum's keys in stratum order
    order = torch.argsort(s, stable=True)
    sorted_y = y[order]
    out = torch.empty(n, m, dtype=torch.bool)
    for j in range(n):
        r = torch.rand(m, generator=gen, dtype=_F64)
        perm = torch.argsort(s.double() * 2.0 + r)  # s integer, r in [0, 1): stratum-major
        out[j, perm] = sorted_y
    return out


def _record_sides(
    keys: torch.Tensor, key_record: torch.Tensor, labels: torch.Tensor, n: int
) -> tuple[torch.Tensor, ...]:
    """Per labelling and record, the mean positive / negative key and the side flags."""
    k = keys.double()
    L = torch.as_tensor(labels).bool()
    L = L[None] if L.ndim == 1 else L  # [P, m]
    if L.shape[1] != k.shape[0] or key_record.numel() != k.shape[0]:
        raise ValueError(
            f"labels [P, m={k.shape[0]}] and key_record [m] must match keys, got "
            f"{list(L.shape)} and {key_record.numel()}"
        )
    onehot = torch.zeros(n, k.shape[0], dtype=_F64)
    onehot[key_record.long(), torch.arange(k.shape[0])] = 1.0
    out = []
    for w in (L.double(), (~L).double()):
        summed = torch.einsum("nm,pm,md->pnd", onehot, w, k)
        count = torch.einsum("nm,pm->pn", onehot, w)
        has = count > 0
        out += [summed / count.clamp_min(1.0)[..., None], has]
    return tuple(out)


def key_deltas(
    q: torch.Tensor, keys: torch.Tensor, key_record: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``[P, D_q, D_k]`` ΔC of each labelling ``labels [P, m]`` (or ``[m]`` → ``[1, …]``):
    ``mean_{i has +} q_i k̄⁺_iᵀ − mean_{i has −} q_i k̄⁻_iᵀ`` (records as in
    :func:`qkcov.core.position.record_delta`, batched)."""
    qd = q.double()
    kp, hp, kn, hn = _record_sides(keys, key_record, labels, qd.shape[0])
    wp = hp.double() / hp.sum(1, keepdim=True).clamp_min(1)
    wn = hn.double() / hn.sum(1, keepdim=True).clamp_min(1)
    return torch.einsum("pn,nd,pne->pde", wp, qd, kp) - torch.einsum("pn,nd,pne->pde", wn, qd, kn)


def key_class_means(
    keys: torch.Tensor,
    key_record: torch.Tensor,
    labels: torch.Tensor,
    records: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean positive and negative key ``([P, D], [P, D])`` per labelling: each record's mean
    key of a side, averaged with equal weight over the records (of ``records``, a bool mask
    ``[n]``; default all) having that side — as :func:`qkcov.core.causal.class_key_means`."""
    n = int(key_record.max()) + 1 if key_record.numel() else 0
    if records is not None:
        n = max(n, int(torch.as_tensor(records).numel()))
    kp, hp, kn, hn = _record_sides(keys, key_record, labels, n)
    mask = torch.ones(n, dtype=torch.bool) if records is None else torch.as_tensor(records).bool()
    hp, hn = hp & mask[None], hn & mask[None]
    if not (hp.any(1).all() and hn.any(1).all()):
        raise ValueError("key_class_means: a labelling leaves one side without records")
    mu_p = (hp.double()[..., None] * kp).sum(1) / hp.sum(1, keepdim=True)
    mu_n = (hn.double()[..., None] * kn).sum(1) / hn.sum(1, keepdim=True)
    return mu_p, mu_n


def decide(ev: Mapping[str, object], alpha: float) -> tuple[str, str]:
    """``(status, reason)`` of one head from its evidence numbers (the pipeline's verdict
    writes the sentence; planted tests call this directly).

    ``ev`` keys (``None`` = not measured): ``p_null``, ``delta_p``, ``random_mean``,
    ``p_vs_random``, ``p_vs_permuted``, ``label_effect``, ``label_permuted_mean``, ``p_label``,
    ``confounded`` (bool), ``min_swap_effect`` / ``min_label_effect`` (default the module's
    floors), ``label_underpowered`` (bool: the label test had too little data for a failure to
    reject to say anything — then never ``separates-keys-not-feature``). Order: no subspace above the null, a swap not beating random or below the swap
    floor → ``no-evidence``; strata leaving the labels fixed → ``confounded``; no label test →
    ``not-testable``; the label test beating permuted labels by at least the label floor →
    ``reads-feature``; beating the label-permuted subspaces → ``separates-keys-not-feature``;
    else ``no-evidence``. Reasons: ``no-subspace``, ``no-swap-effect``, ``swap-below-floor``,
    ``confounded``, ``no-label-test``, ``label``, ``label-underpowered``, ``separates``,
    ``label-below-floor``, ``no-label-evidence``.
    """

    def num(key: str) -> float | None:
        v = ev.get(key)
        return None if v is None else float(v)  # type: ignore[arg-type]

    p_null, p_rand = num("p_null"), num("p_vs_random")
    if p_null is None or p_null >= alpha:
        return "no-evidence", "no-subspace"
    if p_rand is None or p_rand >= alpha:
        return "no-evidence", "no-swap-effect"
    floor_swap = num("min_swap_effect")
    floor_swap = MIN_SWAP_EFFECT if floor_swap is None else floor_swap
    dp, rnd = num("delta_p"), num("random_mean")
    if dp is not None and rnd is not None and dp - rnd < floor_swap:
        return "no-evidence", "swap-below-floor"
    if ev.get("confounded"):
        return "confounded", "confounded"
    eff, perm, p_lab = num("label_effect"), num("label_permuted_mean"), num("p_label")
    if eff is None or p_lab is None:
        return "not-testable", "no-label-test"
    floor_label = num("min_label_effect")
    floor_label = MIN_LABEL_EFFECT if floor_label is None else floor_label
    beyond = eff - (perm or 0.0)
    if p_lab < alpha and eff > 0 and beyond >= floor_label:
        return "reads-feature", "label"
    if ev.get("label_underpowered"):
        return "no-evidence", "label-underpowered"
    p_perm = num("p_vs_permuted")
    if p_perm is not None and p_perm < alpha:
        return "separates-keys-not-feature", "separates"
    if p_lab < alpha and eff > 0:
        return "no-evidence", "label-below-floor"
    return "no-evidence", "no-label-evidence"
