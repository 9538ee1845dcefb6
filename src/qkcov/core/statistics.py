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

Duplicates: records with identical ``q``, ``k±``, sides and group are one *unit* — they
share their relabelling in the null and are resampled together by the bootstrap (a
:class:`StatisticsWarning` says so). Repeating every record three times thus leaves the
test, the rank and its CI exactly as they were.

Rank test (:func:`significance`): the null's centred matrices ``ΔC(s) − E₀ΔC`` are whitened
on both sides by the null's own second moments ``Σ_q = Σ v_i |d_i|² q_i q_iᵀ`` and
``Σ_k = Σ v_i |q_i|² d_i d_iᵀ`` (invariant under the relabellings, so the test stays
exact). A shared query direction or a high-variance key direction that dominates the raw
null no longer hides weaker directions. The rank is then found by a sequential deflated
test: step ``k`` compares the observed ``k``-th whitened singular value with the top
singular value of the null deflated by the observed first ``k−1`` directions (both sides
projected out), and the rank is the number of leading steps with ``p < α``. Directions
that are numerically zero (< 1e-10 of the first) never count.
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
    "duplicates_note",
]

MIN_RECORDS = 10
"""Fewer records than this → statistics are reported as unavailable (with a warning)."""

_F64 = torch.float64
_CHUNK_ELEMS = 1 << 24  # bound on the [batch, D, n] intermediates (128 MiB of float64)
_ZERO_REL = 1e-10  # singular values below this fraction of the first are numerically zero
_EIG_FLOOR = 1e-8  # whitening: eigenvalues floored at this fraction of the largest
_CLIP = 4.0  # whitening: eigenvalues raised to at least this multiple of the median spanned one
_MARGIN = 0.9  # sequential test: deflated null tops recomputed down to this fraction of s_k


class StatisticsWarning(UserWarning):
    """Emitted when a statistic is unavailable (too few records, null switched off, …)."""


def _unavailable(reason: str) -> str:
    warnings.warn(reason, StatisticsWarning, stacklevel=3)
    return reason


def _too_few(n: int, distinct: int | None = None) -> str | None:
    if n < MIN_RECORDS:
        return f"fewer than {MIN_RECORDS} records (n={n})"
    if distinct is not None and distinct < MIN_RECORDS:
        return f"fewer than {MIN_RECORDS} distinct records (n={n}, {distinct} distinct)"
    return None


def duplicates_note(n: int, distinct: int) -> str:
    """The one line said when ``n - distinct`` of ``n`` records are exact duplicates."""
    return (
        f"{n - distinct} of {n} records duplicate others exactly ({distinct} distinct); the "
        "null and bootstrap treat each set of identical records as one unit"
    )


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

    def units(self, group: int | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sets of identical records of ``group`` (same q, k⁺, k⁻, sides and group).

        Returns ``(unit [m], first [U])``: the unit of each of the group's ``m`` records,
        numbered in order of first appearance, and the position (within the group) of each
        unit's first record. Values are compared after rounding to float32, the precision
        of captured activations. Without duplicates ``unit = arange(m)``.
        """
        m = self.group_mask(group)
        rows = torch.cat(
            [
                self.q[m].float(),
                self.k_pos[m].float(),
                self.k_neg[m].float(),
                torch.stack([self.has_pos[m], self.has_neg[m], self.group[m]], 1).float(),
            ],
            1,
        )
        if rows.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty
        _, inverse = torch.unique(rows, dim=0, return_inverse=True)
        n_u = int(inverse.max()) + 1
        pos = torch.arange(rows.shape[0])
        first = torch.full((n_u,), rows.shape[0], dtype=torch.long).scatter_reduce(
            0, inverse, pos, "amin"
        )
        order = torch.argsort(first)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n_u)
        return rank[inverse], first[order]

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
        n_distinct: distinct records (units of identical records, see module doc).
        whitened: ``[P, D_q, D_k]`` centred, whitened null matrices (the rank test's null;
            not saved). center: ``[D_q, D_k]`` the null mean ``E₀ΔC``; whiten_q ``[D_q, D_q]``,
            whiten_k ``[D_k, D_k]`` and scale: the whitening ``√τ·W_q (ΔC − center) W_k``.
            ``None`` on hand-made nulls (then :func:`significance` falls back to parallel
            analysis of ``singular_values``).
    """

    available: bool
    reason: str = ""
    singular_values: torch.Tensor | None = None
    frobenius: torch.Tensor | None = None
    n_records: int = 0
    n_permutations: int = 0
    seed: int = 0
    group: str | int | None = None
    n_distinct: int | None = None
    whitened: torch.Tensor | None = field(default=None, repr=False)
    center: torch.Tensor | None = field(default=None, repr=False)
    whiten_q: torch.Tensor | None = field(default=None, repr=False)
    whiten_k: torch.Tensor | None = field(default=None, repr=False)
    scale: float = 1.0

    def quantile(self, level: float) -> torch.Tensor:
        """``[D]`` per-index quantile of the null singular values."""
        if not self.available or self.singular_values is None:
            raise ValueError(f"null distribution unavailable: {self.reason}")
        return torch.quantile(self.singular_values, level, dim=0)

    def whiten(self, delta: torch.Tensor) -> torch.Tensor:
        """The observed ``delta [D_q, D_k]`` in the whitened coordinates of :attr:`whitened`."""
        if self.whitened is None:
            raise ValueError("this null carries no whitening (built by hand?)")
        x = delta.to("cpu", _F64) - self.center
        return self.scale * (self.whiten_q @ x @ self.whiten_k)

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "reason": self.reason,
            "n_records": self.n_records,
            "n_distinct": self.n_distinct,
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
        p_value: the rank test's first step: the top whitened singular value vs the null's
            top, ``(1 + #null ≥ obs) / (1 + P)`` (raw top on hand-made nulls).
        p_value_frobenius: the same for the raw Frobenius norm.
        p_value_raw_top: raw (unwhitened) top singular value vs the raw null's top.
        rank_null: sequential deflated test (module doc): leading steps with ``p < alpha``;
            parallel analysis of the raw spectrum on hand-made nulls.
        rank_parallel: raw parallel analysis — leading singular values above the null's
            ``1−alpha`` quantile of the same index (the former rule, kept for comparison).
        step_p_values: p of each step of the sequential test (up to the first failure).
        rank_energy: ``rank_at_energy(singular_values, energy)``.
        significant: ``p_value < alpha and rank_null >= 1``.
        singular_values: observed ``[D]``; null_band: ``[2, D]`` raw null 5 % / 95 % quantiles
            of each index; ``to_dict`` adds ``step_null_band`` ``[3, K]``: per step of the
            sequential test, its deflated whitened null's 5 %, 95 % and (1 − α) quantiles.
        whitened_singular_values: observed whitened ``[D]`` (None on hand-made nulls).
        n_records / n_distinct: records and distinct records (units) behind the null.
        reason: one line when not significant or unavailable ("" otherwise).
        step_null: ``[K, P]`` deflated null tops of each step (for :func:`bootstrap`).
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
    p_value_raw_top: float | None = None
    rank_parallel: int | None = None
    step_p_values: list[float] = field(default_factory=list)
    whitened_singular_values: torch.Tensor | None = None
    n_records: int = 0
    n_distinct: int | None = None
    test: str = ""
    step_null: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "significant": self.significant,
            "reason": self.reason,
            "test": self.test,
            "p_value": self.p_value,
            "p_value_frobenius": self.p_value_frobenius,
            "p_value_raw_top": self.p_value_raw_top,
            "rank_null": self.rank_null,
            "rank_parallel": self.rank_parallel,
            "rank_energy": self.rank_energy,
            "step_p_values": list(self.step_p_values),
            "alpha": self.alpha,
            "energy": self.energy,
            "n_permutations": self.n_permutations,
            "n_records": self.n_records,
            "n_distinct": self.n_distinct,
            "singular_values": _num(self.singular_values),
            "whitened_singular_values": _num(self.whitened_singular_values),
            "null_band": _num(self.null_band),
            # the rule's own null: per step k of the sequential test, the deflated whitened
            # null tops' 5 % / 95 % / (1 − α) quantiles ([3, K]; None without whitening)
            "step_null_band": None
            if self.step_null is None or self.step_null.shape[0] == 0
            else _num(_quantiles(self.step_null.T, (0.05, 0.95, 1.0 - self.alpha))),
        }


@dataclass
class BootstrapResult:
    """Record-bootstrap uncertainty of one head's ΔC spectrum, rank and key subspace.

    Units of identical records are resampled together (module doc).

    Attributes:
        available / reason: as in :class:`NullDistribution`.
        singular_values: full-data ``[D]``.
        singular_value_ci: ``[2, D]`` 95 % basic-bootstrap CI: 2.5 % / 97.5 % percentiles
            of the reflected resample values ``2·s − s_b`` (a resample's singular values are
            biased up by its own noise; plain percentiles missed the truth, see tests).
        rank: full-data rank under ``rank_rule`` ("null": the sequential test of
            :func:`significance`, 0 when not significant; "energy").
        ranks: ``[B]`` the same rule on each resample. Null rule: the resample's centred ΔC
            is whitened as the data's and scaled by its own null scale (weights², so
            repeated draws count as the clusters they are), and its ``k``-th value compared
            with the full data's step-``k`` null (steps past those computed use the last).
            A resample holds ~63 % distinct records, so its noise is less spread than the
            data's: with few records per dimension the upper end can exceed 0 on noise
            (e.g. [0, 5] at 70 records, D = 64). Energy rule: ``rank_at_energy`` of the
            reflected spectrum.
        rank_ci: ``(lo, hi)`` 2.5 % / 97.5 % percentiles of ``ranks``, widened to hold
            ``rank`` (the point rank always lies in its interval).
        rank_ci_percentile: the percentiles before widening.
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
    rank_ci_percentile: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "reason": self.reason,
            "n_boot": self.n_boot,
            "rank_rule": self.rank_rule,
            "rank": self.rank,
            "rank_ci": None if self.rank_ci is None else list(self.rank_ci),
            "rank_ci_percentile": None
            if self.rank_ci_percentile is None
            else list(self.rank_ci_percentile),
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


def _inv_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """Clipped whitening of symmetric PSD ``cov [D, D]``: ``cov^{-1/2}`` with every
    eigenvalue raised to at least ``_CLIP ×`` the median of those the data spans (above
    ``_EIG_FLOOR`` of the largest; fewer records than dimensions leave the rest at zero).
    Only directions whose null variance stands far above the typical one (a shared query
    direction, a loud key direction) are shrunk; the rest keep their relative scale, so a
    feature that adds variance to its own directions does not studentise itself away."""
    evals, evecs = torch.linalg.eigh(cov)
    top = float(evals.max().clamp_min(torch.finfo(_F64).tiny))
    spanned = evals[evals > _EIG_FLOOR * top]
    ref = max(_CLIP * float(spanned.median()) if spanned.numel() else top, _EIG_FLOOR * top)
    inv = evals.clamp_min(ref).rsqrt()
    return (evecs * inv[None, :]) @ evecs.T


def _numerical_rank(s: torch.Tensor) -> torch.Tensor:
    """Entries of descending ``s [..., D]`` above ``_ZERO_REL`` of the first (0 if all zero)."""
    first = s[..., :1]
    return ((s > _ZERO_REL * first) & (first > 0)).sum(-1)


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


@dataclass
class _UnitTerms:
    """ΔC(s) = base + Σ_u s_u q_u d_uᵀ over units of identical records (``d_u`` = the
    unit's size × its record's ``d``); ``e``/``v``: null mean / variance of ``s_u``;
    ``strata``: permutation blocks of one-sided units (group × unit size)."""

    base: torch.Tensor
    q: torch.Tensor
    d: torch.Tensor
    s0: torch.Tensor
    both: torch.Tensor
    strata: torch.Tensor
    e: torch.Tensor
    v: torch.Tensor
    unit: torch.Tensor  # [m] unit of each record of the group
    n_records: int

    @property
    def n_units(self) -> int:
        return int(self.q.shape[0])

    def center(self) -> torch.Tensor:
        """Null mean ``E₀ΔC = base + Σ e_u q_u d_uᵀ``."""
        return self.base + (self.q * self.e[:, None]).T @ self.d

    def whitening(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W_q, W_k, √τ)``: clipped inverse square roots of the null's second moments
        ``Σ_q = Σ v_u |d_u|² q_u q_uᵀ``, ``Σ_k = Σ v_u |q_u|² d_u d_uᵀ`` and
        ``τ = tr Σ_q``; ``√τ·W_q X W_k`` does not depend on the scale of X."""
        q2, d2 = (self.q**2).sum(1), (self.d**2).sum(1)
        cov_q = (self.q * (self.v * d2)[:, None]).T @ self.q
        cov_k = (self.d * (self.v * q2)[:, None]).T @ self.d
        tau = (self.v * q2 * d2).sum()
        return _inv_sqrt(cov_q), _inv_sqrt(cov_k), tau.clamp_min(0).sqrt()


def _unit_terms(stats: RecordStats, group: int | str | None) -> _UnitTerms:
    base, q, d, s0, both = stats._linear_terms(group)
    unit, first = stats.units(group)
    size = torch.bincount(unit, minlength=first.numel())
    grp = stats.group[stats.group_mask(group)][first]
    strata = grp * (int(size.max()) + 1) + size
    qu, du, s0u, bothu = q[first], d[first] * size[:, None].to(_F64), s0[first], both[first]
    e = torch.zeros_like(s0u)
    one = ~bothu
    if one.any():
        ids, inv = torch.unique(strata[one], return_inverse=True)
        sums = torch.zeros(ids.numel(), dtype=_F64).index_add_(0, inv, s0u[one])
        cnt = torch.bincount(inv, minlength=ids.numel()).to(_F64)
        e[one] = (sums / cnt)[inv]
    return _UnitTerms(base, qu, du, s0u, bothu, strata, e, 1.0 - e**2, unit, int(q.shape[0]))


def permutation_null(
    stats: RecordStats,
    n_permutations: int = 200,
    seed: int = 0,
    group: int | str | None = None,
) -> NullDistribution:
    """Null distribution of ΔC's spectrum under side relabelling that respects the design.

    Two-sided records: random sign (keys swapped with probability ½). One-sided records:
    side labels permuted among the one-sided records of the same group (counts kept).
    Identical records move together (one sign / one label per unit; units of one size are
    permuted among themselves), with a :class:`StatisticsWarning` naming how many.
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
    t = _unit_terms(stats, group)
    common["n_distinct"] = t.n_units
    if (why := _too_few(n, t.n_units)) is not None:
        return NullDistribution(False, _unavailable(why), **common)  # type: ignore[arg-type]
    if t.n_units < n:
        _unavailable(duplicates_note(n, t.n_units))
    signs = _null_signs(t.s0, t.both, t.strata, n_permutations, gen)
    centred = _batched_weighted_outer(signs - t.e, t.q, t.d)
    center = t.center()
    deltas = centred + center
    wq, wk, scale = t.whitening()
    return NullDistribution(
        True,
        "",
        torch.linalg.svdvals(deltas),
        torch.linalg.matrix_norm(deltas),
        whitened=float(scale) * (wq @ centred @ wk),
        center=center,
        whiten_q=wq,
        whiten_k=wk,
        scale=float(scale),
        **common,  # type: ignore[arg-type]
    )


def _check_alpha_energy(alpha: float, energy: float) -> None:
    check_range("alpha", alpha, 0.0, 1.0, low_open=True)
    check_range("energy", energy, 0.0, 1.0, low_open=True)


def _count_p(null: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """``(1 + #null ≥ obs) / (1 + P)`` for ``null [P]`` and any-shaped ``observed``."""
    hits = (null.reshape(-1, *([1] * observed.ndim)) >= observed).sum(0)
    return (1 + hits).to(_F64) / (1 + null.numel())


def _top_singular(m: torch.Tensor) -> torch.Tensor:
    """The largest singular value of each matrix of ``m [..., a, b]``: the root of the top
    eigenvalue of its Gram matrix (``svdvals(m)[..., 0]`` to rounding, at about ⅔ of the cost
    for the null's batches of square matrices)."""
    g = m @ m.mT if m.shape[-2] <= m.shape[-1] else m.mT @ m
    return torch.linalg.eigvalsh(g)[..., -1].clamp_min(0.0).sqrt()


def _sequential(
    w_obs: torch.Tensor, w_null: torch.Tensor, alpha: float, max_rank: int
) -> tuple[int, list[float], torch.Tensor, torch.Tensor]:
    """Sequential deflated test of whitened ``w_obs`` against ``w_null [P, D_q, D_k]``.

    Step k (0-based) projects the observed first ``k`` left/right singular directions out
    of every null matrix and compares the observed ``s_k`` with the deflated null's top.
    Deflating more only lowers a draw's top, so a draw already below ``_MARGIN·s_k`` at the
    previous step keeps that value as a bound (exact for every comparison down to
    ``_MARGIN·s_k``, conservative below) instead of a new SVD.
    Returns ``(rank, step p-values, step nulls [K, P], observed whitened spectrum)``.
    """
    u, s, vh = torch.linalg.svd(w_obs, full_matrices=True)
    limit = min(max_rank, int(_numerical_rank(s)))
    tops, ps = [], []
    top = None
    rotated = None  # the null in the observed singular bases: step k deflates to [k:, k:]
    for k in range(limit):
        if top is None:
            top = _top_singular(w_null)
        else:
            top = top.clone()
            todo = top >= _MARGIN * s[k]
            if todo.any():
                if rotated is None:
                    rotated = u.T @ w_null @ vh.mT
                top[todo] = _top_singular(rotated[todo, k:, k:])
        p = float(_count_p(top, s[k]))
        tops.append(top)
        ps.append(p)
        if p >= alpha:
            break
    rank = sum(p < alpha for p in ps)  # the loop stops at the first failure
    step_null = torch.stack(tops) if tops else torch.zeros(0, w_null.shape[0], dtype=_F64)
    return rank, ps, step_null, s


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
    delta = observed_delta.double().cpu()
    s = torch.linalg.svdvals(delta)
    r_energy = rank_at_energy(s, energy)
    if not null.available or null.singular_values is None:
        reason = f"significance unavailable: {null.reason}"
        out = Significance(False, False, reason, s, r_energy, alpha=alpha, energy=energy)
        out.n_records, out.n_distinct = null.n_records, null.n_distinct
        return out
    null_s = null.singular_values
    if null_s.shape[1] != s.numel():
        raise ValueError(
            f"null has {null_s.shape[1]} singular values per permutation, observed {s.numel()}"
        )
    p_count = null_s.shape[0]
    p_raw = float(_count_p(null_s[:, 0], s[0]))
    p_frob = float(_count_p(null.frobenius, torch.linalg.matrix_norm(delta)))
    raw_ok = int(_numerical_rank(s))
    rank_parallel = min(int(_leading_above(s, null.quantile(1.0 - alpha))), raw_ok)
    white_s = step_null = None
    if null.whitened is not None:
        test = "whitened sequential deflated permutation test"
        centred_rank = int(_numerical_rank(torch.linalg.svdvals(delta - null.center)))
        rank_null, steps, step_null, white_s = _sequential(
            null.whiten(delta), null.whitened, alpha, centred_rank
        )
        p_top = steps[0] if steps else 1.0
    else:
        test = "parallel analysis (raw spectrum)"
        rank_null, p_top, steps = rank_parallel, p_raw, [p_raw]
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
        p_value_raw_top=p_raw,
        rank_parallel=rank_parallel,
        step_p_values=steps,
        whitened_singular_values=white_s,
        test=test,
        step_null=step_null,
        n_records=null.n_records,
        n_distinct=null.n_distinct,
    )


# --------------------------------------------------------------------------- bootstrap
def _rank_ci(ranks: torch.Tensor, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """2.5 / 97.5 % percentiles of ``ranks``, and the same widened to hold ``rank``."""
    rank_q = torch.quantile(ranks.to(_F64), torch.tensor([0.025, 0.975], dtype=_F64))
    lo, hi = int(math.floor(rank_q[0])), int(math.ceil(rank_q[1]))
    return (lo, hi), (min(lo, rank), max(hi, rank))


def _resample_null_ranks(
    t: _UnitTerms, w: torch.Tensor, null: NullDistribution, sig: Significance, alpha: float
) -> torch.Tensor:
    """Null-rule rank of each resample (unit weights ``w [B, U]``, see BootstrapResult).

    A resample is whitened as the data and rescaled by its own null scale: a unit drawn
    ``w`` times adds ``w²`` to the null variance, so repeated draws count as the clusters
    they are and the resample's noise sits where the data's null expects it."""
    step_null = sig.step_null
    if step_null is None or step_null.shape[0] == 0 or null.whitened is None:
        return torch.zeros(w.shape[0], dtype=torch.long)  # rank 0, or a hand-made null
    centred = _batched_weighted_outer(w * (t.s0 - t.e), t.q, t.d)
    white = null.scale * (null.whiten_q @ centred @ null.whiten_k)
    per_unit = t.v * (t.q**2).sum(1) * (t.d**2).sum(1)
    rescale = (per_unit.sum() / (w**2 @ per_unit).clamp_min(torch.finfo(_F64).tiny)).sqrt()
    s_b = torch.linalg.svdvals(rescale[:, None, None] * white)
    # steps beyond those computed use the last one (deflated tops only shrink with k)
    k_all = s_b.shape[1]
    idx = torch.arange(k_all).clamp_max(step_null.shape[0] - 1)
    p = torch.stack([_count_p(step_null[i], s_b[:, k]) for k, i in enumerate(idx.tolist())], 1)
    zero = _numerical_rank(s_b)  # numerically-zero never count (clipping never amplifies)
    ok = (p < alpha) & (torch.arange(k_all) < zero[:, None])
    return torch.cumprod(ok.to(torch.long), dim=1).sum(1)


def bootstrap(
    stats: RecordStats,
    n_boot: int = 200,
    seed: int = 0,
    group: int | str | None = None,
    rank_rule: str = "null",
    null: NullDistribution | None = None,
    alpha: float = 0.05,
    energy: float = 0.99,
    sig: Significance | None = None,
) -> BootstrapResult:
    """Resample records with replacement: CIs of the spectrum and rank, key-subspace stability.

    Units of identical records are drawn as one. ``rank_rule="null"`` ranks the data and
    each resample by the test of :func:`significance` against ``null`` (computed with 200
    permutations and ``seed`` when None); ``"energy"`` uses ``rank_at_energy``. The rank CI
    always holds the point rank. Resamples that lose every record of one side are dropped.
    ``sig``: :func:`significance` of this ΔC against ``null`` when already computed.
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
    t = _unit_terms(stats, group)
    if (why := _too_few(n, t.n_units)) is not None:
        return BootstrapResult(False, _unavailable(why), n_boot, rank_rule)
    delta = stats.delta(group)
    full = feature_subspace(delta, energy)
    s_full = full.singular_values
    if rank_rule == "null":
        if null is None:
            null = permutation_null(stats, 200, seed=seed, group=group)
        if not null.available:
            raise ValueError(f"bootstrap: rank_rule='null' needs an available null ({null.reason})")
        if sig is None or sig.alpha != alpha or sig.n_permutations != null.n_permutations:
            sig = significance(delta, null, alpha=alpha, energy=energy)
        rank = int(sig.rank_null) if sig.significant else 0
    else:
        rank = full.rank

    q, kp, kn = stats.q[mask], stats.k_pos[mask], stats.k_neg[mask]
    hp, hn = stats.has_pos[mask].to(_F64), stats.has_neg[mask].to(_F64)
    n_u = t.n_units
    draws = torch.randint(0, n_u, (n_boot, n_u), generator=gen)
    w_u = torch.zeros(n_boot, n_u, dtype=_F64).scatter_add_(
        1, draws, torch.ones(n_boot, n_u, dtype=_F64)
    )
    w = w_u[:, t.unit]  # every record of a unit carries the unit's weight
    n_pos, n_neg = w @ hp, w @ hn
    keep = (n_pos > 0) & (n_neg > 0)
    w, w_u, n_pos, n_neg = w[keep], w_u[keep], n_pos[keep], n_neg[keep]
    c_pos = _batched_weighted_outer(w * hp / n_pos[:, None], q, kp)
    c_neg = _batched_weighted_outer(w * hn / n_neg[:, None], q, kn)
    _, s_b, vh_b = torch.linalg.svd(c_pos - c_neg, full_matrices=False)
    # A resample adds its own noise on top of the data's, so its singular values sit above
    # the data's as the data's sit above the truth: reflect them (basic bootstrap).
    s_ref = (2.0 * s_full - s_b).clamp_min(0.0)
    if rank_rule == "null":
        ranks = _resample_null_ranks(t, w_u, null, sig, alpha)  # type: ignore[arg-type]
    else:
        ranks = _ranks_at_energy(s_ref, energy)
    percentile, rank_ci = _rank_ci(ranks, rank)
    angles, stability = None, None
    if rank > 0:
        # key bases are orthonormal: cos θ = svdvals(V_fullᵀ V_b) (= principal_angles, batched)
        basis = feature_subspace(delta, energy, rank=rank).key_basis
        cos = torch.linalg.svdvals(basis.T @ vh_b[:, :rank].transpose(1, 2))
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
        rank_ci,
        angles,
        stability,
        percentile,
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
    """One-sided p of ``effect`` against effects of random swaps: ``(1 + #random ≥ effect)/(1 + m)``.

    Draws within ``1e-9·max(1, |effect|)`` of the effect count as ties (≥): a relabelling that
    reproduces the real labels (a conditional null whose strata fix them) gives the real
    effect up to float rounding, and must not look smaller."""
    if not math.isfinite(float(effect)):
        raise ValueError(f"effect must be a finite number, got {effect!r}")
    r = _values("random_effects", random_effects)
    tol = 1e-9 * max(1.0, abs(float(effect)))
    return (1 + int((r >= float(effect) - tol).sum())) / (1 + r.numel())
