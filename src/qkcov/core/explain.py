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
  row). For any symmetric projector ``P``, ``tr(P G)`` is exactly ``Σ_q Σ_k ⟨part_P, total⟩``
  of the row-centred logits — the numerator of
  :func:`qkcov.core.attribution.explain_logits`' ``share`` — so the attribution of every
  logit of the corpus to a hypothesis' key subspace needs only ``G``;
- per hypothesis, the attention mass on its positive keys (with the model's own mask,
  scaling and soft-cap) and the uniform baseline (share of positive keys in the row);
- the gate and the selection (below).

Gate and selection. Softmax ignores a shift shared by a row, so what a head does is set by
each row's logits centred over its keys, and their sum of squares splits exactly in two:

- the **gate**: the first key (the sink) against the mean of the others,
  ``(n−1)/n · (l_0 − l̄_rest)²`` — how much the head attends at all (``sink_share`` of the
  whole; the ``first-token`` hypothesis is this part, ``part = "gate"``);
- the **selection**: the logits of the keys after the first, centred among themselves —
  which of them the head picks.

Hypotheses explain the selection: each is an indicator over the row's keys after the first,
and the head's selection logits are regressed on the indicators by weighted least squares
within rows, with weights ``W_qk`` half the head's own attention among those keys and half
uniform (``SELECTION_ATTENTION = 0.5``). Uniform weights alone let the logits of keys the
head never attends to (strongly suppressed punctuation, say) dominate; attention weights
alone ignore what the head suppresses and follow one key of a sharp row. The sums are
``sel_xx [H, N, N]`` = ``Σ W x̃_n x̃_m``, ``sel_xy [H, N]`` = ``Σ W x̃_n c``, ``sel_yy [H]`` =
``Σ W c²`` (``x̃``, ``c``: indicators and logits centred by the row's ``W``).

:func:`explain_head` ranks the hypotheses by **greedy forward selection**: at each step the
indicator whose addition to those already chosen explains the most selection variance; its
share is that increment of R², so the shares and the unexplained rest sum to 1 exactly and a
hypothesis that only repeats an earlier one gets little. Each hypothesis also gets its ΔC
subspace (SVD, energy rank capped at ``max_rank``) — the key directions in which its positives
differ from their offset-matched negatives — and two exact attributions of it: the part of
the hypothesis' mean logit contrast (positives − negatives, ``tr ΔC``) that the subspace
carries, and the subspace's share of the head's whole logit variance (through ``G``) beside
a random subspace's ``rank / D``. Ranking by the subspaces' variance shares instead does not
find the heads attention-pattern detectors find: a rank-8 subspace of a positional
hypothesis spans the recency directions every head varies along (measured on SmolLM2, see
``docs/explain.md``).

Memory: ``heads × ((hypotheses + 1) × D² + hypotheses²) × 8`` bytes of float64 sums (270
heads × (11 × 64² + 10²) × 8 = 97 MB for SmolLM2-135M), plus per batch and layer
``B × H × S² × 4 × 5`` bytes of logits, weights and centred logits, ``B × H × N × S² × 4`` of
weighted indicators, ``B × N × S² × 5`` of pair masks and weights and ``B × N × H × S × D × 4``
of weighted keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .subspace import feature_subspace, rank_at_energy

__all__ = [
    "OFFSET_EDGES",
    "offset_bins",
    "count_pairs",
    "pair_weights",
    "LayerSums",
    "HypothesisExplanation",
    "HeadExplanation",
    "explain_head",
    "greedy_selection",
    "SELECTION_ATTENTION",
    "memory_bytes",
]

#: Weight of the head's own attention in the selection weights (the rest is uniform).
SELECTION_ATTENTION = 0.5

#: ``subspace_share`` is reported only where ``|tr ΔC| ≥ MIN_CONTRAST × ‖ΔC‖_*`` (the nuclear
#: norm bounds ``|tr ΔC|``): a ratio to a contrast near zero means nothing.
MIN_CONTRAST = 0.1

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
    total_ss: torch.Tensor = field(init=False)  # [H] Σ row-centred logit² (model's logits)
    sink_ss: torch.Tensor = field(init=False)  # [H] the first key's part of total_ss
    sink_attn: torch.Tensor = field(init=False)  # [H] Σ attention on the first key
    gate_rows: torch.Tensor = field(init=False)  # [] rows with the first key and another
    sel_xx: torch.Tensor = field(init=False)  # [H, N, N] Σ W x̃_n x̃_m (selection)
    sel_xy: torch.Tensor = field(init=False)  # [H, N] Σ W x̃_n c
    sel_yy: torch.Tensor = field(init=False)  # [H] Σ W c²
    scaling: float = field(init=False, default=1.0)  # the layer's logit scaling (last update)

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
        self.total_ss = torch.zeros(H, dtype=f64)
        self.sink_ss = torch.zeros(H, dtype=f64)
        self.sink_attn = torch.zeros(H, dtype=f64)
        self.gate_rows = torch.zeros((), dtype=f64)
        self.sel_xx = torch.zeros(H, N, N, dtype=f64)
        self.sel_xy = torch.zeros(H, N, dtype=f64)
        self.sel_yy = torch.zeros(H, dtype=f64)

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
        self.scaling = float(scaling)
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
        raw = dots * scaling  # = attention_logits(q, k, scaling, softcap), one matmul
        if softcap is not None:
            raw = softcap * torch.tanh(raw / softcap)
        logits = raw.masked_fill(~allowed[:, None], float("-inf"))
        attn = torch.softmax(logits, -1).nan_to_num(0.0)
        posf = pos.float()
        self.attn_pos += torch.einsum("bhqk,bnqk->nh", attn, posf).double().cpu()
        npos_row = posf.sum(-1)  # [B, N, S]
        has = (npos_row > 0).float()
        self.rows_pos += has.sum((0, 2)).double().cpu()
        self.n_pos += npos_row.sum((0, 2)).double().cpu()
        self.base_pos += (npos_row / cnt[:, 0, :, 0][:, None]).sum((0, 2)).double().cpu()
        self._gate_and_selection(raw, attn, pos, allowed)

    def _gate_and_selection(
        self, raw: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor
    ) -> None:
        """The exact split of each row's logit variance into the gate (the first key against
        the others) and the selection (among the others), and the selection's weighted
        least-squares sums (module doc, "Gate and selection")."""
        raw = raw.masked_fill(~allowed[:, None], 0.0)  # [B, H, S, S], finite
        am = allowed[:, None].float()
        n_all = am.sum(-1)  # [B, 1, S]
        mean_all = raw.sum(-1) / n_all.clamp_min(1.0)
        self.total_ss += (((raw - mean_all[..., None]) * am) ** 2).sum((0, 2, 3)).double().cpu()
        sel = allowed.clone()
        sel[..., 0] = False
        sm = sel[:, None].float()  # [B, 1, S, S]
        n_sel = sm.sum(-1)  # [B, 1, S]
        gate_rows = allowed[:, None, :, 0].float() * (n_sel > 0).float()  # [B, 1, S]
        mean_sel = (raw * sm).sum(-1) / n_sel.clamp_min(1.0)
        gap = raw[..., 0] - mean_sel  # [B, H, S]
        frac = n_sel / n_all.clamp_min(1.0)
        self.sink_ss += (frac * gap**2 * gate_rows).sum((0, 2)).double().cpu()
        self.sink_attn += (attn[..., 0] * gate_rows).sum((0, 2)).double().cpu()
        self.gate_rows += float(gate_rows.sum())
        # selection weights: half the head's attention among the keys after the first, half
        # uniform over them; each row sums to 1 (0 for a row without such keys)
        a_sel = torch.softmax(raw.masked_fill(~sel[:, None], float("-inf")), -1).nan_to_num(0.0)
        W = SELECTION_ATTENTION * a_sel + (1 - SELECTION_ATTENTION) * sm / n_sel.clamp_min(
            1.0
        ).unsqueeze(-1)
        c = (raw - (W * raw).sum(-1, keepdim=True)) * sm  # weighted row-centred logits
        x = (pos & sel[:, None]).float()  # [B, N, S, S]
        self.sel_xy += torch.einsum("bhqk,bnqk->hn", W * c, x).double().cpu()
        self.sel_yy += (W * c * c).sum((0, 2, 3)).double().cpu()
        xbar = torch.einsum("bhqk,bnqk->bhnq", W, x)  # [B, H, N, S]
        wx = W.unsqueeze(2) * x.unsqueeze(1)  # [B, H, N, S, S]
        xx = torch.einsum("bhnqk,bmqk->hnm", wx, x) - torch.einsum("bhnq,bhmq->hnm", xbar, xbar)
        self.sel_xx += xx.double().cpu()


def memory_bytes(n_heads: int, n_hyp: int, head_dim: int) -> int:
    """Bytes of the running sums: ``heads × ((hypotheses + 1) × D² + hypotheses²) × 8``
    (+ small vectors)."""
    return (
        n_heads * ((n_hyp + 1) * head_dim * head_dim + n_hyp * n_hyp) * 8
        + n_heads * (n_hyp + 1) * 8
    )


@dataclass
class HypothesisExplanation:
    """One hypothesis at one head.

    ``part``: ``"selection"`` (which of the keys after the first the head picks) or
    ``"gate"`` (the first key against the others; ``first-token``). ``share``: a selection
    hypothesis' part of the head's selection variance in the greedy order (``order`` = its
    step, 0-based; shares and the head's ``unexplained`` sum to 1); a gate hypothesis' share
    is the first key's part of the head's whole logit variance (the head's ``sink_share``).
    ``solo_share``: the hypothesis alone. ``logit_contrast``: the mean logit on its positive
    keys minus on their offset-matched negatives (``scaling × tr ΔC``); ``subspace_share``:
    the part of that contrast its rank-``rank`` key subspace carries (``tr(Vᵀ ΔC V) / tr ΔC``
    with the ΔC the subspace came from; ``None`` when ``|tr ΔC| < MIN_CONTRAST × ‖ΔC‖_*``:
    the hypothesis moves the logits little on average, whatever its directions);
    ``subspace_variance``: that key subspace's share of the head's whole centred logit
    variance (exact attribution) and ``random_share`` a random subspace's expectation of it
    (``rank / D``); ``rank`` / ``rank_energy``: kept rank (energy rank capped at
    ``max_rank``) and the uncapped energy rank; ``singular_values``: ΔC's first 8;
    ``attention``: the head's mean attention mass on the positive keys over rows having one,
    ``attention_baseline`` the same for uniform attention; ``n_pairs``: positive pairs;
    ``direction``: +1 when the head's logits are higher on the hypothesis' keys (it picks
    them), −1 when lower (it avoids them: a share counts variance either way), 0 when
    neither; for a selection hypothesis the sign of its indicator's weighted covariance with
    the selection logits (the hypothesis alone), for the gate the sign of ``logit_contrast``;
    ``query_basis [D, r]``, ``key_basis [D, r]``."""

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
    part: str = "selection"
    logit_contrast: float = 0.0
    subspace_share: float | None = None
    subspace_variance: float = 0.0
    direction: int = 0


@dataclass
class HeadExplanation:
    """One head: selection hypotheses sorted by share (gate hypotheses after them), the
    unexplained rest of the selection variance, the first key's ``sink_share`` of the whole
    logit variance and its mean ``sink_attention``; ``logit_std``: √(Σ centred logit² ÷
    query rows), the scale of what the shares split."""

    layer: int
    head: int
    name: str
    hypotheses: list[HypothesisExplanation]
    unexplained: float
    logit_std: float
    sink_share: float = 0.0
    sink_attention: float = 0.0
    example: int | None = None  # the atlas' token view of this head (index into examples)

    @property
    def top(self) -> HypothesisExplanation | None:
        """The hypothesis that explains most of what the head selects (never a gate)."""
        sel = [h for h in self.hypotheses if h.part == "selection"]
        return sel[0] if sel else (self.hypotheses[0] if self.hypotheses else None)

    def sentence(self) -> str:
        """``"L17H4: induction — 41 % of what it selects, reads-feature; number 6 % (avoided);
        unexplained 53 % · first key 78 % of attention"``: a hypothesis whose keys the head
        avoids (``direction`` −1) says so, since a share counts variance either way."""
        sink = f" · first key {100 * self.sink_attention:.0f} % of attention"
        sel = [h for h in self.hypotheses if h.part == "selection"]
        if not sel:
            return f"{self.name}: no hypothesis had pairs among the keys after the first" + sink
        first, *more = sel
        parts = [f"{self.name}: {first.name} — {100 * first.share:.0f} % of what it selects"]
        if first.direction < 0:
            parts[0] += ", by avoiding these keys"
        if first.verdict != "untested":
            parts[0] += f", {first.verdict}"
        parts += [
            f"{h.name} {100 * h.share:.0f} %" + (" (avoided)" if h.direction < 0 else "")
            for h in more[:2]
            if h.share >= 0.005
        ]
        parts.append(f"unexplained {100 * self.unexplained:.0f} %")
        return "; ".join(parts) + sink


def _proj_trace(basis: torch.Tensor, g: torch.Tensor) -> float:
    """``tr(B Bᵀ G)`` for an orthonormal ``B [D, r]``."""
    if basis.shape[1] == 0:
        return 0.0
    return float(torch.einsum("dr,de,er->", basis, g, basis))


def _explained(xx: torch.Tensor, xy: torch.Tensor, idx: Sequence[int]) -> float:
    """``x_Sᵀ A_S⁺ x_S``: the weighted sum of squares the indicators ``idx`` explain together
    (least squares, minimum-norm for collinear ones)."""
    if not idx:
        return 0.0
    i = torch.tensor(list(idx))
    a, b = xx[i][:, i], xy[i]
    beta = torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]
    return float(b @ beta)


def greedy_selection(
    xx: torch.Tensor, xy: torch.Tensor, yy: float, candidates: Sequence[int]
) -> tuple[list[int], dict[int, float], dict[int, float]]:
    """Greedy forward selection: at each step the indicator whose addition explains most;
    returns the order, each step's share (increments of R², summing with the rest to 1) and
    each candidate's solo R²."""
    order: list[int] = []
    shares: dict[int, float] = {}
    solo = {i: (_explained(xx, xy, [i]) / yy if yy > 0 else 0.0) for i in candidates}
    remaining = list(candidates)
    done = 0.0
    while remaining:
        vals = {i: _explained(xx, xy, [*order, i]) for i in remaining}
        best = max(remaining, key=lambda i: (vals[i], -remaining.index(i)))
        now = max(vals[best], done)
        shares[best] = (now - done) / yy if yy > 0 else 0.0
        done = now
        order.append(best)
        remaining.remove(best)
    return order, shares, solo


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
    gate: Sequence[str] = ("first-token",),
    scaling: float | None = None,
) -> HeadExplanation:
    """Shares, subspaces and their attributions of head ``sums.heads[index]`` (see the module
    doc); ``name`` is its name (``qkcov.models.heads.format_head``), ``gate`` the hypotheses
    about the first key, ``scaling`` the head's logit scaling for ``logit_contrast`` (default: the
    one the sums saw)."""
    scaling = sums.scaling if scaling is None else scaling
    D = sums.head_dim
    if side not in ("key", "query"):
        raise ValueError(f"side must be 'key' or 'query', got {side!r}")
    g = sums.gram[index]
    g = (g + g.T) / 2
    total = float(torch.trace(g))
    qbar = sums.qsum[index] / max(float(sums.n_rows), 1.0)
    centred = set(relational or ())
    gates = set(gate or ())
    tot_ss = float(sums.total_ss[index])
    sink_share = float(sums.sink_ss[index]) / tot_ss if tot_ss > 0 else 0.0
    n_q = float(sums.gate_rows)
    sink_attention = float(sums.sink_attn[index]) / n_q if n_q > 0 else 0.0
    xx, xy = sums.sel_xx[index], sums.sel_xy[index]
    yy = float(sums.sel_yy[index])
    candidates = [
        n for n, h in enumerate(names) if h not in gates and float(xx[n, n]) > 1e-12 * max(yy, 1)
    ]
    order, shares, solo = greedy_selection(xx, xy, yy, candidates)
    order += [n for n, h in enumerate(names) if n not in candidates and h not in gates]
    hyps = []
    for n, hyp in enumerate(names):
        delta = sums.delta[n, index]
        if hyp in centred:  # Σ w (q − q̄) kᵀ: the relation, not the shared query direction
            delta = delta - torch.outer(qbar, sums.wkey[n, index])
        has_pairs = float(sums.n_pos[n]) > 0 and bool(torch.isfinite(delta).all())
        sub, r_e, basis = None, 0, torch.zeros(D, 0, dtype=torch.float64)
        if has_pairs and float(delta.abs().max()) > 0:
            s = torch.linalg.svdvals(delta)
            r_e = rank_at_energy(s, energy)
            sub = feature_subspace(delta, rank=min(r_e, max_rank))
            basis = sub.key_basis if side == "key" else sub.query_basis
        tr = float(torch.trace(delta))
        carried = None  # only where the contrast is a real part of what ΔC could give
        if sub is not None and abs(tr) >= MIN_CONTRAST * float(torch.linalg.svdvals(delta).sum()):
            v = sub.key_basis
            carried = float(torch.trace(v.T @ delta @ v)) / tr
        rows = float(sums.rows_pos[n])
        is_gate = hyp in gates
        contrast = scaling * float(torch.trace(sums.delta[n, index]))
        lean = contrast if is_gate else (float(xy[n]) if n in candidates else 0.0)
        scale_lean = 1e-12 * (max(abs(contrast), 1.0) if is_gate else max(yy, 1.0) ** 0.5)
        hyps.append(
            HypothesisExplanation(
                name=hyp,
                share=sink_share if is_gate else shares.get(n, 0.0),
                solo_share=sink_share if is_gate else solo.get(n, 0.0),
                random_share=basis.shape[1] / D,
                rank=int(basis.shape[1]),
                rank_energy=int(r_e),
                order=-1 if is_gate else order.index(n),
                singular_values=[] if sub is None else sub.singular_values[:8].tolist(),
                attention=float(sums.attn_pos[n, index]) / rows if rows else 0.0,
                attention_baseline=float(sums.base_pos[n]) / rows if rows else 0.0,
                n_pairs=int(sums.n_pos[n]),
                query_basis=basis.float(),
                key_basis=(sub.key_basis if sub is not None else basis).float(),
                verdict="untested",
                verdict_reason="not verified (--verify-top)",
                part="gate" if is_gate else "selection",
                logit_contrast=contrast,
                subspace_share=carried,
                subspace_variance=(_proj_trace(basis, g) / total) if total > 0 else 0.0,
                direction=(lean > scale_lean) - (lean < -scale_lean),
            )
        )
    hyps.sort(key=lambda h: (h.part != "selection", -h.share, h.order))
    unexplained = 1.0 - sum(shares.values()) if yy > 0 else 1.0
    n_rows = float(sums.rows_pos.max()) if sums.rows_pos.numel() else 0.0
    std = (float(sums.total_ss[index]) / max(n_rows, 1.0)) ** 0.5
    return HeadExplanation(
        layer, sums.heads[index], name, hyps, unexplained, std, sink_share, sink_attention
    )
