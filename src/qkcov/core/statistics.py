"""Significance statistics for ΔC: permutation null, parallel-analysis rank, bootstrap, swaps.

ΔC of a head is a sum of per-record terms: record i contributes its query ``q_i`` with the
mean of its positive keys ``k⁺_i`` and/or the mean of its negative keys ``k⁻_i``::

    ΔC = Σ_{i∈pos} q_i k⁺_iᵀ / N⁺ − Σ_{i∈neg} q_i k⁻_iᵀ / N⁻      (uncentred, METHOD §2)

:class:`RecordStats` keeps exactly these per-record vectors, so that ΔC can be recomputed
under relabellings (permutation null) and reweightings (bootstrap). Both are linear in the
per-record terms and are computed as batched matmuls + batched SVDs, never a Python loop
over records. Plain tensors only: nothing here imports transformers.

Null design (:func:`permutation_null`): a record with both sides has its two keys swapped
with probability ½ (a random sign); one-sided records have their side labels permuted
among the one-sided records of the same group, so N⁺ and N⁻ are preserved. Under "the
query does not tell positive keys from negative ones" both moves leave the distribution of
the data unchanged, so the permutation p-values are exact.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..artifacts import to_jsonable
from ..config import check_positive_int, check_range
from .subspace import feature_subspace, rank_at_energy

__all__ = [
    "MIN_RECORDS",
    "StatisticsWarning",
    "RecordStats",
    "NullDistribution",
    "Significance",
    "BootstrapResult",
    "permutation_null",
    "significance",
    "bootstrap",
    "paired_bootstrap_ci",
    "random_p_value",
]

MIN_RECORDS = 10
"""Fewer records than this → statistics are reported as unavailable (with a warning)."""

_F64 = torch.float64
_CHUNK_ELEMS = 1 << 24  # bound on the [batch, D, n] intermediates (128 MiB of float64)


class StatisticsWarning(UserWarning):
    """Emitted when a statistic is unavailable (too few records, null switched off, …)."""


def _unavailable(reason: str) -> str:
    warnings.warn(reason, StatisticsWarning, stacklevel=3)
    return reason


def _too_few(n: int) -> str | None:
    return f"fewer than {MIN_RECORDS} records (n={n})" if n < MIN_RECORDS else None


# --------------------------------------------------------------------------- records
@dataclass
class RecordStats:
    """Per-record query and mean keys of one head (all float64).

    Attributes:
        q: queries ``[n, D_q]``.
        k_pos: mean positive key per record ``[n, D_k]`` (zeros where ``has_pos`` is False).
        k_neg: mean negative key per record ``[n, D_k]`` (zeros where ``has_neg`` is False).
        has_pos: ``[n]`` bool, the record has positive keys.
        has_neg: ``[n]`` bool, the record has negative keys.
        group: ``[n]`` long, index into ``groups``.
        groups: group names.

    Every record needs at least one side. Memory per head is about ``n·(3D+3)·8`` bytes
    (the bool flags take 1 byte each, so :meth:`memory_bytes` is slightly less), e.g.
    240 records of a 64-dim head ≈ 375 KiB.
    """

    q: torch.Tensor
    k_pos: torch.Tensor
    k_neg: torch.Tensor
    has_pos: torch.Tensor
    has_neg: torch.Tensor
    group: torch.Tensor
    groups: list[str] = field(default_factory=lambda: ["all"])

    def __post_init__(self) -> None:
        for name in ("q", "k_pos", "k_neg"):
            x = getattr(self, name)
            if not isinstance(x, torch.Tensor) or x.ndim != 2:
                shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"RecordStats.{name} must be a 2-D tensor [n, D], got {shape}")
        n, d_k = self.q.shape[0], self.k_pos.shape[1]
        if self.k_pos.shape[0] != n or tuple(self.k_neg.shape) != (n, d_k):
            raise ValueError(
                f"RecordStats: q {list(self.q.shape)}, k_pos {list(self.k_pos.shape)} and "
                f"k_neg {list(self.k_neg.shape)} must share n (and k_pos/k_neg their D)"
            )
        flags = {}
        for name in ("has_pos", "has_neg", "group"):
            x = torch.as_tensor(getattr(self, name)).reshape(-1)
            if x.numel() != n:
                raise ValueError(f"RecordStats.{name} must have n={n} entries, got {x.numel()}")
            flags[name] = x
        self.groups = [str(g) for g in self.groups]
        if not self.groups or len(set(self.groups)) != len(self.groups):
            raise ValueError(f"RecordStats.groups must be unique names, got {self.groups}")
        self.has_pos = flags["has_pos"].to(torch.bool).cpu()
        self.has_neg = flags["has_neg"].to(torch.bool).cpu()
        self.group = flags["group"].to(torch.long).cpu()
        if n and (self.group.min() < 0 or self.group.max() >= len(self.groups)):
            raise ValueError(
                f"RecordStats.group must index groups [0, {len(self.groups)}), "
                f"got {self.group.unique().tolist()}"
            )
        if not (self.has_pos | self.has_neg).all():
            bad = torch.nonzero(~(self.has_pos | self.has_neg)).reshape(-1)[:5].tolist()
            raise ValueError(f"RecordStats: records {bad} have neither positive nor negative keys")
        self.q = self.q.detach().to("cpu", _F64)
        zero = torch.zeros((), dtype=_F64)
        self.k_pos = torch.where(self.has_pos[:, None], self.k_pos.detach().to("cpu", _F64), zero)
        self.k_neg = torch.where(self.has_neg[:, None], self.k_neg.detach().to("cpu", _F64), zero)
        for name in ("q", "k_pos", "k_neg"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"RecordStats.{name} contains NaN or inf")

    # ------------------------------------------------------------------ basics
    @property
    def n(self) -> int:
        return int(self.q.shape[0])

    def __len__(self) -> int:
        return self.n

    def memory_bytes(self) -> int:
        """Bytes held by the tensors (≈ ``n·(3D+3)·8``)."""
        return sum(
            t.element_size() * t.numel()
            for t in (self.q, self.k_pos, self.k_neg, self.has_pos, self.has_neg, self.group)
        )

    def group_mask(self, group: int | str | None) -> torch.Tensor:
        """``[n]`` bool mask of the records in ``group`` (``None``: every record)."""
        if group is None:
            return torch.ones(self.n, dtype=torch.bool)
        if isinstance(group, str):
            if group not in self.groups:
                raise ValueError(f"unknown group {group!r}; expected one of {self.groups}")
            gi = self.groups.index(group)
        elif isinstance(group, int) and not isinstance(group, bool):
            if not 0 <= group < len(self.groups):
                raise ValueError(f"group index must be in [0, {len(self.groups)}), got {group}")
            gi = group
        else:
            raise ValueError(f"group must be a name, an index or None, got {group!r}")
        return self.group == gi

    def subset(self, idx: torch.Tensor | Sequence[int]) -> RecordStats:
        """Records ``idx`` (indices or an ``[n]`` bool mask), same group names."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool and idx.numel() != self.n:
            raise ValueError(f"subset: bool mask must have n={self.n} entries, got {idx.numel()}")
        return RecordStats(
            self.q[idx],
            self.k_pos[idx],
            self.k_neg[idx],
            self.has_pos[idx],
            self.has_neg[idx],
            self.group[idx],
            list(self.groups),
        )

    def concat(self, *others: RecordStats) -> RecordStats:
        """Records of ``self`` followed by those of ``others`` (e.g. shards of one run).

        Group names are merged (order of first appearance) and indices remapped.
        """
        parts = [self, *others]
        names = list(self.groups)
        for p in others:
            if not isinstance(p, RecordStats):
                raise ValueError(f"concat expects RecordStats, got {type(p).__name__}")
            if p.q.shape[1] != self.q.shape[1] or p.k_pos.shape[1] != self.k_pos.shape[1]:
                raise ValueError(
                    f"concat: dimensions differ ({self.q.shape[1]}, {self.k_pos.shape[1]}) vs "
                    f"({p.q.shape[1]}, {p.k_pos.shape[1]})"
                )
            names += [g for g in p.groups if g not in names]
        groups = [torch.tensor([names.index(g) for g in p.groups])[p.group] for p in parts]
        return RecordStats(
            torch.cat([p.q for p in parts]),
            torch.cat([p.k_pos for p in parts]),
            torch.cat([p.k_neg for p in parts]),
            torch.cat([p.has_pos for p in parts]),
            torch.cat([p.has_neg for p in parts]),
            torch.cat(groups),
            names,
        )

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors for a safetensors file; store ``groups`` in its metadata."""
        return {
            f"{prefix}{name}": getattr(self, name).contiguous()
            for name in ("q", "k_pos", "k_neg", "has_pos", "has_neg", "group")
        }

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], groups: Sequence[str], prefix: str = ""
    ) -> RecordStats:
        """Inverse of :meth:`to_tensors` (``groups`` from the file's metadata)."""
        names = ("q", "k_pos", "k_neg", "has_pos", "has_neg", "group")
        missing = [prefix + k for k in names if prefix + k not in tensors]
        if missing:
            raise ValueError(f"RecordStats.from_tensors: missing tensors {missing}")
        return cls(*(tensors[prefix + k] for k in names), list(groups))

    # ------------------------------------------------------------------ ΔC
    def counts(self, group: int | str | None = None) -> tuple[int, int]:
        """``(N⁺, N⁻)``: records with a positive / negative side in ``group``."""
        m = self.group_mask(group)
        return int((self.has_pos & m).sum()), int((self.has_neg & m).sum())

    def delta(
        self, group: int | str | None = None, signs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ΔC ``[D_q, D_k]`` (float64, uncentred), as ``ContrastiveCovariance.delta``.

        ``signs [n]`` (±1) relabels records: −1 swaps a two-sided record's keys and moves
        a one-sided record to the other side (counts are recomputed). ``group=None`` pools.
        """
        m = self.group_mask(group)
        kp, kn, hp, hn = self.k_pos, self.k_neg, self.has_pos, self.has_neg
        if signs is not None:
            s = torch.as_tensor(signs).reshape(-1)
            if s.numel() != self.n or not ((s == 1) | (s == -1)).all():
                raise ValueError(f"signs must be [n={self.n}] values in {{-1, +1}}")
            flip = (s < 0)[:, None]
            kp, kn = torch.where(flip, kn, kp), torch.where(flip, kp, kn)
            hp, hn = torch.where(s < 0, hn, hp), torch.where(s < 0, hp, hn)
        hp, hn = hp & m, hn & m
        label = "pooled" if group is None else f"group {group!r}"
        for side, h in (("positive", hp), ("negative", hn)):
            if not h.any():
                raise ValueError(f"delta(): no {side} records for {label}")
        c_pos = self.q[hp].T @ kp[hp] / float(hp.sum())
        c_neg = self.q[hn].T @ kn[hn] / float(hn.sum())
        return c_pos - c_neg

    def _linear_terms(
        self, group: int | str | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ΔC(s) = M + Σ_i s_i q_i d_iᵀ over the records of ``group``.

        Returns ``(M [D_q, D_k], q [m, D_q], d [m, D_k], s0 [m], two_sided [m])``. Here
        ``s_i`` is a record's side (+1: its positive key, or its one key, counts as
        positive); ``s0`` the observed sides (−1 for negative-only records), so that
        ``ΔC(s) = delta(signs=s * s0)`` and ``ΔC(s0) = delta()``.
        """
        m = self.group_mask(group)
        q, kp, kn = self.q[m], self.k_pos[m], self.k_neg[m]
        hp, hn = self.has_pos[m], self.has_neg[m]
        n_pos, n_neg = int(hp.sum()), int(hn.sum())
        label = "pooled" if group is None else f"group {group!r}"
        if not n_pos or not n_neg:
            raise ValueError(f"no {'positive' if not n_pos else 'negative'} records for {label}")
        a = 0.5 * (1.0 / n_pos - 1.0 / n_neg)
        b = 0.5 * (1.0 / n_pos + 1.0 / n_neg)
        both = hp & hn
        # two-sided: (kp+kn)·a + s·(kp−kn)·b ; one-sided key k: k·a + s·k·b
        key_diff = torch.where(both[:, None], kp - kn, kp + kn)  # absent side is zero
        base = q.T @ (kp + kn) * a
        s0 = torch.where(hp, 1.0, -1.0).to(_F64)
        return base, q, key_diff * b, s0, both


# --------------------------------------------------------------------------- results
def _num(x: Any) -> Any:
    return None if x is None else to_jsonable(x)


@dataclass
class NullDistribution:
    """Permutation null of one head's ΔC.

    Attributes:
        available: False when the null was not computed (see ``reason``).
        reason: why it is unavailable ("" otherwise).
        singular_values: ``[P, min(D_q, D_k)]`` descending singular values per permutation.
        frobenius: ``[P]`` Frobenius norm per permutation.
        n_records: records used; n_permutations: P; seed; group (None = pooled).
    """

    available: bool
    reason: str = ""
    singular_values: torch.Tensor | None = None
    frobenius: torch.Tensor | None = None
    n_records: int = 0
    n_permutations: int = 0
    seed: int = 0
    group: str | int | None = None

    def quantile(self, level: float) -> torch.Tensor:
        """``[D]`` per-index quantile of the null singular values."""
        if not self.available or self.singular_values is None:
            raise ValueError(f"null distribution unavailable: {self.reason}")
        return torch.quantile(self.singular_values, level, dim=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "reason": self.reason,
            "n_records": self.n_records,
            "n_permutations": self.n_permutations,
            "seed": self.seed,
            "group": self.group,
            "singular_values": _num(self.singular_values),
            "frobenius": _num(self.frobenius),
        }


@dataclass
class Significance:
    """Is a head's ΔC distinguishable from its permutation null, and of which rank?

    Attributes:
        available: False when no null was available (``p_value``, ``rank_null`` are None).
        p_value: top singular value vs the null's top, ``(1 + #null ≥ obs) / (1 + P)``.
        p_value_frobenius: the same for the Frobenius norm.
        rank_null: parallel analysis — leading singular values above the null's
            ``1−alpha`` quantile of the same index (stops at the first that is not).
        rank_energy: ``rank_at_energy(singular_values, energy)``.
        significant: ``p_value < alpha and rank_null >= 1``.
        singular_values: observed ``[D]``; null_band: ``[2, D]`` null 5 % / 95 % quantiles.
        reason: one line when not significant or unavailable ("" otherwise).
    """

    available: bool
    significant: bool
    reason: str
    singular_values: torch.Tensor
    rank_energy: int
    p_value: float | None = None
    p_value_frobenius: float | None = None
    rank_null: int | None = None
    null_band: torch.Tensor | None = None
    alpha: float = 0.05
    energy: float = 0.99
    n_permutations: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "significant": self.significant,
            "reason": self.reason,
            "p_value": self.p_value,
            "p_value_frobenius": self.p_value_frobenius,
            "rank_null": self.rank_null,
            "rank_energy": self.rank_energy,
            "alpha": self.alpha,
            "energy": self.energy,
            "n_permutations": self.n_permutations,
            "singular_values": _num(self.singular_values),
            "null_band": _num(self.null_band),
        }


@dataclass
class BootstrapResult:
    """Record-bootstrap uncertainty of one head's ΔC spectrum, rank and key subspace.

    Attributes:
        available / reason: as in :class:`NullDistribution`.
        singular_values: full-data ``[D]``.
        singular_value_ci: ``[2, D]`` 95 % basic-bootstrap CI: 2.5 % / 97.5 % percentiles
            of the reflected resample values ``2·s − s_b`` (a resample's singular values are
            biased up by its own noise; plain percentiles missed the truth, see tests).
        rank: full-data rank under ``rank_rule`` ("null" or "energy").
        ranks: ``[B]`` rank of each resample's reflected spectrum under the same rule.
        rank_ci: ``(lo, hi)`` 2.5 % / 97.5 % percentiles of ``ranks``.
        max_angles_deg: ``[B]`` largest principal angle (degrees) between each resample's
            top-``rank`` key subspace and the full data's (None when ``rank == 0``).
        stability_deg: median of ``max_angles_deg`` (None when ``rank == 0``).
    """

    available: bool
    reason: str = ""
    n_boot: int = 0
    rank_rule: str = "null"
    singular_values: torch.Tensor | None = None
    singular_value_ci: torch.Tensor | None = None
    rank: int | None = None
    ranks: torch.Tensor | None = None
    rank_ci: tuple[int, int] | None = None
    max_angles_deg: torch.Tensor | None = None
    stability_deg: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "reason": self.reason,
            "n_boot": self.n_boot,
            "rank_rule": self.rank_rule,
            "rank": self.rank,
            "rank_ci": None if self.rank_ci is None else list(self.rank_ci),
            "stability_deg": self.stability_deg,
            "singular_values": _num(self.singular_values),
            "singular_value_ci": _num(self.singular_value_ci),
            "ranks": _num(self.ranks),
            "max_angles_deg": _num(self.max_angles_deg),
        }


# --------------------------------------------------------------------------- helpers
def _generator(seed: int) -> torch.Generator:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _batched_weighted_outer(
    w: torch.Tensor, q: torch.Tensor, k: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[b] = base + Σ_i w[b, i] q_i k_iᵀ`` for ``w [B, m]``, chunked over B."""
    bsz, m = w.shape
    out = torch.empty(bsz, q.shape[1], k.shape[1], dtype=_F64)
    step = max(1, _CHUNK_ELEMS // max(1, m * q.shape[1]))
    qt = q.T.contiguous()
    for start in range(0, bsz, step):
        wc = w[start : start + step]
        out[start : start + step] = (qt[None] * wc[:, None, :]) @ k
    return out if base is None else out + base


def _leading_above(values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Per row of ``values [..., D]``: number of LEADING entries ``> thresholds [D]``."""
    return torch.cumprod((values > thresholds).to(torch.long), dim=-1).sum(-1)


def _ranks_at_energy(singular_values: torch.Tensor, energy: float) -> torch.Tensor:
    """Row-wise :func:`rank_at_energy` of ``[B, D]`` (same tolerance)."""
    s2 = singular_values**2
    total = s2.sum(-1, keepdim=True)
    curve = torch.cumsum(s2, -1) / total.clamp_min(torch.finfo(_F64).tiny)
    ranks = (curve < energy - 1e-12).sum(-1) + 1
    return torch.where(total[:, 0] > 0, ranks, torch.zeros_like(ranks))


def _quantiles(x: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    return torch.quantile(x, torch.tensor(list(levels), dtype=_F64), dim=0)


# --------------------------------------------------------------------------- null
def _null_signs(
    s0: torch.Tensor, both: torch.Tensor, group: torch.Tensor, p: int, gen: torch.Generator
) -> torch.Tensor:
    """``[p, m]`` null signs: random for two-sided records, a within-group permutation of
    the observed ``s0`` for one-sided records (so every group keeps its N⁺ and N⁻)."""
    m = s0.numel()
    signs = s0.expand(p, m).clone()
    n_both = int(both.sum())
    if n_both:
        flips = torch.randint(0, 2, (p, n_both), generator=gen)
        signs[:, both] = (2 * flips - 1).to(_F64)
    one = torch.nonzero(~both).reshape(-1)
    if one.numel() > 1:
        # sort random keys offset by the group index: a permutation inside each group block
        grp = group[one].to(_F64)
        order = torch.argsort(grp, stable=True)
        one, grp = one[order], grp[order]
        perm = torch.argsort(grp[None] * 2.0 + torch.rand(p, one.numel(), generator=gen), dim=1)
        signs[:, one] = s0[one][perm]
    return signs


def permutation_null(
    stats: RecordStats,
    n_permutations: int = 200,
    seed: int = 0,
    group: int | str | None = None,
) -> NullDistribution:
    """Null distribution of ΔC's spectrum under side relabelling that respects the design.

    Two-sided records: random sign (keys swapped with probability ½). One-sided records:
    side labels permuted among the one-sided records of the same group (counts kept).
    ``group=None`` pools every record. ``n_permutations=0`` switches the null off.
    """
    if not isinstance(stats, RecordStats):
        raise ValueError(f"stats must be a RecordStats, got {type(stats).__name__}")
    if not isinstance(n_permutations, int) or n_permutations < 0:
        raise ValueError(f"n_permutations must be an integer >= 0, got {n_permutations!r}")
    gen = _generator(seed)
    mask = stats.group_mask(group)
    n = int(mask.sum())
    common = dict(n_records=n, n_permutations=n_permutations, seed=seed, group=group)
    if n_permutations == 0:
        return NullDistribution(
            False, _unavailable("null statistics off (n_permutations=0)"), **common
        )  # type: ignore[arg-type]
    if (why := _too_few(n)) is not None:
        return NullDistribution(False, _unavailable(why), **common)  # type: ignore[arg-type]
    base, q, d, s0, both = stats._linear_terms(group)
    signs = _null_signs(s0, both, stats.group[mask], n_permutations, gen)
    deltas = _batched_weighted_outer(signs, q, d, base)
    return NullDistribution(
        True,
        "",
        torch.linalg.svdvals(deltas),
        torch.linalg.matrix_norm(deltas),
        **common,  # type: ignore[arg-type]
    )


def _check_alpha_energy(alpha: float, energy: float) -> None:
    check_range("alpha", alpha, 0.0, 1.0, low_open=True)
    check_range("energy", energy, 0.0, 1.0, low_open=True)


def significance(
    observed_delta: torch.Tensor,
    null: NullDistribution,
    *,
    alpha: float = 0.05,
    energy: float = 0.99,
) -> Significance:
    """Test ``observed_delta [D_q, D_k]`` against ``null`` (see :class:`Significance`)."""
    if not isinstance(observed_delta, torch.Tensor) or observed_delta.ndim != 2:
        raise ValueError("observed_delta must be a 2-D tensor [D_q, D_k]")
    if not isinstance(null, NullDistribution):
        raise ValueError(f"null must be a NullDistribution, got {type(null).__name__}")
    _check_alpha_energy(alpha, energy)
    s = torch.linalg.svdvals(observed_delta.double().cpu())
    r_energy = rank_at_energy(s, energy)
    if not null.available or null.singular_values is None:
        reason = f"significance unavailable: {null.reason}"
        return Significance(False, False, reason, s, r_energy, alpha=alpha, energy=energy)
    null_s = null.singular_values
    if null_s.shape[1] != s.numel():
        raise ValueError(
            f"null has {null_s.shape[1]} singular values per permutation, observed {s.numel()}"
        )
    p_count = null_s.shape[0]
    p_top = (1 + int((null_s[:, 0] >= s[0]).sum())) / (1 + p_count)
    frob = torch.linalg.matrix_norm(observed_delta.double().cpu())
    p_frob = (1 + int((null.frobenius >= frob).sum())) / (1 + p_count)
    rank_null = int(_leading_above(s, null.quantile(1.0 - alpha)))
    significant = p_top < alpha and rank_null >= 1
    reason = "" if significant else f"no significant subspace at α={alpha:g} (p={p_top:.3g})"
    return Significance(
        True,
        significant,
        reason,
        s,
        r_energy,
        p_value=p_top,
        p_value_frobenius=p_frob,
        rank_null=rank_null,
        null_band=_quantiles(null_s, (0.05, 0.95)),
        alpha=alpha,
        energy=energy,
        n_permutations=p_count,
    )


# --------------------------------------------------------------------------- bootstrap
def bootstrap(
    stats: RecordStats,
    n_boot: int = 200,
    seed: int = 0,
    group: int | str | None = None,
    rank_rule: str = "null",
    null: NullDistribution | None = None,
    alpha: float = 0.05,
    energy: float = 0.99,
) -> BootstrapResult:
    """Resample records with replacement: CIs of the spectrum and rank, key-subspace stability.

    ``rank_rule="null"`` ranks each resample by parallel analysis against ``null`` (computed
    with 200 permutations and ``seed`` when None); ``"energy"`` uses ``rank_at_energy``.
    Resamples that lose every record of one side are dropped.
    """
    if not isinstance(stats, RecordStats):
        raise ValueError(f"stats must be a RecordStats, got {type(stats).__name__}")
    if rank_rule not in ("null", "energy"):
        raise ValueError(f"rank_rule must be 'null' or 'energy', got {rank_rule!r}")
    if not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"n_boot must be an integer >= 0, got {n_boot!r}")
    _check_alpha_energy(alpha, energy)
    gen = _generator(seed)
    mask = stats.group_mask(group)
    n = int(mask.sum())
    if n_boot == 0:
        return BootstrapResult(False, _unavailable("bootstrap off (n_boot=0)"), 0, rank_rule)
    if (why := _too_few(n)) is not None:
        return BootstrapResult(False, _unavailable(why), n_boot, rank_rule)
    full = feature_subspace(stats.delta(group), energy)
    s_full = full.singular_values
    if rank_rule == "null":
        if null is None:
            null = permutation_null(stats, 200, seed=seed, group=group)
        if not null.available:
            raise ValueError(f"bootstrap: rank_rule='null' needs an available null ({null.reason})")
        thresholds = null.quantile(1.0 - alpha)
        rank = int(_leading_above(s_full, thresholds))
    else:
        rank = full.rank

    q, kp, kn = stats.q[mask], stats.k_pos[mask], stats.k_neg[mask]
    hp, hn = stats.has_pos[mask].to(_F64), stats.has_neg[mask].to(_F64)
    draws = torch.randint(0, n, (n_boot, n), generator=gen)
    w = torch.zeros(n_boot, n, dtype=_F64).scatter_add_(1, draws, torch.ones(n_boot, n, dtype=_F64))
    n_pos, n_neg = w @ hp, w @ hn
    keep = (n_pos > 0) & (n_neg > 0)
    w, n_pos, n_neg = w[keep], n_pos[keep], n_neg[keep]
    c_pos = _batched_weighted_outer(w * hp / n_pos[:, None], q, kp)
    c_neg = _batched_weighted_outer(w * hn / n_neg[:, None], q, kn)
    _, s_b, vh_b = torch.linalg.svd(c_pos - c_neg, full_matrices=False)
    # A resample adds its own noise on top of the data's, so its singular values sit above
    # the data's as the data's sit above the truth: reflect them (basic bootstrap).
    s_ref = (2.0 * s_full - s_b).clamp_min(0.0)
    if rank_rule == "null":
        ranks = _leading_above(s_ref, thresholds)
    else:
        ranks = _ranks_at_energy(s_ref, energy)
    rank_q = torch.quantile(ranks.to(_F64), torch.tensor([0.025, 0.975], dtype=_F64))
    angles, stability = None, None
    if rank > 0:
        # key bases are orthonormal: cos θ = svdvals(V_fullᵀ V_b) (= principal_angles, batched)
        cos = torch.linalg.svdvals(full.key_basis.T @ vh_b[:, :rank].transpose(1, 2))
        angles = torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)).amax(-1))
        stability = float(angles.median())
    return BootstrapResult(
        True,
        "",
        int(keep.sum()),
        rank_rule,
        s_full,
        _quantiles(s_ref, (0.025, 0.975)),
        rank,
        ranks,
        (int(math.floor(rank_q[0])), int(math.ceil(rank_q[1]))),
        angles,
        stability,
    )


# --------------------------------------------------------------------------- swaps
def _values(name: str, values: torch.Tensor | Sequence[float]) -> torch.Tensor:
    x = torch.as_tensor(values, dtype=_F64).reshape(-1)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def paired_bootstrap_ci(
    values: torch.Tensor | Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI ``(lo, hi)`` of the mean of per-prompt ``values [n]``.

    Pass paired differences (e.g. swapped − clean per prompt). Fewer than 10 values →
    ``(nan, nan)`` with a :class:`StatisticsWarning`.
    """
    x = _values("values", values)
    check_positive_int("n_boot", n_boot)
    check_range("ci", ci, 0.0, 1.0, low_open=True)
    if (why := _too_few(x.numel())) is not None:
        _unavailable(why)
        return (math.nan, math.nan)
    gen = _generator(seed)
    means = x[torch.randint(0, x.numel(), (n_boot, x.numel()), generator=gen)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - ci) / 2, (1 + ci) / 2], dtype=_F64))
    return float(lo), float(hi)


def random_p_value(effect: float, random_effects: torch.Tensor | Sequence[float]) -> float:
    """One-sided p of ``effect`` against effects of random swaps: ``(1 + #random ≥ effect)/(1 + m)``."""
    if not math.isfinite(float(effect)):
        raise ValueError(f"effect must be a finite number, got {effect!r}")
    r = _values("random_effects", random_effects)
    return (1 + int((r >= float(effect)).sum())) / (1 + r.numel())
