"""Every head, every hypothesis, from running sums (``qkcov explain``; torch only).

For one sequence batch and one layer, given each selected head's post-RoPE queries and keys
``q, k [B, H, S, D]`` and, per hypothesis ``n``, the boolean positive pairs
``pos [B, N, S, S]`` (query rows, key columns) inside the causal, unpadded pairs
``allowed [B, S, S]``, :class:`LayerSums` adds

- ``delta [N, H, D, D]``: ``Σ w_nqk q kᵀ`` with the signed pair weights of
  :func:`pair_weights` (``+1/N⁺`` on each positive pair, ``−`` the offset-matched negative
  weight on each negative pair), so after the corpus ``delta = E[q k⁺ᵀ] − E[q k⁻ᵀ]``;
- ``wkey [N, H, D]`` = ``Σ w_nqk k`` and ``qsum [H, D]`` = ``Σ_q q``: a *relational* hypothesis
  (a match between query and key: same-token, induction, same-word) gets the ΔC of centred
  queries ``Σ w (q − q̄) kᵀ = delta − q̄ wkeyᵀ`` — a match has no key direction shared by every
  query (issue "relational features"), so the head's shared query direction is taken out;
- ``gram [H, D, D]``: ``G = Σ_q q v_qᵀ`` with ``v_q = Σ_k c_qk k_k`` and ``c_qk`` the query
  row's raw dot products centred over its allowed keys (softmax ignores a shift shared by the
  row). For any symmetric projector ``P`` on the query side, ``tr(P G)`` is exactly
  ``Σ_q Σ_k ⟨part_P, total⟩`` of the row-centred logits — the numerator of
  :func:`qkcov.core.attribution.explain_logits`' ``share`` — so the attribution of every
  logit of the corpus to any sequence of query subspaces needs only ``G``;
- per hypothesis, the attention mass on its positive keys (with the model's own mask,
  scaling and soft-cap) and the uniform baseline (share of positive keys in the row).

Memory: ``heads × (hypotheses + 1) × D² × 8`` bytes of float64 sums (270 heads × 11 × 64² × 8
= 97 MB for SmolLM2-135M), plus per batch and layer ``B × H × S² × 4 × 3`` bytes of logits,
weights and centred logits, ``B × N × S² × 5`` of pair masks and weights and
``B × N × H × S × D × 4`` of weighted keys.

:func:`explain_head` turns the sums into per-hypothesis subspaces (SVD of ΔC, energy rank
capped at ``max_rank``) and their shares of the logit variance, in greedy order: at each step
the hypothesis whose subspace, orthogonalised against those already chosen
(:func:`qkcov.core.attribution.sequential_bases`), carries the largest share; the shares and
the unexplained rest sum to 1 exactly. The split uses each hypothesis' *key* subspace ``V_r``
by default (``side="key"``): q and k share one space, so ``q·P k = (P q)·k`` and the same
exact attribution applies; the key side names the key directions in which positives differ
from their offset-matched negatives, while the query side of every ΔC of a head is dominated
by the head's shared query direction (measured on SmolLM2: query-side subspaces of unrelated
hypotheses all take 70–90 % of the variance first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .attribution import sequential_bases
from .subspace import feature_subspace, orthonormalize, rank_at_energy

__all__ = [
    "OFFSET_EDGES",
    "offset_bins",
    "count_pairs",
    "pair_weights",
    "LayerSums",
    "HypothesisExplanation",
    "HeadExplanation",
    "explain_head",
    "memory_bytes",
]

#: Offset bins for matching negatives to positives: 0..16 exactly, then doubling widths.
OFFSET_EDGES = (*range(0, 17), 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048,
                4096, 8192, 1 << 62)  # fmt: skip


def offset_bins(n: int) -> torch.Tensor:
    """``[n, n]`` long: the offset bin of ``query − key`` (−1 where key > query)."""
    r = torch.arange(n)
    d = r[:, None] - r[None, :]
    edges = torch.tensor(OFFSET_EDGES[1:], dtype=torch.long)
    b = torch.bucketize(d.clamp_min(0), edges, right=True)
    return torch.where(d >= 0, b, torch.full_like(b, -1))


def n_bins() -> int:
    return len(OFFSET_EDGES) - 1


def count_pairs(
    pos: torch.Tensor, allowed: torch.Tensor, bins: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive / negative pair counts per offset bin, ``[N, n_bins]`` each (float64).

    ``pos [N, S, S]``, ``allowed [S, S]`` or per hypothesis ``[N, S, S]``, ``bins [S, S]``
    of one sequence.
    """
    nb = n_bins()
    p = pos & allowed
    neg = allowed & ~pos
    b = bins.clamp_min(0)
    out = []
    for m in (p, neg):
        flat = (m.to(torch.float64) * 1).reshape(m.shape[0], -1)
        idx = b.reshape(1, -1).expand_as(flat)
        out.append(torch.zeros(m.shape[0], nb, dtype=torch.float64).scatter_add_(1, idx, flat))
    return out[0], out[1]


def pair_weights(
    pos: torch.Tensor,
    allowed: torch.Tensor,
    bins: torch.Tensor,
    pos_counts: torch.Tensor,
    neg_counts: torch.Tensor,
    positional: Sequence[bool],
) -> torch.Tensor:
    """Signed pair weights ``[B, N, S, S]`` (float32) whose corpus sums are ``+1`` over
    positives and ``−1`` over negatives; ``allowed [B, S, S]`` or per hypothesis
    ``[B, N, S, S]``.

    A positional hypothesis: ``1/N⁺`` per positive, ``1/N⁻`` per negative. Any other: only
    offset bins holding both sides count; a positive weighs ``1/N⁺_used``, a negative in bin
    ``b`` ``(N⁺_b / N⁺_used) / N⁻_b`` — the negatives' offsets then have the positives'
    distribution, so position cannot make ΔC.
    """
    B, N, S, _ = pos.shape
    if allowed.ndim == 3:
        allowed = allowed[:, None]
    p = pos & allowed
    neg = allowed & ~pos
    wp = torch.zeros(N, n_bins(), dtype=torch.float64)
    wn = torch.zeros_like(wp)
    for i, is_pos in enumerate(positional):
        npos, nneg = pos_counts[i], neg_counts[i]
        if is_pos:
            tp, tn = float(npos.sum()), float(nneg.sum())
            if tp > 0 and tn > 0:
                wp[i] = 1.0 / tp
                wn[i] = 1.0 / tn
            continue
        both = (npos > 0) & (nneg > 0)
        used = float(npos[both].sum())
        if used <= 0:
            continue
        wp[i] = torch.where(both, torch.full_like(npos, 1.0 / used), torch.zeros_like(npos))
        wn[i] = torch.where(both, npos / used / nneg.clamp_min(1.0), torch.zeros_like(npos))
    b = bins.clamp_min(0)  # [B, S, S]
    wp_pairs = wp[:, b].permute(1, 0, 2, 3).float()  # [B, N, S, S]
    wn_pairs = wn[:, b].permute(1, 0, 2, 3).float()
    return wp_pairs * p - wn_pairs * neg


@dataclass
class LayerSums:
    """Running sums of one layer's selected heads over the corpus (see the module doc)."""

    heads: list[int]
    n_hyp: int
    head_dim: int
    delta: torch.Tensor = field(init=False)  # [N, H, D, D] float64
    wkey: torch.Tensor = field(init=False)  # [N, H, D] Σ w k (for query-centred ΔC)
    qsum: torch.Tensor = field(init=False)  # [H, D] Σ q over query rows
    n_rows: torch.Tensor = field(init=False)  # [] query rows
    gram: torch.Tensor = field(init=False)  # [H, D, D] float64
    attn_pos: torch.Tensor = field(init=False)  # [N, H] Σ attention mass on positives
    base_pos: torch.Tensor = field(init=False)  # [N] Σ share of positive keys per row
    rows_pos: torch.Tensor = field(init=False)  # [N] rows with >= 1 positive
    n_pos: torch.Tensor = field(init=False)  # [N] positive pairs
    logit_var: torch.Tensor = field(init=False)  # [H] Σ centred logit² (scaled)

    def __post_init__(self) -> None:
        H, N, D = len(self.heads), self.n_hyp, self.head_dim
        f64 = torch.float64
        self.delta = torch.zeros(N, H, D, D, dtype=f64)
        self.wkey = torch.zeros(N, H, D, dtype=f64)
        self.qsum = torch.zeros(H, D, dtype=f64)
        self.n_rows = torch.zeros((), dtype=f64)
        self.gram = torch.zeros(H, D, D, dtype=f64)
        self.attn_pos = torch.zeros(N, H, dtype=f64)
        self.base_pos = torch.zeros(N, dtype=f64)
        self.rows_pos = torch.zeros(N, dtype=f64)
        self.n_pos = torch.zeros(N, dtype=f64)
        self.logit_var = torch.zeros(H, dtype=f64)

    def update(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        pos: torch.Tensor,
        weights: torch.Tensor,
        allowed: torch.Tensor,
        scaling: float,
        softcap: float | None = None,
    ) -> None:
        """Add one batch: ``q, k [B, H, S, D]``, ``pos [B, N, S, S]`` bool, ``weights
        [B, N, S, S]`` (:func:`pair_weights`), ``allowed [B, S, S]`` bool."""
        q, k = q.float(), k.float()
        dev = q.device
        allowed = allowed.to(dev)
        pos = pos.to(dev) & allowed[:, None]
        w = weights.to(dev)
        wk = torch.einsum("bnqk,bhkd->bnhqd", w, k)
        self.delta += torch.einsum("bhqd,bnhqe->nhde", q, wk).double().cpu()
        self.wkey += wk.sum((0, 3)).double().cpu()  # [N, H, D]
        rows = allowed.any(-1)  # [B, S] real query rows
        self.qsum += (q * rows[:, None, :, None]).sum((0, 2)).double().cpu()
        self.n_rows += float(rows.sum())
        dots = q @ k.transpose(-1, -2)  # [B, H, S, S]
        am = allowed[:, None].float()
        cnt = am.sum(-1, keepdim=True).clamp_min(1.0)
        centred = (dots - (dots * am).sum(-1, keepdim=True) / cnt) * am
        v = centred @ k  # [B, H, S, D]
        self.gram += torch.einsum("bhqd,bhqe->hde", q, v).double().cpu()
        self.logit_var += ((centred * scaling) ** 2).sum((0, 2, 3)).double().cpu()
        logits = dots * scaling  # = attention_logits(q, k, scaling, softcap), one matmul
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        attn = torch.softmax(logits, -1).nan_to_num(0.0)
        posf = pos.float()
        self.attn_pos += torch.einsum("bhqk,bnqk->nh", attn, posf).double().cpu()
        npos_row = posf.sum(-1)  # [B, N, S]
        has = (npos_row > 0).float()
        self.rows_pos += has.sum((0, 2)).double().cpu()
        self.n_pos += npos_row.sum((0, 2)).double().cpu()
        self.base_pos += (npos_row / cnt[:, 0, :, 0][:, None]).sum((0, 2)).double().cpu()


def memory_bytes(n_heads: int, n_hyp: int, head_dim: int) -> int:
    """Bytes of the running sums: ``heads × (hypotheses + 1) × D² × 8`` (+ small vectors)."""
    return n_heads * (n_hyp + 1) * head_dim * head_dim * 8 + n_heads * (n_hyp + 1) * 8


@dataclass
class HypothesisExplanation:
    """One hypothesis at one head.

    ``share``: its part of the head's centred logit variance in the greedy attribution
    (``order`` = its step, 0-based); ``solo_share``: its subspace alone; ``random_share``:
    the expected share of a random query subspace of the same rank (``rank / D``);
    ``rank`` / ``rank_energy``: kept rank (energy rank capped at ``max_rank``) and the
    uncapped energy rank; ``singular_values``: ΔC's first 8; ``attention``: the head's mean
    attention mass on the positive keys over rows having one, ``attention_baseline`` the
    same for uniform attention; ``n_pairs``: positive pairs; ``query_basis [D, r]``,
    ``key_basis [D, r]``."""

    name: str
    share: float
    solo_share: float
    random_share: float
    rank: int
    rank_energy: int
    order: int
    singular_values: list[float]
    attention: float
    attention_baseline: float
    n_pairs: int
    query_basis: torch.Tensor
    key_basis: torch.Tensor
    verdict: str = "untested"
    verdict_reason: str = ""


@dataclass
class HeadExplanation:
    """One head: hypotheses sorted by share, the unexplained rest, a one-line sentence;
    ``logit_std``: √(Σ centred logit² ÷ query rows), the scale of what the shares split."""

    layer: int
    head: int
    name: str
    hypotheses: list[HypothesisExplanation]
    unexplained: float
    logit_std: float

    @property
    def top(self) -> HypothesisExplanation | None:
        return self.hypotheses[0] if self.hypotheses else None

    def sentence(self) -> str:
        """``"L17H4: induction — 71 % of the logit variance; previous-token 9 %; rest 20 %"``."""
        if not self.hypotheses:
            return f"{self.name}: no hypothesis had pairs; rest 100 %"
        first, *more = self.hypotheses
        parts = [f"{self.name}: {first.name} — {100 * first.share:.0f} % of the logit variance"]
        if first.verdict != "untested":
            parts[0] += f", {first.verdict}"
        parts += [f"{h.name} {100 * h.share:.0f} %" for h in more[:2] if h.share >= 0.005]
        parts.append(f"rest {100 * self.unexplained:.0f} %")
        return "; ".join(parts)


def _proj_trace(basis: torch.Tensor, g: torch.Tensor) -> float:
    """``tr(B Bᵀ G)`` for an orthonormal ``B [D, r]``."""
    if basis.shape[1] == 0:
        return 0.0
    return float(torch.einsum("dr,de,er->", basis, g, basis))


def explain_head(
    sums: LayerSums,
    index: int,
    names: Sequence[str],
    *,
    layer: int,
    name: str,
    energy: float = 0.9,
    max_rank: int = 8,
    side: str = "key",
    relational: Sequence[str] = (),
) -> HeadExplanation:
    """Subspaces and greedy shares of head ``sums.heads[index]`` (see the module doc);
    ``name`` is its name (``qkcov.models.heads.format_head``)."""
    D = sums.head_dim
    if side not in ("key", "query"):
        raise ValueError(f"side must be 'key' or 'query', got {side!r}")
    g = sums.gram[index]
    g = (g + g.T) / 2
    total = float(torch.trace(g))
    bases, infos = [], []
    qbar = sums.qsum[index] / max(float(sums.n_rows), 1.0)
    centred = set(relational or ())
    for n, _hyp in enumerate(names):
        delta = sums.delta[n, index]
        if _hyp in centred:  # Σ w (q − q̄) kᵀ: the relation, not the shared query direction
            delta = delta - torch.outer(qbar, sums.wkey[n, index])
        has_pairs = float(sums.n_pos[n]) > 0 and bool(torch.isfinite(delta).all())
        if has_pairs and float(delta.abs().max()) > 0:
            s = torch.linalg.svdvals(delta)
            r_e = rank_at_energy(s, energy)
            sub = feature_subspace(delta, rank=min(r_e, max_rank))
            bases.append(sub.key_basis if side == "key" else sub.query_basis)
            infos.append((sub, r_e))
        else:
            bases.append(torch.zeros(D, 0, dtype=torch.float64))
            infos.append((None, 0))
    # greedy order: the largest share given those already chosen
    order: list[int] = []
    span = torch.zeros(D, 0, dtype=torch.float64)
    remaining = list(range(len(names)))
    while remaining:
        best, best_val = remaining[0], -float("inf")
        for i in remaining:
            b = bases[i] - span @ (span.T @ bases[i]) if span.shape[1] else bases[i]
            val = _proj_trace(orthonormalize(b) if b.shape[1] else b, g) if total > 0 else 0.0
            if val > best_val:
                best, best_val = i, val
        order.append(best)
        remaining.remove(best)
        if bases[best].shape[1]:
            span = torch.cat([span, bases[best]], 1)
            span = orthonormalize(span)
    ortho = sequential_bases([bases[i] for i in order]) if order else []
    shares = {
        i: (_proj_trace(b, g) / total if total > 0 else 0.0)
        for i, b in zip(order, ortho, strict=False)
    }
    hyps = []
    for step, i in enumerate(order):
        sub, r_e = infos[i]
        rows = float(sums.rows_pos[i])
        hyps.append(
            HypothesisExplanation(
                name=names[i],
                share=shares[i],
                solo_share=(_proj_trace(bases[i], g) / total) if total > 0 else 0.0,
                random_share=bases[i].shape[1] / D,
                rank=int(bases[i].shape[1]),
                rank_energy=int(r_e),
                order=step,
                singular_values=[] if sub is None else sub.singular_values[:8].tolist(),
                attention=float(sums.attn_pos[i, index]) / rows if rows else 0.0,
                attention_baseline=float(sums.base_pos[i]) / rows if rows else 0.0,
                n_pairs=int(sums.n_pos[i]),
                query_basis=bases[i].float(),
                key_basis=(sub.key_basis if sub is not None else bases[i]).float(),
                verdict="untested",
                verdict_reason="not verified (--verify-top)",
            )
        )
    hyps.sort(key=lambda h: h.share, reverse=True)
    unexplained = 1.0 - sum(shares.values()) if total > 0 else 1.0
    n_rows = float(sums.rows_pos.max()) if sums.rows_pos.numel() else 0.0
    std = (float(sums.logit_var[index]) / max(n_rows, 1.0)) ** 0.5
    return HeadExplanation(layer, sums.heads[index], name, hyps, unexplained, std)
