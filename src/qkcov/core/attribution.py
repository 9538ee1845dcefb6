"""Exact attribution of attention logits to query subspaces (METHOD §4, Fig. 10).

``q`` is split into orthogonal parts — its projection on the first basis, on the second
basis orthogonalised against the first, and so on, plus the residual — so every logit
``q·k_j`` is exactly the sum of the parts' logits, with no double counting where the
subspaces overlap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .subspace import orthonormalize

__all__ = ["Attribution", "attribute", "explain_logits", "sequential_bases"]


@dataclass(frozen=True)
class Attribution:
    """Per-part logits.

    Attributes:
        names: part names, the bases' names then ``"residual"``.
        parts: ``[P+1, ..., S]`` logit contributions (same leading shape as the input q).
        total: ``[..., S]`` the full logits ``q·k_j · scaling``; ``parts.sum(0) == total``.
        bases: the orthogonalised bases actually used, ``[d, r_i']`` each.
    """

    names: list[str]
    parts: torch.Tensor
    total: torch.Tensor
    bases: list[torch.Tensor]

    @property
    def residual(self) -> torch.Tensor:
        return self.parts[-1]

    def explained_fraction(self) -> float:
        """``1 − ‖residual‖² / ‖total‖²`` over every logit given."""
        denom = float((self.total.double() ** 2).sum())
        if denom == 0:
            return float("nan")
        return 1.0 - float((self.residual.double() ** 2).sum()) / denom

    def part(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise ValueError(f"unknown part {name!r}; expected one of {self.names}")
        return self.parts[self.names.index(name)]


def sequential_bases(bases: Sequence[torch.Tensor], tol: float = 1e-8) -> list[torch.Tensor]:
    """Orthogonalise each basis against all earlier ones (priority = list order)."""
    out: list[torch.Tensor] = []
    span = None  # orthonormal basis of everything so far
    for b in bases:
        b = b.double()
        if span is not None:
            b = b - span @ (span.T @ b)
        ob = orthonormalize(b, tol)
        out.append(ob)
        span = ob if span is None else torch.cat([span, ob], dim=1)
    return out


def _priority(bases: Mapping[str, torch.Tensor], priority: Sequence[str] | None) -> list[str]:
    """The bases' names in priority order (``priority``, or the mapping's own order)."""
    names = list(priority) if priority is not None else list(bases)
    if unknown := [n for n in names if n not in bases]:
        raise ValueError(f"priority names {unknown} are not among the bases {list(bases)}")
    return names


def attribute(
    q: torch.Tensor,
    K: torch.Tensor,
    bases: Sequence[torch.Tensor] | dict[str, torch.Tensor],
    *,
    priority: Sequence[str] | None = None,
    scaling: float = 1.0,
) -> Attribution:
    """Split logits ``q·Kᵀ`` into contributions of query subspaces.

    Args:
        q: ``[d]`` or ``[n, d]`` queries.
        K: ``[S, d]`` keys (shared by all queries) or ``[n, S, d]`` per query.
        bases: query-side bases ``[d, r_i]`` (list, or dict name → basis). Later bases are
            orthogonalised against earlier ones; ``priority`` reorders a dict's names.
        scaling: multiply logits (e.g. ``1/√d`` to match attention scores).

    Returns:
        :class:`Attribution` whose ``parts`` sum exactly (to float rounding) to ``total``.
    """
    if isinstance(bases, dict):
        names = _priority(bases, priority)
        basis_list = [bases[n] for n in names]
    else:
        if priority is not None:
            raise ValueError("priority needs bases given as a dict name -> basis")
        basis_list = list(bases)
        names = [f"basis_{i}" for i in range(len(basis_list))]
    d = q.shape[-1]
    if K.shape[-1] != d:
        raise ValueError(f"K has head dim {K.shape[-1]} but q has {d}")
    for name, b in zip(names, basis_list, strict=True):
        if b.ndim != 2 or b.shape[0] != d:
            raise ValueError(f"basis {name!r} must be [d={d}, r], got {list(b.shape)}")
    single = q.ndim == 1
    q2 = q.double().reshape(-1, d)
    K3 = K.double() if K.ndim == 3 else K.double().unsqueeze(0).expand(q2.shape[0], -1, -1)
    if K3.shape[0] != q2.shape[0]:
        raise ValueError(f"K has {K3.shape[0]} key sets for {q2.shape[0]} queries")
    return _attribute(q2, K3, names, sequential_bases(basis_list), scaling, single)


def _attribute(
    q2: torch.Tensor, K3: torch.Tensor, names: list[str], ortho: list[torch.Tensor],
    scaling: float, single: bool,
) -> Attribution:  # fmt: skip
    """:func:`attribute` on checked ``q2 [n, d]``, ``K3 [n, S, d]`` (float64) and bases
    already orthogonalised in priority order."""
    q_parts = [q2 @ b @ b.T for b in ortho]
    q_parts.append(q2 - sum(q_parts) if q_parts else q2)
    parts = torch.stack([torch.einsum("nd,nsd->ns", qp, K3) for qp in q_parts]) * scaling
    total = torch.einsum("nd,nsd->ns", q2, K3) * scaling
    if single:
        parts, total = parts[:, 0], total[0]
    return Attribution(names=[*names, "residual"], parts=parts, total=total, bases=ortho)


def explain_logits(
    queries: torch.Tensor,
    keys: Sequence[torch.Tensor],
    bases: Mapping[str, torch.Tensor],
    *,
    priority: Sequence[str] | None = None,
    scaling: float = 1.0,
) -> dict[str, Any]:
    """Exact attribution of each prompt's logits over all its key positions.

    Args:
        queries: ``[n, D]`` one query per prompt.
        keys: n tensors ``[S_i, D]`` (every key position of prompt i).
        bases: name → query-side basis ``[D, r]``; later names (by ``priority``) are
            orthogonalised against earlier ones; the residual is added as the last part.

    Returns ``explained_fraction`` (mean over prompts of ``1 − ‖resid‖²/‖total‖²``),
    ``explained_fraction_centred`` (the same after subtracting each part's mean over keys,
    which softmax ignores; the uncentred number is dominated by the shared offset),
    ``per_prompt`` fractions, ``share`` per part (mean ``⟨part, total⟩/‖total‖²``; the
    shares sum to 1), ``norm_fraction`` per part (mean ``‖part‖²/‖total‖²``),
    ``max_abs_error`` (max |Σ parts − total|), ``names`` and the per-prompt
    :class:`~qkcov.core.attribution.Attribution` objects under ``"attributions"``.
    """
    if queries.ndim != 2:
        raise ValueError(f"queries must be [n, D], got {list(queries.shape)}")
    n, d = queries.shape
    if len(keys) != n:
        raise ValueError(f"got {len(keys)} key sets for {n} queries")
    for name, b in bases.items():
        if not isinstance(b, torch.Tensor) or b.ndim != 2 or b.shape[0] != d:
            shape = list(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"basis {name!r} must be [D={d}, r] (query head dim), got {shape}")
    for i, k in enumerate(keys):
        if k.ndim != 2 or k.shape[1] != d:
            raise ValueError(f"keys of prompt {i} must be [S, D={d}], got {list(k.shape)}")
    atts, fracs, centred, err = [], [], [], 0.0
    shares: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    names_in = _priority(bases, priority)
    ortho = sequential_bases([bases[x] for x in names_in])  # once for every prompt
    for i in range(n):
        a = _attribute(queries[i].double()[None], keys[i].double()[None], names_in, ortho,
                       scaling, single=True)  # fmt: skip
        atts.append(a)
        fracs.append(a.explained_fraction())
        err = max(err, float((a.parts.sum(0) - a.total).abs().max()))
        tot2 = float((a.total**2).sum())
        # softmax ignores a shift shared by all keys: also score the centred logits
        pc, tc = a.parts - a.parts.mean(-1, keepdim=True), a.total - a.total.mean()
        centred.append(1.0 - float((pc[-1] ** 2).sum() / (tc**2).sum()))
        shares.append((a.parts * a.total).sum(-1) / tot2)
        norms.append((a.parts**2).sum(-1) / tot2)
    names = atts[0].names
    mean = lambda xs: torch.stack(xs).mean(0).tolist()  # noqa: E731
    return {
        "names": names,
        "explained_fraction": sum(fracs) / n,
        "per_prompt": fracs,
        "explained_fraction_centred": sum(centred) / n,
        "share": dict(zip(names, mean(shares), strict=True)),
        "norm_fraction": dict(zip(names, mean(norms), strict=True)),
        "max_abs_error": err,
        "attributions": atts,
    }
