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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

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
            "draws": vals.tolist(),
        }
    return out


Cond = tuple[str, int | None]  # (condition name | "null" | "ceiling", random draw or None)


def _swap_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    batch: Sequence[Any],
    pairs: Sequence[tuple[int, int]],
    layer: int,
    head: int,
    basis_of: Mapping[Cond, torch.Tensor | None],
    downstream: Sequence[Cond],
    *,
    resume: bool,
    padding_side: str,
    chunk: int,
    bar: Any,
    spec: RotarySpec | None = None,
) -> dict[Cond, dict[str, torch.Tensor]]:
    """Per-prompt metrics ``[B]`` (float64) of one batch: every condition in ``basis_of``
    offline, plus ``logprob_shift`` for ``downstream`` (and null). This is all that is
    kept per condition, so it has no vocabulary dimension."""
    B = len(batch)
    ids, mask = tokenize_batch(tokenizer, [r.text for r in batch], padding_side)
    qpos = [r.query for r in batch]
    orig = torch.tensor([p[0] for p in pairs])
    target = torch.tensor([p[1] for p in pairs])
    tokens = torch.tensor(
        [[r.answer_token(o), r.answer_token(t)] for r, (o, t) in zip(batch, pairs, strict=True)]
    )  # [B, 2]: orig's and target's answer token
    cap = capture_layer_input(model, ids, mask, layer, head, query_positions=qpos,
                              answer_tokens=tokens, keep_hidden=resume)  # fmt: skip
    bar.update(1)
    # attention side: every condition and draw, offline ([C, B, S])
    cand = torch.zeros(B, ids.shape[1], dtype=torch.bool)
    for b, r in enumerate(batch):
        cand[b, r.key_positions] = True
    conds = list(basis_of)
    query, keys = cap.query.cpu(), cap.keys.cpu()
    if spec is not None:  # query frame: q' = R(p_q)ᵀq, k' = R(p_q)ᵀk (logits unchanged)
        pq = torch.tensor(qpos)
        query = rotate(query.double(), pq, spec, inverse=True)
        keys = rotate(keys.double(), pq[:, None], spec, inverse=True)
    attn = swapped_attention(
        query, keys, orig, target, [basis_of[c] for c in conds],
        cap.mask.cpu(), cap.scaling, cap.softcap,
    )  # fmt: skip
    before = attn[conds.index(("null", None))]
    metrics = swap_metrics_per_prompt(before, attn, orig, target, cand)
    out = {c: {key: v[ci].double() for key, v in metrics.items()} for ci, c in enumerate(conds)}
    # downstream: resumed (or full) edited forwards, several conditions stacked per forward
    margin0 = cap.answer_logprobs[:, 1] - cap.answer_logprobs[:, 0]
    out[("null", None)]["logprob_shift"] = torch.zeros(B, dtype=torch.float64)
    for c0 in range(0, len(downstream), chunk):
        group = downstream[c0 : c0 + chunk]
        G = len(group)
        swaps = [KeySwap(int(o), int(t), _post_basis(basis_of[c], p, spec)) for c in group
                 for o, t, p in zip(orig, target, qpos, strict=True)]  # fmt: skip
        res = swap_keys_forward(
            model, ids.repeat(G, 1), mask.repeat(G, 1), layer, head, swaps,
            query_positions=qpos * G, hidden_in=cap.hidden.repeat(G, 1, 1) if resume else None,
        )  # fmt: skip
        lp = answer_logprobs(res.logits, tokens.repeat(G, 1)).view(G, B, 2)
        del res  # the only [rows, vocab] tensor; freed before the next group
        for ci, c in enumerate(group):
            out[c]["logprob_shift"] = (lp[ci, :, 1] - lp[ci, :, 0]) - margin0
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
        spec: the layer's rotary spec for query-frame bases (``--frame query``): attention
            metrics are computed on ``R(p_q)ᵀ``-rotated q/k and the in-forward swap uses
            ``R(p_q) V`` on the post-RoPE keys; ``None`` = bases are post-RoPE directions.

    Returns ``{"n", "ranks", "n_random", "n_random_downstream", "null", "conditions": {name:
    metrics}, "random": {name: {metric: {"mean", "std", "draws"}}}, "ceiling", "per_prompt":
    {"null" | name | "ceiling": {metric: [n floats]}}}`` where metrics are means over prompts
    of :func:`qkcov.core.intervention.swap_metrics` plus ``logprob_shift`` (change of
    ``log p(target's answer token) − log p(orig's answer token)`` at the next token). For
    random draws the attention metrics list all ``n_random`` draws and ``logprob_shift`` the
    ``n_random_downstream`` measured ones.
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
    for name, b in bases.items():
        if name in ("null", "ceiling"):
            raise ValueError(f"basis name {name!r} is reserved; rename that condition")
        if b.ndim != 2 or b.shape[0] != D or b.shape[1] < 1:
            raise ValueError(f"basis {name!r} must be [head_dim={D}, r>=1], got {list(b.shape)}")
    keep = [i for i, p in enumerate(pairs) if p is not None]
    if not keep:
        raise ValueError("run_swaps: no record has both a positive and a negative key")
    ranks = {name: int(b.shape[1]) for name, b in bases.items()}
    basis_of: dict[Cond, torch.Tensor | None] = {("null", None): None}
    basis_of.update({(name, None): b.double() for name, b in bases.items()})
    for name, r in ranks.items():
        for d in range(n_random):
            basis_of[(name, d)] = random_orthonormal(D, r, seed=seed * 1000 + 17 * d + r)
    basis_of[("ceiling", None)] = torch.eye(D, dtype=torch.float64)
    downstream = [c for c in basis_of if c[0] != "null" and (c[1] is None or c[1] < n_down)]
    resume = can_resume(model, layer)

    per: dict[Cond, dict[str, list[torch.Tensor]]] = {c: {} for c in basis_of}
    starts = range(0, len(keep), batch_size)
    chunk = max(1, _SUFFIX_ROWS // batch_size)
    n_chunks = -(-len(downstream) // chunk)
    bar = tqdm(total=len(starts) * (1 + n_chunks), desc=f"swaps L{layer}H{head}", unit="fwd",
               disable=not progress)  # fmt: skip
    for start in starts:
        idx = keep[start : start + batch_size]
        state = _swap_batch(
            model, tokenizer, [resolved[i] for i in idx], [pairs[i] for i in idx], layer, head,
            basis_of, downstream, resume=resume, padding_side=padding_side, chunk=chunk, bar=bar,
            spec=spec,
        )  # fmt: skip
        for c, m in state.items():
            for key, v in m.items():
                per[c].setdefault(key, []).append(v)
    bar.close()

    values = {c: {k: torch.cat(v).double() for k, v in m.items()} for c, m in per.items()}

    def means(c: Cond) -> dict[str, float]:
        return {k: float(v.mean()) for k, v in values[c].items()}

    def listed(c: Cond) -> dict[str, list[float]]:
        return {k: v.tolist() for k, v in values[c].items()}

    named = {name: (name, None) for name in bases} | {
        "null": ("null", None),
        "ceiling": ("ceiling", None),
    }
    return {
        "n": len(keep),
        "ranks": ranks,
        "n_random": n_random,
        "n_random_downstream": n_down,
        "null": means(("null", None)),
        "conditions": {name: means((name, None)) for name in bases},
        "random": {name: _random(name, n_random, means) for name in bases},
        "ceiling": means(("ceiling", None)),
        "per_prompt": {key: listed(c) for key, c in named.items()},
    }


def _random(name: str, n_random: int, means) -> dict[str, dict[str, Any]]:
    """Across-draw summary; ``logprob_shift`` only over the draws measured downstream."""
    draws = [means((name, d)) for d in range(n_random)]
    attn = _summarise([{k: v for k, v in m.items() if k != "logprob_shift"} for m in draws])
    down = [{"logprob_shift": m["logprob_shift"]} for m in draws if "logprob_shift" in m]
    return attn | _summarise(down)
