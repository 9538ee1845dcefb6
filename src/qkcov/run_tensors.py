"""How a ΔC is stored in ``run.safetensors``: dense, or as exact low-rank factors.

A group's ΔC is built from few records, and each record adds a rank-one term, so its rank is
at most its record count (10 of 64 dimensions for a filter-task group of 10 records). Such a
ΔC is stored as two float64 factors::

    <prefix>delta_left   [d_q, r]   U_r · diag(s_r)
    <prefix>delta_right  [d_k, r]   V_r                 ΔC = delta_left @ delta_rightᵀ

where r is ΔC's numerical rank (singular values above ``s_1 · max(d_q, d_k) · eps``, the
float64 rounding floor of the matrix itself) — only when that is smaller
(``r · (d_q + d_k) < d_q · d_k``) and the product reproduces ΔC to ``FACTOR_RTOL`` of its
largest entry (checked when saving). Anything else, the pooled ΔC of a run typically, is
stored dense as ``<prefix>delta`` (float64), as every run folder before this rule was; both
forms are read back to the same dense float64 ``[d_q, d_k]`` tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = [
    "FACTOR_RTOL",
    "delta_tensors",
    "read_delta",
    "dense_run_tensors",
    "load_run_tensors",
]

FACTOR_RTOL = 1e-12
"""Largest entry of |ΔC − left·rightᵀ| allowed, relative to ΔC's largest entry."""

_LEFT, _RIGHT, _DENSE = "delta_left", "delta_right", "delta"


def delta_tensors(prefix: str, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors that store ``delta [d_q, d_k]`` under ``prefix`` (see the module doc)."""
    d = delta.detach().to("cpu", torch.float64).contiguous()
    dense = {prefix + _DENSE: d}
    if d.ndim != 2 or d.numel() == 0 or not bool(torch.isfinite(d).all()):
        return dense
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    if not float(s[0]) > 0.0:
        return dense
    tol = float(s[0]) * max(d.shape) * torch.finfo(torch.float64).eps
    r = int((s > tol).sum())
    if r * (d.shape[0] + d.shape[1]) >= d.numel():
        return dense
    left = (u[:, :r] * s[:r]).contiguous()
    right = vh[:r].T.contiguous()
    scale = float(d.abs().max())
    if float((left @ right.T - d).abs().max()) > FACTOR_RTOL * scale:
        return dense
    return {prefix + _LEFT: left, prefix + _RIGHT: right}


def read_delta(tensors: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """The dense ΔC stored under ``prefix`` (``KeyError`` naming it when neither form is)."""
    if prefix + _DENSE in tensors:
        return tensors[prefix + _DENSE]
    if prefix + _LEFT in tensors and prefix + _RIGHT in tensors:
        left, right = tensors[prefix + _LEFT].double(), tensors[prefix + _RIGHT].double()
        return (left @ right.T).contiguous()
    raise KeyError(f"no ΔC under {prefix!r} ({prefix}{_DENSE} or {prefix}{_LEFT}/{_RIGHT})")


def dense_run_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every factored ΔC replaced by its dense ``<prefix>delta``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.endswith("." + _LEFT):
            prefix = k[: -len(_LEFT)]
            out[prefix + _DENSE] = read_delta(tensors, prefix)
        elif not k.endswith("." + _RIGHT):
            out[k] = v
    return out


def load_run_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``run.safetensors`` (of any qkcov version) with every ΔC dense under ``.delta``."""
    from .artifacts import load_tensors

    return dense_run_tensors(load_tensors(path))
