"""Key edits on ``[..., S, D]`` tensors shared by the integrations (torch only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.intervention import swap_in_subspace


def checked(subspace, model=None) -> None:
    """The subspace validated before any hook is built (orthonormal finite bases, ranks,
    head in range, post-RoPE frame), against ``model`` (an HF module) or else the
    ``model_info`` it records; rank 0 refused. One ``ValueError`` naming the field."""
    subspace.check_model(model if model is not None else dict(subspace.model_info))
    if subspace.rank == 0:
        raise ValueError(
            f"subspace {subspace.name} {subspace.feature!r} has rank 0: nothing to edit"
        )


def kv_head(subspace) -> int:
    """The kv head holding the subspace's query head's keys (GQA: ``head // group``)."""
    n_heads = subspace.model_info.get("n_heads")
    n_kv = subspace.model_info.get("n_kv_heads") or n_heads
    if not n_heads:
        return subspace.head
    return subspace.head // (int(n_heads) // int(n_kv))


def positions(pos: int | Sequence[int], B: int, S: int) -> list[int]:
    ps = [pos] * B if isinstance(pos, int) else list(pos)
    if len(ps) != B:
        raise ValueError(f"got {len(ps)} positions for a batch of {B}")
    for p in ps:
        if not -S <= int(p) < S:
            raise ValueError(f"position {p} is outside the sequence of length {S}")
    return [int(p) % S for p in ps]


def swap_rows(k: torch.Tensor, basis: torch.Tensor, pos_a, pos_b) -> torch.Tensor:
    """``k [B, S, D]`` (one head) with the keys at ``pos_a``/``pos_b`` swapped inside ``basis``."""
    k = k.clone()
    B, S = k.shape[:2]
    V = basis.to(k)
    pa, pb = positions(pos_a, B, S), positions(pos_b, B, S)
    for b in range(B):
        k[b, pa[b]], k[b, pb[b]] = swap_in_subspace(k[b, pa[b]], k[b, pb[b]], V)
    return k


def project_out(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` minus its component in ``basis [D, r]``."""
    V = basis.to(x)
    return x - (x @ V) @ V.T
