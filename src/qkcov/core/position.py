"""Position confounds of a contrast (torch only).

- :func:`offset_test`: do positive and negative keys sit at systematically different
  query–key offsets? Mann–Whitney U (normal approximation with tie correction, two-sided)
  and its effect size ``auc = P(offset⁺ > offset⁻) + ½ P(=)`` (0.5 = no shift).
- :func:`position_control`: ΔC of a position-only relabelling — each key keeps its offset
  but its positive/negative label is shuffled among keys of the same offset bin, so a key is
  "positive" only as often as its offset is — beside the real ΔC of the same vectors, with
  the principal angles between the two key subspaces and the share of the real ΔC's energy
  that lies in the position subspace.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .subspace import feature_subspace, principal_angles

__all__ = [
    "OFFSET_P",
    "OFFSET_AUC",
    "OFFSET_KS",
    "offset_test",
    "offset_bins",
    "record_delta",
    "position_control",
]

# a contrast is flagged as position-confounded when both hold
OFFSET_P = 0.01
OFFSET_AUC = 0.1  # |auc − 0.5| at least this
OFFSET_KS = 0.2  # or a Kolmogorov–Smirnov distance at least this (shape, not only location)


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _ks(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov statistic D and its asymptotic two-sided p (with the
    Stephens small-sample factor; conservative with ties)."""
    grid = torch.unique(torch.cat([x, y]))
    cx = (x[None, :] <= grid[:, None]).double().mean(1)
    cy = (y[None, :] <= grid[:, None]).double().mean(1)
    d = float((cx - cy).abs().max())
    ne = x.numel() * y.numel() / (x.numel() + y.numel())
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    if lam < 1e-3:
        return d, 1.0
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, min(1.0, max(0.0, p))


def offset_test(pos: Sequence[float], neg: Sequence[float]) -> dict[str, object]:
    """Two-sided Mann–Whitney U test of positive vs negative key offsets.

    Also a two-sample Kolmogorov–Smirnov test (``ks``, ``ks_p_value``), which sees a
    difference of shape the rank test misses (positives in the middle slot, negatives on
    both sides). Returns ``{"n_pos", "n_neg", "histogram": {"offset", "pos", "neg"} (counts
    per offset),
    "median_pos", "median_neg", "mean_pos", "mean_neg", "auc",
    "p_value", "ks", "ks_p_value", "confounded"}``; ``confounded`` = (``p < OFFSET_P`` and
    ``|auc − 0.5| ≥ OFFSET_AUC``) or (``ks_p_value < OFFSET_P`` and ``ks ≥ OFFSET_KS``) (effect
    size floors, so thousands of keys with a tiny shift do not warn).
    ``p_value`` is ``None`` when a side is empty or every offset is equal on both sides.
    """
    x = torch.as_tensor(list(pos), dtype=torch.float64)
    y = torch.as_tensor(list(neg), dtype=torch.float64)
    n1, n2 = x.numel(), y.numel()
    values = sorted({int(v) for v in [*x.tolist(), *y.tolist()]})
    out: dict[str, object] = {
        "n_pos": n1,
        "n_neg": n2,
        "histogram": {
            "offset": values,
            "pos": [int((x == v).sum()) for v in values],
            "neg": [int((y == v).sum()) for v in values],
        },
    }
    if not n1 or not n2:
        return out | {"auc": None, "p_value": None, "confounded": False}
    out |= {
        "median_pos": float(x.median()),
        "median_neg": float(y.median()),
        "mean_pos": float(x.mean()),
        "mean_neg": float(y.mean()),
    }
    allv = torch.cat([x, y])
    # average ranks with ties
    uniq, inv, counts = torch.unique(allv, return_inverse=True, return_counts=True)
    upper = torch.cumsum(counts, 0).double()
    avg_rank = upper - (counts.double() - 1) / 2
    ranks = avg_rank[inv]
    u1 = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2
    auc = u1 / (n1 * n2)
    n = n1 + n2
    tie = float((counts.double() ** 3 - counts.double()).sum())
    var = n1 * n2 / 12.0 * ((n + 1) - tie / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return out | {"auc": auc, "p_value": None, "confounded": False}
    z = (abs(u1 - n1 * n2 / 2) - 0.5) / math.sqrt(var)
    p = min(1.0, 2 * _normal_sf(max(z, 0.0)))
    ks_d, ks_p = _ks(x, y)
    conf = (p < OFFSET_P and abs(auc - 0.5) >= OFFSET_AUC) or (
        ks_p < OFFSET_P and ks_d >= OFFSET_KS
    )
    return out | {
        "auc": auc,
        "p_value": p,
        "ks": ks_d,
        "ks_p_value": ks_p,
        "confounded": bool(conf),
    }


def offset_bins(offsets: torch.Tensor, max_bins: int = 8) -> torch.Tensor:
    """Bin index ``[m]`` per offset: each distinct offset its own bin when there are at most
    ``max_bins`` of them, else ``max_bins`` quantile bins."""
    o = offsets.double()
    uniq, inv = torch.unique(o, return_inverse=True)
    if uniq.numel() <= max_bins:
        return inv
    edges = torch.quantile(o, torch.linspace(0, 1, max_bins + 1, dtype=torch.float64)[1:-1])
    return torch.bucketize(o, torch.unique(edges), right=True)


def record_delta(
    q: torch.Tensor, keys: torch.Tensor, key_record: torch.Tensor, positive: torch.Tensor
) -> torch.Tensor:
    """ΔC ``[D, D]`` as the pipeline forms it: each record's query times the mean of its
    positive (negative) keys, averaged over records that have that side.

    ``q [n, D]``, ``keys [m, D]``, ``key_record [m]`` (0..n-1), ``positive [m]`` bool.
    """
    n, D = q.shape
    q = q.double()
    k = keys.double()
    out = torch.zeros(D, D, dtype=torch.float64)
    onehot = torch.zeros(n, k.shape[0], dtype=torch.float64)
    onehot[key_record, torch.arange(k.shape[0])] = 1.0
    for sign, sel in ((1.0, positive), (-1.0, ~positive)):
        w = sel.double()
        summed = onehot @ (k * w[:, None])
        count = onehot @ w
        has = count > 0
        if has.any():
            kbar = summed[has] / count[has, None]
            out += sign * (q[has].T @ kbar) / int(has.sum())
    return out


def position_control(
    q: torch.Tensor,
    keys: torch.Tensor,
    key_record: torch.Tensor,
    positive: torch.Tensor,
    offsets: torch.Tensor,
    *,
    real_key_basis: torch.Tensor | None = None,
    n_draws: int = 20,
    seed: int = 0,
    energy: float = 0.99,
) -> dict[str, object]:
    """How much of a contrast is position (see the module docstring).

    ``offsets [m]``: each key's query–key token offset. ``real_key_basis [D, r]``: the run's
    key subspace to compare (default: the energy-rank subspace of the real ΔC of these
    vectors). Over ``n_draws`` shuffles within offset bins: ``norm_ratio`` = mean
    ‖ΔC_position‖_F / ‖ΔC_real‖_F and, for reference, ``null_ratio`` the same for labels
    shuffled ignoring offsets. The position subspace is the top-r key subspace of the mean
    position ΔC (r = the real subspace's rank); ``angles_degrees`` are its principal angles
    with the real one and ``real_energy_in_position`` = ‖ΔC_real P_pos‖²_F / ‖ΔC_real‖²_F
    (random r-dim subspace: ≈ r / D, in ``chance``). ``mixed_fraction``: share of keys in
    offset bins holding both labels (0 = labels follow the offset exactly: the records
    cannot separate position from the feature).
    """
    if not (len(keys) == len(key_record) == len(positive) == len(offsets)):
        raise ValueError("keys, key_record, positive and offsets must have one row per key")
    positive = positive.bool()
    real = record_delta(q, keys, key_record, positive)
    real_norm = float(torch.linalg.matrix_norm(real))
    D = q.shape[1]
    if real_key_basis is None or real_key_basis.shape[1] == 0:
        real_key_basis = feature_subspace(real, energy).key_basis
    r = int(real_key_basis.shape[1])
    bins = offset_bins(offsets)
    # keys in bins holding both labels: 0 = the label is a function of the offset, so
    # position and feature cannot be told apart from these records
    mixed = sum(
        int((bins == b).sum())
        for b in torch.unique(bins)
        if 0 < int(positive[bins == b].sum()) < int((bins == b).sum())
    )
    gen = torch.Generator().manual_seed(int(seed))
    pos_deltas, pos_norms, null_norms = [], [], []
    m = positive.numel()
    members = [(bins == b).nonzero().flatten() for b in torch.unique(bins)]
    for _ in range(n_draws):
        lab = positive.clone()
        for idx in members:
            lab[idx] = positive[idx[torch.randperm(idx.numel(), generator=gen)]]
        dpos = record_delta(q, keys, key_record, lab)
        pos_deltas.append(dpos)
        pos_norms.append(float(torch.linalg.matrix_norm(dpos)))
        perm = positive[torch.randperm(m, generator=gen)]
        null_norms.append(float(torch.linalg.matrix_norm(record_delta(q, keys, key_record, perm))))
    mean_pos = torch.stack(pos_deltas).mean(0)
    pos_basis = feature_subspace(mean_pos, energy, rank=max(1, min(r, D))).key_basis
    ang = principal_angles(real_key_basis.double(), pos_basis.double())
    proj = pos_basis @ pos_basis.T
    share = float(torch.linalg.matrix_norm(real @ proj) ** 2 / real_norm**2) if real_norm else None
    safe = real_norm if real_norm > 0 else math.nan
    return {
        "n_keys": m,
        "n_bins": int(torch.unique(bins).numel()),
        "mixed_fraction": mixed / max(1, int(positive.numel())),
        "n_draws": n_draws,
        "rank": r,
        "norm_ratio": sum(pos_norms) / len(pos_norms) / safe,
        "null_ratio": sum(null_norms) / len(null_norms) / safe,
        "mean_position_ratio": float(torch.linalg.matrix_norm(mean_pos)) / safe,
        "angles_degrees": [math.degrees(float(a)) for a in ang],
        "real_energy_in_position": share,
        "chance": r / D,
    }
