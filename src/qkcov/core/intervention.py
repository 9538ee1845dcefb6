"""Offline interventions on plain q/k tensors: subspace key swaps and attention recomputation.

The in-forward versions (inside a real model) live in :mod:`qkcov.models.intervene` and are
tested against these.
"""

from __future__ import annotations

import math

import torch

__all__ = ["swap_in_subspace", "attention_logits", "attention_weights", "swap_metrics"]


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
    rows = torch.arange(attn_before.shape[0])
    a_o0, a_t0 = attn_before[rows, orig], attn_before[rows, target]
    a_o1, a_t1 = attn_after[rows, orig], attn_after[rows, target]
    p0 = a_t0 / (a_o0 + a_t0).clamp_min(1e-30)
    p1 = a_t1 / (a_o1 + a_t1).clamp_min(1e-30)
    flip_all = (attn_after.argmax(-1) == target).double()
    if candidates is None:
        candidates = torch.ones_like(attn_after, dtype=torch.bool)
    masked = attn_after.masked_fill(~candidates, float("-inf"))
    flip_items = (masked.argmax(-1) == target).double()
    return {
        "attn_orig_before": float(a_o0.mean()),
        "attn_target_before": float(a_t0.mean()),
        "attn_orig_after": float(a_o1.mean()),
        "attn_target_after": float(a_t1.mean()),
        "p_before": float(p0.mean()),
        "p_after": float(p1.mean()),
        "delta_p": float((p1 - p0).mean()),
        "flip_all": float(flip_all.mean()),
        "flip_items": float(flip_items.mean()),
    }
