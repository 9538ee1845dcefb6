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

Reads are bounded: a stored ΔC's declared shape is checked against the head dimension (the
run's ``model_info.head_dim``, else the shape of the bases stored beside it, and never above
:data:`MAX_HEAD_DIM`) before anything is multiplied out, so a tampered file declaring
``[20000, 1]`` factors is refused in one line instead of becoming a 20000 × 20000 matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = [
    "FACTOR_RTOL",
    "delta_tensors",
    "read_delta",
    "dense_run_tensors",
    "load_run_tensors",
    "check_delta_shapes",
    "MAX_HEAD_DIM",
]

MAX_HEAD_DIM = 4096
"""Largest head dimension a stored ΔC may declare (real models: 64–256)."""

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


def _bound(
    tensors: Mapping[str, torch.Tensor], prefix: str, head_dim: int | None
) -> tuple[int, int]:
    """The largest ``(d_q, d_k)`` a ΔC under ``prefix`` may have."""
    if head_dim is not None:
        return int(head_dim), int(head_dim)
    dims = []
    for name in ("query_basis", "key_basis"):
        t = tensors.get(prefix + name)
        dims.append(int(t.shape[0]) if t is not None and t.ndim == 2 else MAX_HEAD_DIM)
    return min(dims[0], MAX_HEAD_DIM), min(dims[1], MAX_HEAD_DIM)


def check_delta_shapes(
    shapes: Mapping[str, Sequence[int]], prefix: str, d_q: int, d_k: int, where: str = ""
) -> None:
    """``ValueError`` (one line) unless the ΔC declared under ``prefix`` is ``[≤d_q, ≤d_k]``
    dense or ``[d, r]`` / ``[d', r]`` factors with ``r ≤ min(d, d')`` — checked on shapes
    alone, before anything is materialised."""
    at = f"{where}: " if where else ""
    if prefix + _DENSE in shapes:
        sh = list(shapes[prefix + _DENSE])
        if len(sh) != 2 or sh[0] > d_q or sh[1] > d_k:
            raise ValueError(f"{at}{prefix}{_DENSE}: shape {sh}, expected at most [{d_q}, {d_k}]")
        return
    if prefix + _LEFT in shapes and prefix + _RIGHT in shapes:
        left, right = list(shapes[prefix + _LEFT]), list(shapes[prefix + _RIGHT])
        ok = (
            len(left) == 2 and len(right) == 2 and left[1] == right[1]
            and left[0] <= d_q and right[0] <= d_k and left[1] <= min(left[0], right[0])
        )  # fmt: skip
        if not ok:
            raise ValueError(
                f"{at}{prefix}{_LEFT}/{_RIGHT}: shapes {left} / {right}, expected [d_q, r] / "
                f"[d_k, r] with d_q <= {d_q}, d_k <= {d_k}, r <= min(d_q, d_k)"
            )


def read_delta(
    tensors: Mapping[str, torch.Tensor], prefix: str, head_dim: int | None = None
) -> torch.Tensor:
    """The dense ΔC stored under ``prefix`` (``KeyError`` naming it when neither form is);
    its declared shape is checked first (``ValueError``): at most ``head_dim`` (else the
    bases stored beside it, at most :data:`MAX_HEAD_DIM`) on each side."""
    d_q, d_k = _bound(tensors, prefix, head_dim)
    shapes = {
        k: tuple(tensors[k].shape)
        for k in (prefix + _DENSE, prefix + _LEFT, prefix + _RIGHT)
        if k in tensors
    }
    check_delta_shapes(shapes, prefix, d_q, d_k)
    if prefix + _DENSE in tensors:
        return tensors[prefix + _DENSE]
    if prefix + _LEFT in tensors and prefix + _RIGHT in tensors:
        left, right = tensors[prefix + _LEFT].double(), tensors[prefix + _RIGHT].double()
        return (left @ right.T).contiguous()
    raise KeyError(f"no ΔC under {prefix!r} ({prefix}{_DENSE} or {prefix}{_LEFT}/{_RIGHT})")


def dense_run_tensors(
    tensors: Mapping[str, torch.Tensor], head_dim: int | None = None
) -> dict[str, torch.Tensor]:
    """``tensors`` with every factored ΔC replaced by its dense ``<prefix>delta``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.endswith("." + _LEFT):
            prefix = k[: -len(_LEFT)]
            out[prefix + _DENSE] = read_delta(tensors, prefix, head_dim)
        elif not k.endswith("." + _RIGHT):
            out[k] = v
    return out


def _run_head_dim(path: Path) -> int | None:
    """``model_info.head_dim`` of the ``run.json`` beside ``path``, if it says one."""
    from .artifacts import read_json

    try:
        info = read_json(path.parent / "run.json", expect=dict).get("model_info") or {}
        d = info.get("head_dim") if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None
    return d if isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_HEAD_DIM else None


def load_run_tensors(path: str | Path, head_dim: int | None = None) -> dict[str, torch.Tensor]:
    """A ``run.safetensors`` (of any qkcov version) with every ΔC dense under ``.delta``.

    Every ΔC's declared shape is checked against ``head_dim`` (default: the run's, from the
    ``run.json`` beside it) from the file's header, before any tensor is read."""
    from .artifacts import load_tensors, read_tensor_header

    path = Path(path)
    head_dim = head_dim if head_dim is not None else _run_head_dim(path)
    header = read_tensor_header(path)
    shapes = {k: v[1] for k, v in header.items()}
    for k in shapes:
        for suffix in (_DENSE, _LEFT):
            if k.endswith("." + suffix):
                prefix = k[: -len(suffix)]
                dq = dk = head_dim or MAX_HEAD_DIM
                if head_dim is None:  # the bases stored beside it bound it
                    dq = min(dq, (shapes.get(prefix + "query_basis") or [MAX_HEAD_DIM])[0])
                    dk = min(dk, (shapes.get(prefix + "key_basis") or [MAX_HEAD_DIM])[0])
                check_delta_shapes(shapes, prefix, dq, dk, str(path))
    return dense_run_tensors(load_tensors(path), head_dim)
