"""Rotary position embedding math: frame rotations and rotary-band profiles (torch only).

A rotary embedding rotates ``P`` coordinate pairs of a head vector by the angle
``p · θ_j`` at token position ``p`` (``θ_j`` = the pair's frequency in radians per token);
the remaining ``D − 2P`` dimensions (partial rotary) are left alone. Which dimensions form a
pair is the model's *layout*:

- ``"half"`` (Llama, Mistral, Qwen, Gemma, Phi, GPT-NeoX): pair ``j`` = dims ``(j, j + P)``;
- ``"interleaved"`` (Cohere, GLM): pair ``j`` = dims ``(2j, 2j + 1)``;

in both, the rotated part is the first ``2P`` dimensions and ``(a, b) ↦ (a cos − b sin,
b cos + a sin)``. :class:`RotarySpec` holds one layer's layout and frequencies;
:func:`rotate` applies ``R(p)`` (or ``R(p)ᵀ = R(−p)``) and :func:`band_profile` splits a
subspace's energy over the pairs (and the non-rotary dimensions).

The *query frame* expresses a key in its query's rotary frame: ``k' = R(p_q)ᵀ k_post =
R(p_k − p_q) k_pre`` and ``q' = R(p_q)ᵀ q_post = q_pre``; ``q'·k' = q_post·k_post`` exactly,
because ``R`` is orthogonal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LAYOUTS", "RotarySpec", "rotate", "band_profile", "band_energy"]

LAYOUTS = ("half", "interleaved")


@dataclass(frozen=True)
class RotarySpec:
    """One layer's rotary layout.

    ``head_dim`` D; ``inv_freq [P]`` the pair frequencies θ_j (radians per token, float64);
    ``layout`` one of :data:`LAYOUTS`. The first ``2P`` dims rotate, the rest do not.
    """

    head_dim: int
    inv_freq: torch.Tensor
    layout: str = "half"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"rotary layout must be one of {LAYOUTS}, got {self.layout!r}")
        f = self.inv_freq
        if f.ndim != 1 or f.numel() < 1 or 2 * f.numel() > self.head_dim:
            raise ValueError(
                f"rotary frequencies [P] need 1 <= 2P <= head_dim={self.head_dim}, "
                f"got {list(f.shape)}"
            )
        if not bool(torch.isfinite(f).all()) or bool((f <= 0).any()):
            raise ValueError("rotary frequencies must be finite and positive")

    @property
    def n_pairs(self) -> int:
        return int(self.inv_freq.numel())

    @property
    def rotary_dim(self) -> int:
        return 2 * self.n_pairs

    def pairs(self) -> torch.Tensor:
        """``[P, 2]`` long: the two dimensions ``(a, b)`` of each pair."""
        j = torch.arange(self.n_pairs)
        if self.layout == "half":
            return torch.stack([j, j + self.n_pairs], dim=1)
        return torch.stack([2 * j, 2 * j + 1], dim=1)

    def wavelengths(self) -> torch.Tensor:
        """``[P]`` tokens per full turn of each pair (``2π / θ_j``)."""
        return 2 * math.pi / self.inv_freq.double()

    def to_dict(self) -> dict[str, object]:
        return {
            "head_dim": self.head_dim,
            "layout": self.layout,
            "rotary_dim": self.rotary_dim,
            "inv_freq": [float(x) for x in self.inv_freq],
        }


def rotate(
    x: torch.Tensor, positions: torch.Tensor | int, spec: RotarySpec, *, inverse: bool = False
) -> torch.Tensor:
    """``R(p) x`` (``inverse``: ``R(p)ᵀ x = R(−p) x``) for ``x [..., D]``.

    ``positions``: an int or a tensor broadcastable to ``x.shape[:-1]`` (any real number:
    ``p_k − p_q`` is fine). Computed in float64 and returned in ``x``'s dtype.
    """
    if x.shape[-1] != spec.head_dim:
        raise ValueError(f"vectors have {x.shape[-1]} dims, the rotary spec {spec.head_dim}")
    pos = torch.as_tensor(positions, dtype=torch.float64, device=x.device)
    ang = pos[..., None] * spec.inv_freq.to(device=x.device, dtype=torch.float64)  # [..., P]
    if inverse:
        ang = -ang
    c, s = torch.cos(ang), torch.sin(ang)
    pr = spec.pairs().to(x.device)
    out = x.double().clone()
    a, b = out[..., pr[:, 0]], out[..., pr[:, 1]]
    out[..., pr[:, 0]] = a * c - b * s
    out[..., pr[:, 1]] = b * c + a * s
    return out.to(x.dtype)


def band_energy(basis: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Share of a subspace's energy in each dimension: ``[D]``, summing to 1.

    ``basis [D, r]`` (columns = directions), ``weights [r]`` each direction's energy (e.g.
    squared singular values; default equal). A zero-rank or zero-weight basis gives zeros.
    """
    if basis.ndim != 2:
        raise ValueError(f"basis must be [D, r], got {list(basis.shape)}")
    b = basis.double()
    w = torch.ones(b.shape[1], dtype=torch.float64) if weights is None else weights.double()
    if w.shape != (b.shape[1],):
        raise ValueError(f"weights must be [{b.shape[1]}], got {list(w.shape)}")
    e = (b**2 * w[None, :]).sum(1)
    total = e.sum()
    return e / total if float(total) > 0 else torch.zeros_like(e)


def band_profile(
    basis: torch.Tensor, spec: RotarySpec, weights: torch.Tensor | None = None
) -> dict[str, object]:
    """Rotary-band profile of ``basis [D, r]`` (weights as in :func:`band_energy`).

    Returns ``{"pairs": [P] energy share per pair (ordered by pair index, i.e. from the
    highest frequency down), "non_rotary": share outside the rotary dims, "rotary": share
    inside, "positional_index": Σ_j share_j · f̂_j with f̂_j = (log θ_j − log θ_min) /
    (log θ_max − log θ_min) ∈ [0, 1] (1 = all energy in the fastest pair, 0 = all in the
    slowest or in non-rotary dims; a random direction reads ≈ 0.5 × rotary share),
    "wavelength_weighted": energy-weighted geometric mean wavelength over the rotary part
    (tokens)}``.
    """
    e = band_energy(basis, weights)
    if e.numel() != spec.head_dim:
        raise ValueError(f"basis has {e.numel()} dims, the rotary spec {spec.head_dim}")
    pr = spec.pairs()
    pairs = e[pr[:, 0]] + e[pr[:, 1]]
    rot = float(pairs.sum())
    logf = torch.log(spec.inv_freq.double())
    span = float(logf.max() - logf.min())
    fhat = (logf - logf.min()) / span if span > 0 else torch.ones_like(logf)
    wl = torch.log(spec.wavelengths())
    return {
        "pairs": [float(x) for x in pairs],
        "non_rotary": max(0.0, float(e.sum()) - rot),
        "rotary": rot,
        "positional_index": float((pairs * fhat).sum()),
        "wavelength_weighted": float(torch.exp((pairs * wl).sum() / rot)) if rot > 0 else None,
    }
