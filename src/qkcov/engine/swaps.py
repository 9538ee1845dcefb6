"""Causal key swaps inside the real forward pass (METHOD §4, Figs. 7 and 9).

For each record, ``orig`` is the most-attended positive key and ``target`` a random negative
key. Their key coordinates are swapped inside a subspace (``k_orig += V(Vᵀk_tgt − Vᵀk_orig)``
and vice versa) in one head during the forward pass. Every condition is accompanied by
random orthonormal subspaces of equal rank and by the full-key swap (the ceiling).

Cost model (:func:`run_swaps`): per batch, ONE unedited forward
(:func:`qkcov.models.intervene.capture_layer_input`) yields the null log-probs, the head's
query row, keys and mask row at the edited layer, and the hidden state entering it. The
attention-side metrics of every condition and every random draw are then exact offline
recomputations (:func:`qkcov.core.intervention.swapped_attention`). The downstream effect
(answer-token log-prob shift) needs the edited layer's output to flow through the rest of
the network, so it is measured only for the subspace conditions, the ceiling and the first
``n_random_downstream`` draws, each resumed at the edited layer (layers ``0..L-1`` are not
re-run) with several conditions stacked into one batch. Only the answer tokens' log-probs
are kept (``[n, 2]`` per condition), so memory does not grow with the vocabulary.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.causal import centroid_patch
from ..core.intervention import swap_metrics_per_prompt, swapped_attention
from ..core.rotary import RotarySpec, rotate
from ..core.subspace import random_orthonormal
from ..models.capture import tokenize_batch
from ..models.intervene import (
    KeySwap,
    answer_logprobs,
    can_resume,
    capture_layer_input,
    swap_keys_forward,
)
from ..models.loading import model_info

__all__ = ["swap_pairs", "run_swaps", "METRICS"]

METRICS = ("delta_p", "flip_items", "flip_all", "logprob_shift")

# rows (conditions × prompts) per resumed forward; larger batches amortise per-call overhead
_SUFFIX_ROWS = 64


def swap_pairs(
    resolved: Sequence[Any], rows_for_head: torch.Tensor, seed: int = 0
) -> list[tuple[int, int] | None]:
    """Per record ``(orig, target)`` key positions, or ``None`` without both sides.

    ``rows_for_head [n, S]``: each record's query-row attention of the studied head
    (unpadded), e.g. ``attention_rows(...)[:, layer, head]``.
    """
    if rows_for_head.shape[0] != len(resolved):
        raise ValueError(
            f"rows_for_head has {rows_for_head.shape[0]} rows for {len(resolved)} records"
        )
    rng = random.Random(seed)
    pairs: list[tuple[int, int] | None] = []
    for i, r in enumerate(resolved):
        if not r.positives or not r.negatives:
            pairs.append(None)
            continue
        pos = torch.tensor(r.positives)
        orig = int(pos[rows_for_head[i, pos].argmax()])
        pairs.append((orig, rng.choice(r.negatives)))
    return pairs


def _summarise(draws: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    out = {}
    for key in draws[0]:
        vals = torch.tensor([d[key] for d in draws], dtype=torch.float64)
        out[key] = {
            "mean": float(vals.mean()),
            "std": float(vals.std(unbiased=True)) if len(draws) > 1 else 0.0,
            "draws": [float(f"{v:.6g}") for v in vals.tolist()],  # 6 digits: run.json stays small
        }
    return out


Cond = tuple[str, int | None]  # (condition name | "null" | "ceiling", random draw or None)
Patch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # basis [D, r], mu_pos / mu_neg [P, D]


@dataclass
class _Batch:
    """One batch's unedited forward, kept for the late pass (see ``run_swaps(late=...)``)."""

    ids: torch.Tensor
    mask: torch.Tensor
    qpos: list[int]
    orig: torch.Tensor
    target: torch.Tensor
    tokens: torch.Tensor  # [B, 3]: orig's, target's and the record's answer token
    has_answer: torch.Tensor  # [B] bool
    cand: torch.Tensor
    cap: Any
    rows: list[int]  # indices of the batch's records in ``resolved``
    query: torch.Tensor  # [B, D] in the bases' frame (post-RoPE, or the query frame)
    keys: torch.Tensor  # [B, S, D] likewise
    spec: RotarySpec | None = None  # --frame query: the layer's rotary spec


def _capture(
    model, tokenizer, batch, pairs, layer, head, *, resume, padding_side, spec=None
) -> _Batch:
    ids, mask = tokenize_batch(tokenizer, [r.text for r in batch], padding_side)
    orig = torch.tensor([p[0] for p in pairs])
    target = torch.tensor([p[1] for p in pairs])
    tokens = torch.tensor(
        [
            [r.answer_token(o), r.answer_token(t), r.answer_token(o) if r.answer_id is None else r.answer_id]
            for r, (o, t) in zip(batch, pairs, strict=True)
        ]
    )  # fmt: skip
    has_answer = torch.tensor([r.answer_id is not None for r in batch])
    qpos = [r.query for r in batch]
    cap = capture_layer_input(model, ids, mask, layer, head, query_positions=qpos,
                              answer_tokens=tokens, keep_hidden=resume)  # fmt: skip
    cand = torch.zeros(len(batch), ids.shape[1], dtype=torch.bool)
    for b, r in enumerate(batch):
        cand[b, r.key_positions] = True
    query, keys = cap.query.cpu(), cap.keys.cpu()
    if spec is not None:  # query frame: q' = R(p_q)ᵀq, k' = R(p_q)ᵀk (logits unchanged)
        pq = torch.tensor(qpos)
        query = rotate(query.double(), pq, spec, inverse=True)
        keys = rotate(keys.double(), pq[:, None], spec, inverse=True)
    return _Batch(ids, mask, qpos, orig, target, tokens, has_answer, cand, cap, [], query, keys,
                  spec)  # fmt: skip


def _offline(b: _Batch, bases: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Attention metrics ``{metric: [C, B]}`` of swaps in each of ``bases`` (offline)."""
    cap = b.cap
    attn = swapped_attention(
        b.query, b.keys, b.orig, b.target, [None, *bases], cap.mask.cpu(),
        cap.scaling, cap.softcap,
    )  # fmt: skip
    metrics = swap_metrics_per_prompt(attn[0], attn[1:], b.orig, b.target, b.cand)
    return {key: v.double() for key, v in metrics.items()}


def _swap_batch(
    model: torch.nn.Module,
    b: _Batch,
    layer: int,
    head: int,
    basis_of: Mapping[Cond, torch.Tensor | None],
    downstream: Sequence[Cond],
    *,
    resume: bool,
    chunk: int,
    bar: Any,
) -> dict[Cond, dict[str, torch.Tensor]]:
    """Per-prompt metrics ``[B]`` (float64) of one batch: every condition in ``basis_of``
    offline, plus ``logprob_shift`` for ``downstream`` (and null). This is all that is
    kept per condition, so it has no vocabulary dimension."""
    B = b.ids.shape[0]
    cap = b.cap
    conds = list(basis_of)
    metrics = _offline(b, [basis_of[c] for c in conds])
    out = {c: {key: v[ci] for key, v in metrics.items()} for ci, c in enumerate(conds)}
    # downstream: resumed (or full) edited forwards, several conditions stacked per forward.
    # Without an answer: change of log p(target's token) − log p(orig's token); with the
    # record's answer: minus the change of log p(answer) (positive = away from the answer).
    lp0 = cap.answer_logprobs
    margin0 = lp0[:, 1] - lp0[:, 0]
    if ("null", None) in out:
        out[("null", None)]["logprob_shift"] = torch.zeros(B, dtype=torch.float64)
    for c0 in range(0, len(downstream), chunk):
        group = downstream[c0 : c0 + chunk]
        G = len(group)
        swaps = [KeySwap(int(o), int(t), _post_basis(basis_of[c], p, b.spec)) for c in group
                 for o, t, p in zip(b.orig, b.target, b.qpos, strict=True)]  # fmt: skip
        res = swap_keys_forward(
            model, b.ids.repeat(G, 1), b.mask.repeat(G, 1), layer, head, swaps,
            query_positions=b.qpos * G, hidden_in=cap.hidden.repeat(G, 1, 1) if resume else None,
        )  # fmt: skip
        lp = answer_logprobs(res.logits, b.tokens.repeat(G, 1)).view(G, B, 3)
        del res  # the only [rows, vocab] tensor; freed before the next group
        for ci, c in enumerate(group):
            shift = (lp[ci, :, 1] - lp[ci, :, 0]) - margin0
            out[c]["logprob_shift"] = torch.where(b.has_answer, lp0[:, 2] - lp[ci, :, 2], shift)
        bar.update(1)
    return out


def _post_basis(basis: torch.Tensor, query_pos: int, spec: RotarySpec | None) -> torch.Tensor:
    """A query-frame basis as post-RoPE directions of one prompt: ``R(p_q) V``, so the
    swap edits ``k' = R(p_q)ᵀk`` inside ``span(V)`` and maps it back, ``k_new = R(p_q) k'_new``."""
    if spec is None:
        return basis
    return rotate(basis.double().T, query_pos, spec).T.contiguous()


def run_swaps(
    model: torch.nn.Module,
    tokenizer: Any,
    resolved: Sequence[Any],
    layer: int,
    head: int,
    pairs: Sequence[tuple[int, int] | None],
    bases: Mapping[str, torch.Tensor],
    *,
    n_random: int = 100,
    n_random_downstream: int = 3,
    seed: int = 0,
    batch_size: int = 8,
    padding_side: str = "left",
    progress: bool = True,
    offline: Mapping[str, Sequence[torch.Tensor]] | None = None,
    patches: Mapping[str, Patch] | None = None,
    late: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    spec: RotarySpec | None = None,
) -> dict[str, Any]:
    """Swaps of (orig, target) keys of head ``(layer, head)`` (see the module docstring).

    Args:
        bases: condition name → key-side basis ``[D, r]`` (orthonormal columns); names
            ``"null"`` and ``"ceiling"`` are reserved.
        n_random: random orthonormal bases of each condition's rank (draw ``d`` is
            ``random_orthonormal(D, r, seed=seed * 1000 + 17 * d + r)``, the same for every
            record) — the equal-rank baseline for the attention-side metrics. Cheap (offline).
        n_random_downstream: how many of those draws (the first ones) also get the in-forward
            log-prob measurement; capped at ``n_random``. Each costs one resumed forward of
            layers ``L..end`` per prompt. Default 3: equal-rank random subspaces carry almost
            none of the ΔC direction, so their downstream shifts are small and tightly spread;
            three draws give the baseline's mean and a std at a fixed cost, while the
            attention-side baseline (where the test statistic lives) uses all ``n_random``.
        offline: family name → bases (e.g. label-permuted subspaces, a rank curve's draws):
            attention metrics only, offline from the same forward (no downstream pass).
        patches: name → ``(basis, mu_pos, mu_neg)`` with centroids ``[P, D]`` or per record
            ``[P, len(resolved), D]``: the centroid patch
            (:func:`qkcov.core.causal.centroid_patch`) on every pair, offline.
        late: called with the result of the pass over the batches; returns ``{"bases",
            "offline", "patches"}`` to measure on the same prompts without another forward
            (each batch's layer input is kept until then: ``n × tokens × d_model`` values), e.g.
            a condition chosen from the offline curves. Its conditions get the random draws of
            ``bases`` (attention side) and a downstream pass of the condition itself (its
            random draws get none, so ``random[name]`` has no ``logprob_shift``).
        spec: the layer's rotary spec for query-frame bases (``--frame query``): attention
            metrics are computed on ``R(p_q)ᵀ``-rotated q/k and the in-forward swap uses
            ``R(p_q) V`` on the post-RoPE keys; ``None`` = bases are post-RoPE directions.

    Returns ``{"n", "ranks", "n_random", "n_random_downstream", "null", "conditions": {name:
    metrics}, "random": {name: {metric: {"mean", "std", "draws"}}}, "ceiling", "per_prompt":
    {"null" | name | "ceiling": {metric: [n floats]}}, "offline": {family: {metric: [draws, n]
    tensor}}, "patches": {name: {key: [P, n] tensor}}, "answers": {"n", "top1", "mean_rank"}
    or None}`` where metrics are means over prompts of
    :func:`qkcov.core.intervention.swap_metrics` plus ``logprob_shift``: the change of ``log
    p(target's answer token) − log p(orig's answer token)`` at the next token, or, for records
    with an ``answer``, minus the change of ``log p(answer)``. For random draws the attention
    metrics list all ``n_random`` draws and ``logprob_shift`` the ``n_random_downstream``
    measured ones. ``answers``: the unedited model's rank of each record's answer (records
    with one).
    """
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    if n_random_downstream < 1:
        raise ValueError(f"n_random_downstream must be >= 1, got {n_random_downstream}")
    n_down = min(n_random_downstream, n_random)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(pairs) != len(resolved):
        raise ValueError(f"got {len(pairs)} pairs for {len(resolved)} records")
    D = model_info(model).head_dim
    _check_bases(bases, D)
    keep = [i for i, p in enumerate(pairs) if p is not None]
    if not keep:
        raise ValueError("run_swaps: no record has both a positive and a negative key")

    def plan(named: Mapping[str, torch.Tensor], extra: bool) -> tuple[dict, list]:
        basis_of: dict[Cond, torch.Tensor | None] = {} if extra else {("null", None): None}
        basis_of.update({(name, None): b.double() for name, b in named.items()})
        for name, b in named.items():
            r = int(b.shape[1])
            for d in range(n_random):
                basis_of[(name, d)] = random_orthonormal(D, r, seed=seed * 1000 + 17 * d + r)
        if not extra:
            basis_of[("ceiling", None)] = torch.eye(D, dtype=torch.float64)
        down = [c for c in basis_of if c[0] != "null" and (c[1] is None or c[1] < n_down)]
        return basis_of, down

    resume = can_resume(model, layer)
    basis_of, downstream = plan(bases, extra=False)
    per: dict[Cond, dict[str, list[torch.Tensor]]] = {c: {} for c in basis_of}
    fam: dict[str, dict[str, list[torch.Tensor]]] = {}
    pat: dict[str, dict[str, list[torch.Tensor]]] = {}
    ranks: list[torch.Tensor] = []
    starts = range(0, len(keep), batch_size)
    chunk = max(1, _SUFFIX_ROWS // batch_size)
    n_chunks = -(-len(downstream) // chunk)
    bar = tqdm(total=len(starts) * (1 + n_chunks), desc=f"swaps L{layer}H{head}", unit="fwd",
               disable=not progress)  # fmt: skip
    kept: list[_Batch] = []

    def extras(b: _Batch, off: Mapping[str, Sequence[torch.Tensor]] | None,
               pt: Mapping[str, Patch] | None) -> None:  # fmt: skip
        names = [n for n, draws in (off or {}).items() if len(draws)]
        if names:  # every family's draws in one offline recomputation
            m = _offline(b, [x.double() for n in names for x in off[n]])
            start = 0
            for name in names:
                k = len(off[name])
                for key, v in m.items():
                    fam.setdefault(name, {}).setdefault(key, []).append(v[start : start + k])
                start += k
        for name, (basis, mu_p, mu_n) in (pt or {}).items():
            cap = b.cap
            if mu_p.ndim == 3:  # per-record centroids [P, len(resolved), D]
                mu_p, mu_n = mu_p[:, b.rows], mu_n[:, b.rows]
            m = centroid_patch(b.query, b.keys, b.orig, b.target, basis, mu_p,
                               mu_n, cap.mask.cpu(), cap.scaling, cap.softcap)  # fmt: skip
            for key, v in m.items():
                pat.setdefault(name, {}).setdefault(key, []).append(v)

    for start in starts:
        idx = keep[start : start + batch_size]
        b = _capture(model, tokenizer, [resolved[i] for i in idx], [pairs[i] for i in idx],
                     layer, head, resume=resume, padding_side=padding_side, spec=spec)  # fmt: skip
        b.rows = idx
        bar.update(1)
        if b.has_answer.any() and b.cap.answer_ranks is not None:
            ranks.append(b.cap.answer_ranks[b.has_answer, 2])
        state = _swap_batch(model, b, layer, head, basis_of, downstream, resume=resume,
                            chunk=chunk, bar=bar)  # fmt: skip
        for c, m in state.items():
            for key, v in m.items():
                per[c].setdefault(key, []).append(v)
        extras(b, offline, patches)
        if late is not None:
            kept.append(b)
    bar.close()

    out = _assemble(per, fam, pat, bases, n_random, n_down, len(keep), ranks)
    if late is not None:
        more = late(out) or {}
        lb = dict(more.get("bases") or {})
        _check_bases(lb, D)
        clash = set(lb) & set(bases)
        if clash:
            raise ValueError(f"late conditions {sorted(clash)} already exist")
        basis2, down2 = plan(lb, extra=True)
        down2 = [c for c in down2 if c[1] is None]  # random draws: attention side only
        per2: dict[Cond, dict[str, list[torch.Tensor]]] = {c: {} for c in basis2}
        fam.clear(), pat.clear()
        bar2 = tqdm(total=0, disable=True)
        for b in kept:
            if basis2:
                state = _swap_batch(model, b, layer, head, basis2, down2, resume=resume,
                                    chunk=chunk, bar=bar2)  # fmt: skip
                for c, m in state.items():
                    for key, v in m.items():
                        per2[c].setdefault(key, []).append(v)
            extras(b, more.get("offline"), more.get("patches"))
        kept.clear()
        out2 = _assemble(per2, fam, pat, lb, n_random, n_down, len(keep), [])
        for key in ("ranks", "conditions", "random", "per_prompt", "offline", "patches"):
            out[key].update(out2[key])
    return out


def _check_bases(bases: Mapping[str, torch.Tensor], D: int) -> None:
    for name, b in bases.items():
        if name in ("null", "ceiling"):
            raise ValueError(f"basis name {name!r} is reserved; rename that condition")
        if b.ndim != 2 or b.shape[0] != D or b.shape[1] < 1:
            raise ValueError(f"basis {name!r} must be [head_dim={D}, r>=1], got {list(b.shape)}")


def _assemble(per, fam, pat, bases, n_random, n_down, n, ranks) -> dict[str, Any]:
    values = {c: {k: torch.cat(v).double() for k, v in m.items()} for c, m in per.items()}

    def means(c: Cond) -> dict[str, float]:
        return {k: float(v.mean()) for k, v in values[c].items()}

    def listed(c: Cond) -> dict[str, list[float]]:
        return {k: v.tolist() for k, v in values[c].items()}

    named = {name: (name, None) for name in bases}
    if ("null", None) in values:
        named |= {"null": ("null", None), "ceiling": ("ceiling", None)}
    r = torch.cat(ranks).double() if ranks else None
    return {
        "n": n,
        "ranks": {name: int(b.shape[1]) for name, b in bases.items()},
        "n_random": n_random,
        "n_random_downstream": n_down,
        "null": means(("null", None)) if ("null", None) in values else None,
        "conditions": {name: means((name, None)) for name in bases},
        "random": {name: _random(name, n_random, means) for name in bases},
        "ceiling": means(("ceiling", None)) if ("ceiling", None) in values else None,
        "per_prompt": {key: listed(c) for key, c in named.items()},
        "offline": {f: {k: torch.cat(v, dim=1) for k, v in m.items()} for f, m in fam.items()},
        "patches": {p: {k: torch.cat(v, dim=1) for k, v in m.items()} for p, m in pat.items()},
        "answers": None
        if r is None
        else {"n": int(r.numel()), "top1": float((r == 0).double().mean()), "mean_rank": float(r.mean() + 1)},
    }  # fmt: skip


def _random(name: str, n_random: int, means) -> dict[str, dict[str, Any]]:
    """Across-draw summary; ``logprob_shift`` only over the draws measured downstream."""
    draws = [means((name, d)) for d in range(n_random)]
    attn = _summarise([{k: v for k, v in m.items() if k != "logprob_shift"} for m in draws])
    down = [{"logprob_shift": m["logprob_shift"]} for m in draws if "logprob_shift" in m]
    return attn | (_summarise(down) if down else {})
