"""Low-rank query/key subspaces from a contrastive covariance (METHOD §2).

``ΔC = U S Vᵀ``; the feature's rank is the smallest r whose cumulative energy
``Σ_{i≤r} s_i² / Σ s_i²`` reaches a threshold. Plain tensors only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import check_range

__all__ = [
    "FeatureSubspace",
    "feature_subspace",
    "feature_subspaces",
    "rank_at_energy",
    "union_basis",
    "union_subspace",
    "principal_angles",
    "random_orthonormal",
    "orthonormalize",
]


@dataclass(frozen=True)
class FeatureSubspace:
    """SVD summary of one ΔC.

    Attributes:
        rank: r, the number of directions kept.
        singular_values: all singular values ``[min(d_q, d_k)]``, descending.
        query_basis: ``U[:, :r]`` ``[d_q, r]``, orthonormal columns.
        key_basis: ``V[:, :r]`` ``[d_k, r]``, orthonormal columns.
        energy_curve: cumulative energy ``[min(d_q, d_k)]``.
        energy: the threshold used to choose ``rank``.
    """

    rank: int
    singular_values: torch.Tensor
    query_basis: torch.Tensor
    key_basis: torch.Tensor
    energy_curve: torch.Tensor
    energy: float

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors for a safetensors artifact (rank/energy go in JSON or metadata)."""
        return {
            f"{prefix}singular_values": self.singular_values,
            f"{prefix}query_basis": self.query_basis,
            f"{prefix}key_basis": self.key_basis,
            f"{prefix}energy_curve": self.energy_curve,
        }

    def summary(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "energy": self.energy,
            "singular_values": self.singular_values.tolist(),
            "energy_curve": self.energy_curve.tolist(),
        }


def _energy_curve(singular_values: torch.Tensor) -> torch.Tensor:
    """Cumulative energy ``Σ_{i≤r} s_i² / Σ s_i²`` (zeros for an all-zero spectrum).

    The values are divided by the largest before squaring, so huge (1e300) or tiny (1e-300)
    spectra neither overflow to inf nor underflow to 0.
    """
    s = singular_values.double().abs()
    if not torch.isfinite(s).all():
        raise ValueError("singular values contain NaN or inf")
    top = s.max() if s.numel() else s.new_zeros(())
    if top <= 0:
        return torch.zeros_like(s)
    s2 = (s / top) ** 2
    return torch.cumsum(s2, 0) / s2.sum()


def rank_at_energy(singular_values: torch.Tensor, energy: float = 0.99) -> int:
    """Smallest r with ``Σ_{i≤r} s_i² / Σ s_i² ≥ energy`` (0 for an all-zero spectrum)."""
    check_range("energy", energy, 0.0, 1.0, low_open=True)
    curve = _energy_curve(singular_values)
    if not curve.numel() or curve[-1] <= 0:
        return 0
    # tolerance so that energy=1.0 does not demand beyond-rounding precision
    return int((curve < energy - 1e-12).sum().item()) + 1


def feature_subspace(
    delta: torch.Tensor, energy: float = 0.99, rank: int | None = None
) -> FeatureSubspace:
    """SVD of ``delta [d_q, d_k]``; keep the rank reaching ``energy`` (or a fixed ``rank``)."""
    if not isinstance(delta, torch.Tensor) or delta.ndim != 2:
        shape = list(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"delta must be a 2-D tensor [d_q, d_k], got {shape}")
    if not torch.isfinite(delta).all():
        raise ValueError("delta contains NaN or inf")
    return feature_subspaces(delta[None], energy, rank)[0]


def feature_subspaces(
    deltas: torch.Tensor, energy: float = 0.99, rank: int | None = None
) -> list[FeatureSubspace]:
    """:func:`feature_subspace` of each ``deltas[i]`` of ``deltas [B, d_q, d_k]``, from one
    batched SVD (e.g. a null's label-permuted ΔCs)."""
    if not isinstance(deltas, torch.Tensor) or deltas.ndim != 3:
        shape = list(deltas.shape) if isinstance(deltas, torch.Tensor) else type(deltas).__name__
        raise ValueError(f"deltas must be a 3-D tensor [B, d_q, d_k], got {shape}")
    if not torch.isfinite(deltas).all():
        raise ValueError("deltas contain NaN or inf")
    check_range("energy", energy, 0.0, 1.0, low_open=True)
    u, s, vh = torch.linalg.svd(deltas.double(), full_matrices=False)
    if rank is not None and not 0 <= rank <= s.shape[-1]:
        raise ValueError(f"rank must be in [0, {s.shape[-1]}], got {rank}")
    out = []
    for i in range(deltas.shape[0]):
        r = rank_at_energy(s[i], energy) if rank is None else rank
        out.append(
            FeatureSubspace(
                rank=r,
                singular_values=s[i],
                query_basis=u[i, :, :r].contiguous(),
                key_basis=vh[i, :r].T.contiguous(),
                energy_curve=_energy_curve(s[i]),
                energy=float(energy),
            )
        )
    return out


def orthonormalize(basis: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """Orthonormal basis ``[d, r']`` of the column span of ``basis [d, r]`` (r' = numerical rank)."""
    if basis.ndim != 2:
        raise ValueError(f"basis must be 2-D [d, r], got {list(basis.shape)}")
    if basis.shape[1] == 0:
        return basis.double()
    u, s, _ = torch.linalg.svd(basis.double(), full_matrices=False)
    keep = s > tol * max(float(s[0]), 1.0) if s.numel() else s.bool()
    return u[:, keep].contiguous()


def union_basis(bases: Sequence[torch.Tensor], tol: float = 1e-8) -> torch.Tensor:
    """Stack several ``[d, r_i]`` bases and re-orthonormalise into one ``[d, r]`` basis."""
    if not bases:
        raise ValueError("union_basis needs at least one basis")
    dims = {b.shape[0] for b in bases}
    if len(dims) != 1:
        raise ValueError(f"bases must share their first dimension, got {sorted(dims)}")
    return orthonormalize(torch.cat([b.double() for b in bases], dim=1), tol)


def union_subspace(
    subspaces: Sequence[FeatureSubspace], tol: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of several feature subspaces: ``(query_basis [d_q, r], key_basis [d_k, r'])``."""
    return (
        union_basis([s.query_basis for s in subspaces], tol),
        union_basis([s.key_basis for s in subspaces], tol),
    )


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of ``a [d, r_a]`` and ``b [d, r_b]``."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"bases must be [d, r] with equal d, got {list(a.shape)} and {list(b.shape)}"
        )
    qa, qb = orthonormalize(a), orthonormalize(b)
    if qa.shape[1] == 0 or qb.shape[1] == 0:
        return torch.empty(0, dtype=torch.float64)
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.arccos(cos)


def random_orthonormal(
    dim: int,
    rank: int,
    seed: int | torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Haar-random orthonormal basis ``[dim, rank]`` (QR of a Gaussian matrix, sign-fixed)."""
    if not (isinstance(dim, int) and dim >= 1):
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if not (isinstance(rank, int) and 0 <= rank <= dim):
        raise ValueError(f"rank must be an integer in [0, {dim}], got {rank!r}")
    gen = (
        seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed or 0))
    )
    g = torch.randn(dim, rank, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.to(dtype)


def energy_ordered_union(subspaces: Sequence[FeatureSubspace], side: str = "key") -> torch.Tensor:
    """Union of several subspaces ordered by energy ``[D, r]``: left singular vectors of
    ``[B_1 S_1, B_2 S_2, ...]`` (each basis weighted by its singular values), so the first
    columns are the union's dominant directions. ``side`` is ``"key"`` or ``"query"``."""
    if side not in ("key", "query"):
        raise ValueError(f"side must be 'key' or 'query', got {side!r}")
    cols = [getattr(s, f"{side}_basis") * s.singular_values[: s.rank] for s in subspaces]
    cols = [c.double() for c in cols if c.shape[1] > 0]
    if not cols:
        d = getattr(subspaces[0], f"{side}_basis").shape[0] if subspaces else 0
        return torch.zeros(d, 0, dtype=torch.float64)
    u, sv, _ = torch.linalg.svd(torch.cat(cols, 1), full_matrices=False)
    return u[:, sv > 1e-10 * max(float(sv[0]), 1e-300)]


def top_directions(basis: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """First ``k`` columns of ``basis`` ``[D, k]``, completed with seeded random directions
    orthogonal to it when its rank is below ``k`` (for fixed-size projections)."""
    d = basis.shape[0]
    b = basis[:, :k].double()
    if b.shape[1] < k:
        extra = random_orthonormal(d, k, seed=seed)
        if b.shape[1]:
            extra = extra - b @ (b.T @ extra)
        b = union_basis([b, extra])[:, :k] if b.shape[1] else extra
    return b
