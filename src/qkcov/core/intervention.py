"""Offline interventions on plain q/k tensors: subspace key swaps and attention recomputation.

The in-forward versions (inside a real model) live in :mod:`qkcov.models.intervene` and are
tested against these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "swap_in_subspace",
    "attention_logits",
    "attention_weights",
    "swapped_attention",
    "capped_softmax",
    "swap_metrics",
    "swap_metrics_per_prompt",
]


def _check_basis(basis: torch.Tensor, d: int) -> None:
    if basis.ndim != 2 or basis.shape[0] != d:
        raise ValueError(f"basis must be [d={d}, r], got {list(basis.shape)}")


def swap_in_subspace(
    k_a: torch.Tensor, k_b: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap two keys' coordinates inside the span of ``basis [d, r]`` (orthonormal columns).

    ``k_a += V(Vᵀk_b − Vᵀk_a)`` and ``k_b += V(Vᵀk_a − Vᵀk_b)``; components outside the
    subspace are untouched. ``k_a``/``k_b`` are ``[..., d]`` and are not modified in place.
    """
    if k_a.shape != k_b.shape:
        raise ValueError(
            f"k_a and k_b must have the same shape, got {list(k_a.shape)} vs {list(k_b.shape)}"
        )
    _check_basis(basis, k_a.shape[-1])
    v = basis.to(k_a.dtype)
    diff = (k_b - k_a) @ v  # [..., r]
    shift = diff @ v.T
    return k_a + shift, k_b - shift


def attention_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Scaled logits ``q·kᵀ·scaling`` ``[..., S_q, S_k]`` (``scaling`` defaults to 1/√d).

    ``softcap`` applies Gemma-2 style capping ``c·tanh(x/c)`` after scaling.
    """
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scaling is None else scaling
    logits = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention ``[..., S_q, S_k]`` from ``q [..., S_q, d]`` and ``k [..., S_k, d]``.

    ``mask`` is boolean (True = may attend) or additive float, broadcastable to the logits.
    """
    logits = attention_logits(q, k, scaling, softcap)
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.to(logits.dtype)
    return torch.softmax(
        logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1
    )


def swapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    orig: torch.Tensor,
    target: torch.Tensor,
    bases: Sequence[torch.Tensor | None],
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Query-row attention after swapping keys ``orig``/``target`` in each subspace, in float64.

    Args:
        q: ``[n, d]`` one query row per example.
        k: ``[n, S, d]`` every key the row can see (masked ones may hold anything finite).
        orig, target: ``[n]`` key indices swapped by :func:`swap_in_subspace`.
        bases: ``C`` bases ``[d, r_c]`` (orthonormal columns); ``None`` = no swap.
        mask: ``[n, S]`` bool (True = may attend) or additive float.

    Returns ``[C, n, S]``: ``softmax(softcap(scaling·q·k'ᵀ) + mask)`` with ``k'`` the swapped
    keys. Only the two swapped logits move, by ``±scaling·(qV)·((k_tgt − k_orig)V)``, so
    thousands of swaps cost one ``[C, n, S]`` softmax.
    """
    if q.ndim != 2 or k.ndim != 3 or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"q must be [n, d] and k [n, S, d], got {list(q.shape)} and {list(k.shape)}"
        )
    n, d = q.shape
    if orig.shape != (n,) or target.shape != (n,):
        raise ValueError(
            f"orig and target must be [n={n}], got {list(orig.shape)}, {list(target.shape)}"
        )
    if not len(bases):
        raise ValueError("swapped_attention needs at least one basis (None = no swap)")
    q, k = q.double(), k.double()
    scale = 1.0 / math.sqrt(d) if scaling is None else scaling
    rows = torch.arange(n, device=q.device)
    diff = k[rows, target] - k[rows, orig]  # [n, d]
    # shift = scaling·(Vᵀq)·(Vᵀdiff), bases of one rank stacked: no [C, d, d] projectors
    shift = torch.zeros(len(bases), n, dtype=torch.float64, device=q.device)  # [C, n]
    by_rank: dict[int, list[int]] = {}
    for c, v in enumerate(bases):
        if v is not None:
            _check_basis(v, d)
            by_rank.setdefault(int(v.shape[1]), []).append(c)
    for idx in by_rank.values():
        vs = torch.stack([bases[c].to(q) for c in idx])  # [C_r, d, r]
        qv = torch.einsum("nd,cdr->cnr", q, vs)
        dv = torch.einsum("nd,cdr->cnr", diff, vs)
        shift[idx] = (qv * dv).sum(-1) * scale
    logits = (k @ q[:, :, None])[..., 0] * scale  # [n, S]
    logits = logits.expand(len(bases), n, -1).clone()
    logits[:, rows, orig] += shift
    logits[:, rows, target] -= shift
    return capped_softmax(logits, mask, softcap)


def capped_softmax(
    logits: torch.Tensor, mask: torch.Tensor | None = None, softcap: float | None = None
) -> torch.Tensor:
    """Attention from scaled logits ``[..., S]``: Gemma-2 style capping ``c·tanh(x/c)``, then
    ``mask`` (bool True = may attend, or additive float), then softmax over the last axis."""
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if mask is not None:
        mask = mask.to(logits.device)
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.to(logits)
    return torch.softmax(logits, dim=-1)


def swap_metrics_per_prompt(
    attn_before: torch.Tensor,
    attn_after: torch.Tensor,
    orig: torch.Tensor,
    target: torch.Tensor,
    candidates: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-example values behind :func:`swap_metrics`: each ``[..., n]``.

    ``attn_after`` may carry leading condition dims (``[..., n, S]``); ``attn_before``
    ``[n, S]``, ``orig``/``target`` ``[n]`` and ``candidates`` ``[n, S]`` broadcast over them.
    """
    lead = attn_after.shape[:-2]

    def at(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        i = idx.to(a.device)[:, None].expand(*a.shape[:-2], -1, 1)
        return a.gather(-1, i)[..., 0]

    a_o0, a_t0 = at(attn_before, orig), at(attn_before, target)
    a_o1, a_t1 = at(attn_after, orig), at(attn_after, target)
    p0 = a_t0 / (a_o0 + a_t0).clamp_min(1e-30)
    p1 = a_t1 / (a_o1 + a_t1).clamp_min(1e-30)
    tgt = target.to(attn_after.device)
    flip_all = (attn_after.argmax(-1) == tgt).double()
    if candidates is None:
        candidates = torch.ones_like(attn_after, dtype=torch.bool)
    masked = attn_after.masked_fill(~candidates.to(attn_after.device), float("-inf"))
    flip_items = (masked.argmax(-1) == tgt).double()
    out = {
        "attn_orig_before": a_o0,
        "attn_target_before": a_t0,
        "attn_orig_after": a_o1,
        "attn_target_after": a_t1,
        "p_before": p0,
        "p_after": p1,
        "delta_p": p1 - p0,
        "flip_all": flip_all,
        "flip_items": flip_items,
    }
    return {key: v.expand(*lead, v.shape[-1]) for key, v in out.items()}


def swap_metrics(
    attn_before: torch.Tensor,
    attn_after: torch.Tensor,
    orig: torch.Tensor,
    target: torch.Tensor,
    candidates: torch.Tensor | None = None,
) -> dict[str, float]:
    """Summaries of a swap over a batch of query rows.

    Args:
        attn_before, attn_after: ``[n, S]`` attention of each example's query.
        orig, target: ``[n]`` key indices that were swapped.
        candidates: optional ``[n, S]`` bool; the "items" among which flips are counted.

    Returns mean attention on orig/target before/after, ``delta_p`` (mean shift of
    ``p = a_tgt / (a_orig + a_tgt)``), ``flip_all`` (argmax over every position moves to
    target) and ``flip_items`` (argmax among candidates moves to target).
    """
    per = swap_metrics_per_prompt(attn_before, attn_after, orig, target, candidates)
    return {key: float(v.mean()) for key, v in per.items()}
