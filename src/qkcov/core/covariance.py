"""Streaming contrastive covariance ΔC = E[q k⁺ᵀ] − E[q k⁻ᵀ] (METHOD §2).

Plain-tensor math: nothing here knows about models. Sums are kept in float64 together
with counts, so accumulators built on shards can be merged, checkpointed and resumed and
give exactly the statistics of one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..artifacts import load_tensors, read_tensor_metadata, save_tensors

__all__ = ["ContrastiveCovariance"]

_SUM_KEYS = ("qk_pos", "qk_neg", "q_pos", "q_neg", "k_pos", "k_neg", "n_pos", "n_neg")


ZERO_RTOL = 1024 * torch.finfo(torch.float64).eps
"""ΔC entries at most this × the largest entry of C⁺/C⁻ are rounding (about 2.3e-13)."""


def zero_if_rounding(c_pos: torch.Tensor, c_neg: torch.Tensor) -> torch.Tensor:
    """``c_pos − c_neg``, or exact zeros when the difference is numerically zero."""
    delta = c_pos - c_neg
    scale = max(float(c_pos.abs().max()), float(c_neg.abs().max())) if delta.numel() else 0.0
    if delta.numel() and float(delta.abs().max()) <= ZERO_RTOL * scale:
        return torch.zeros_like(delta)
    return delta


class ContrastiveCovariance:
    """Accumulates ``Σ q k⁺ᵀ``, ``Σ q k⁻ᵀ`` (and first moments, for centring) per group.

    Args:
        d_q: query dimension.
        d_k: key dimension.
        groups: number of groups or their names (e.g. one per category). A single
            anonymous group by default.
        center: default for :meth:`delta` — ``False`` gives uncentred second moments
            (the method's default), ``True`` mean-centred covariances.

    Shapes: ``qk_pos``/``qk_neg`` are ``[G, d_q, d_k]``, ``q_*`` ``[G, d_q]``,
    ``k_*`` ``[G, d_k]``, ``n_*`` ``[G]`` (all float64).
    """

    def __init__(
        self,
        d_q: int,
        d_k: int | None = None,
        groups: int | Sequence[str] = 1,
        *,
        center: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        d_k = d_q if d_k is None else d_k
        for name, value in (("d_q", d_q), ("d_k", d_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(groups, bool):
            raise ValueError(f"groups must be a positive integer or group names, got {groups!r}")
        if isinstance(groups, int):
            if groups < 1:
                raise ValueError(f"groups must be >= 1, got {groups}")
            names = [str(i) for i in range(groups)]
        else:
            names = [str(g) for g in groups]
            if not names:
                raise ValueError("groups must name at least one group")
            if len(set(names)) != len(names):
                raise ValueError(f"groups must be unique, got {names}")
        self.d_q, self.d_k, self.center = d_q, d_k, bool(center)
        self.group_names: list[str] = names
        g = len(names)
        f64 = dict(dtype=torch.float64, device=device)
        self.qk_pos = torch.zeros(g, d_q, d_k, **f64)
        self.qk_neg = torch.zeros(g, d_q, d_k, **f64)
        self.q_pos = torch.zeros(g, d_q, **f64)
        self.q_neg = torch.zeros(g, d_q, **f64)
        self.k_pos = torch.zeros(g, d_k, **f64)
        self.k_neg = torch.zeros(g, d_k, **f64)
        self.n_pos = torch.zeros(g, **f64)
        self.n_neg = torch.zeros(g, **f64)

    # ------------------------------------------------------------------ updates
    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    def _group_index(
        self, group: int | str | torch.Tensor | Sequence[int] | None, n: int
    ) -> torch.Tensor:
        device = self.qk_pos.device
        if group is None:
            if self.n_groups != 1:
                raise ValueError(f"group is required: this accumulator has {self.n_groups} groups")
            return torch.zeros(n, dtype=torch.long, device=device)
        if isinstance(group, str):
            if group not in self.group_names:
                raise ValueError(f"unknown group {group!r}; expected one of {self.group_names}")
            return torch.full((n,), self.group_names.index(group), dtype=torch.long, device=device)
        if isinstance(group, int):
            idx = torch.full((n,), group, dtype=torch.long, device=device)
        else:
            idx = torch.as_tensor(group, dtype=torch.long, device=device).reshape(-1)
            if idx.numel() != n:
                raise ValueError(f"group has {idx.numel()} entries but the batch has {n} rows")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.n_groups):
            raise ValueError(
                f"group index out of range [0, {self.n_groups}): {idx.unique().tolist()}"
            )
        return idx

    def _check(self, name: str, x: torch.Tensor, dim: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"{name} must have shape [n, {dim}], got {list(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty: an update needs at least one row")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
        return x.to(device=self.qk_pos.device, dtype=torch.float64)

    def _add(
        self, sign: str, q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
    ) -> None:
        qw = q * w[:, None]
        qk = getattr(self, f"qk_{sign}")
        for g in idx.unique().tolist():  # one [d_q, n_g] @ [n_g, d_k] matmul per group present
            rows = idx == g
            qk[g] += qw[rows].T @ k[rows]
        getattr(self, f"q_{sign}").index_add_(0, idx, qw)
        getattr(self, f"k_{sign}").index_add_(0, idx, k * w[:, None])
        getattr(self, f"n_{sign}").index_add_(0, idx, w)

    def update(
        self,
        q: torch.Tensor,
        k_pos: torch.Tensor | None,
        k_neg: torch.Tensor | None,
        group: int | str | torch.Tensor | Sequence[int] | None = None,
        weight: torch.Tensor | None = None,
    ) -> None:
        """Add row-aligned pairs: ``q [n, d_q]`` with ``k_pos [n, d_k]`` and ``k_neg [n, d_k]``.

        Either key tensor may be ``None`` to add only the other side. ``group`` is one
        group (int or name) for the whole batch or ``[n]`` indices; ``weight [n]`` weights
        rows (default 1). Several keys of one query are best passed as their mean (the
        outer product is linear in k) or as repeated query rows.
        """
        if k_pos is None and k_neg is None:
            raise ValueError("update needs k_pos, k_neg or both")
        q64 = self._check("q", q, self.d_q)
        n = q64.shape[0]
        idx = self._group_index(group, n)
        if weight is None:
            w = torch.ones(n, dtype=torch.float64, device=q64.device)
        else:
            w = torch.as_tensor(weight, dtype=torch.float64, device=q64.device).reshape(-1)
            if w.numel() != n:
                raise ValueError(f"weight must have shape [n={n}], got {list(w.shape)}")
            if not torch.isfinite(w).all() or (w < 0).any():
                raise ValueError("weight must be finite non-negative values (got NaN, inf or < 0)")
        # Validate every input before touching the sums: a bad k_neg must not leave k_pos added.
        checked = []
        for sign, k in (("pos", k_pos), ("neg", k_neg)):
            if k is None:
                continue
            k64 = self._check(f"k_{sign}", k, self.d_k)
            if k64.shape[0] != n:
                raise ValueError(f"k_{sign} has {k64.shape[0]} rows but q has {n}")
            checked.append((sign, k64))
        for sign, k64 in checked:
            self._add(sign, q64, k64, idx, w)

    # ------------------------------------------------------------------ results
    def _select(self, group: int | str | None) -> dict[str, torch.Tensor]:
        if group is None:  # pooled over every group
            return {key: getattr(self, key).sum(0) for key in _SUM_KEYS}
        gi = int(self._group_index(group, 1)[0])
        return {key: getattr(self, key)[gi] for key in _SUM_KEYS}

    def counts(self, group: int | str | None = None) -> tuple[int, int]:
        s = self._select(group)
        return int(s["n_pos"].round()), int(s["n_neg"].round())

    def second_moments(
        self, group: int | str | None = None, center: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C+, C-)``, each ``[d_q, d_k]`` float64, for one group or pooled (``None``)."""
        center = self.center if center is None else center
        s = self._select(group)
        label = "pooled" if group is None else f"group {group!r}"
        for sign in ("pos", "neg"):
            if float(s[f"n_{sign}"]) <= 0:
                raise ValueError(
                    f"delta(): no {'positive' if sign == 'pos' else 'negative'} pairs accumulated "
                    f"for {label}; call update() first"
                )
        out = []
        for sign in ("pos", "neg"):
            n = s[f"n_{sign}"]
            c = s[f"qk_{sign}"] / n
            if center:
                c = c - torch.outer(s[f"q_{sign}"] / n, s[f"k_{sign}"] / n)
            out.append(c)
        return out[0], out[1]

    def delta(self, group: int | str | None = None, center: bool | None = None) -> torch.Tensor:
        """ΔC ``[d_q, d_k]`` (float64) for ``group``; ``None`` pools every group's pairs.

        A difference no larger than rounding (every entry ≤ :data:`ZERO_RTOL` × the largest
        entry of C⁺ or C⁻) is returned as exact zeros: its "directions" would be noise, so
        its rank is 0, not whatever the noise's energy spectrum gives."""
        c_pos, c_neg = self.second_moments(group, center)
        return zero_if_rounding(c_pos, c_neg)

    def deltas(self, center: bool | None = None) -> torch.Tensor:
        """Per-group ΔC stacked ``[G, d_q, d_k]``."""
        return torch.stack([self.delta(g, center) for g in range(self.n_groups)])

    # ---------------------------------------------------------- merge / persist
    def _compatible(self, other: ContrastiveCovariance) -> None:
        if not isinstance(other, ContrastiveCovariance):
            raise ValueError(f"can only merge a ContrastiveCovariance, got {type(other).__name__}")
        if (other.d_q, other.d_k, other.group_names) != (self.d_q, self.d_k, self.group_names):
            raise ValueError(
                "cannot merge accumulators of different shape/groups: "
                f"({self.d_q}, {self.d_k}, {self.group_names}) vs "
                f"({other.d_q}, {other.d_k}, {other.group_names})"
            )

    def merge(self, other: ContrastiveCovariance) -> ContrastiveCovariance:
        """Add ``other``'s sums into this accumulator (in place) and return ``self``."""
        self._compatible(other)
        for key in _SUM_KEYS:
            getattr(self, key).add_(getattr(other, key).to(getattr(self, key).device))
        return self

    def sum_tensors(self) -> dict[str, torch.Tensor]:
        """The live float64 sum/count tensors by name (not copies: for in-place reductions
        across processes and for checkpoints)."""
        return {key: getattr(self, key) for key in _SUM_KEYS}

    def state_dict(self) -> dict[str, Any]:
        """Tensors plus the config needed to rebuild; safe to store as safetensors."""
        state: dict[str, Any] = {key: getattr(self, key).clone() for key in _SUM_KEYS}
        state["config"] = {
            "d_q": self.d_q,
            "d_k": self.d_k,
            "groups": self.group_names,
            "center": self.center,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> ContrastiveCovariance:
        cfg = state.get("config")
        if cfg is not None and (cfg["d_q"], cfg["d_k"], list(cfg["groups"])) != (
            self.d_q,
            self.d_k,
            self.group_names,
        ):
            raise ValueError(f"state_dict config {cfg} does not match this accumulator")
        for key in _SUM_KEYS:
            if key not in state:
                raise ValueError(f"state_dict is missing {key!r}")
            value = torch.as_tensor(state[key], dtype=torch.float64)
            if value.shape != getattr(self, key).shape:
                raise ValueError(
                    f"state_dict[{key!r}] has shape {list(value.shape)}, "
                    f"expected {list(getattr(self, key).shape)}"
                )
            getattr(self, key).copy_(value)
        return self

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ContrastiveCovariance:
        cfg = state["config"]
        acc = cls(cfg["d_q"], cfg["d_k"], list(cfg["groups"]), center=cfg.get("center", False))
        return acc.load_state_dict(state)

    def save(self, path: str | Path, prefix: str = "") -> Path:
        state = self.state_dict()
        cfg = state.pop("config")
        return save_tensors(path, {prefix + k: v for k, v in state.items()}, {"config": cfg})

    @classmethod
    def load(cls, path: str | Path, prefix: str = "") -> ContrastiveCovariance:
        tensors = load_tensors(path)
        meta = read_tensor_metadata(path)
        if "config" not in meta:
            raise ValueError(f"{path} has no accumulator config in its metadata")
        state: dict[str, Any] = {k: tensors[prefix + k] for k in _SUM_KEYS}
        state["config"] = meta["config"]
        return cls.from_state_dict(state)

    def __repr__(self) -> str:
        n_pos, n_neg = self.counts()
        return (
            f"ContrastiveCovariance(d_q={self.d_q}, d_k={self.d_k}, groups={self.n_groups}, "
            f"n_pos={n_pos}, n_neg={n_neg}, center={self.center})"
        )
