"""Per-prompt data of the report's token view: for a few held-out prompts, the query's
attention to every key before and after the headline swap, and each key's logit split
exactly over the features' query subspaces (:func:`qkcov.core.attribution.attribute`).

No forward of its own when given the swaps' shared unedited forward (``batches``, see
:func:`qkcov.engine.swaps.capture_swap_base`), else one per batch
(:func:`qkcov.models.intervene.capture_layer_input`); the swapped attention is the exact offline recomputation the swap engine uses
(:func:`qkcov.core.intervention.swapped_attention`), so "after" is the query row of the
studied head with the (orig, target) keys exchanged inside the headline key subspace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..core.attribution import attribute
from ..core.intervention import swapped_attention
from ..models.capture import tokenize_batch
from ..models.intervene import capture_layer_input

__all__ = ["collect_token_view", "MAX_PROMPTS", "MAX_TOKENS"]

MAX_PROMPTS = 24  # prompts kept per head (the view says so)
MAX_TOKENS = 512  # longer prompts (query position + 1) are left out of the view


def collect_token_view(
    model: torch.nn.Module,
    tokenizer: Any,
    resolved: Sequence[Any],
    pairs: Sequence[tuple[int, int] | None],
    layer: int,
    head: int,
    key_basis: torch.Tensor | None,
    query_bases: Mapping[str, torch.Tensor],
    *,
    condition: str | None,
    max_prompts: int = MAX_PROMPTS,
    max_tokens: int = MAX_TOKENS,
    batch_size: int = 8,
    spec: Any = None,
    batches: Sequence[Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Token-view data of head ``(layer, head)`` on the first ``max_prompts`` of ``resolved``
    that have a swap pair and at most ``max_tokens`` positions up to the query.

    Returns ``(info, tensors)``: ``info`` (JSON) has ``condition``, ``cap``, ``n_eligible``,
    ``part_names`` and ``prompts`` (record index, JSONL ``line``, decoded ``tokens`` up to the
    query, ``query``, ``positives``, ``negatives``, swapped ``orig``/``target``, ``offset`` into
    the flat tensors); ``tensors`` (``float32``, all prompts' keys concatenated):
    ``attn_before [T]``, ``attn_after [T]`` (absent without a key basis), ``logit [T]``
    (``scaling·q·k``) and ``parts [P+1, T]`` (absent without query bases; ``parts.sum(0) ==
    logit``).
    ``batches``: the head's captured swap batches (``SwapBase.views[head]``, see
    :class:`qkcov.engine.swaps.View`: ``rows`` index ``resolved``, ``query``/``keys`` already
    in the frame, captured with ``pairs``); then no forward is run and ``spec`` is unused.
    """
    eligible = [
        i for i, p in enumerate(pairs) if p is not None and resolved[i].query + 1 <= max_tokens
    ]
    chosen = eligible[:max_prompts]
    names = list(query_bases)
    info: dict[str, Any] = {
        "condition": condition if key_basis is not None else None,
        "cap": max_prompts,
        "max_tokens": max_tokens,
        "n_eligible": len(eligible),
        "n_records": len(resolved),
        "part_names": [*names, "residual"] if names else [],
        "prompts": [],
    }
    before, after, logit, parts = [], [], [], []
    offset = 0
    for idx, q, k, m, scaling, softcap in _captured(
        model, tokenizer, resolved, chosen, layer, head, batch_size, spec, batches
    ):
        batch = [resolved[i] for i in idx]
        orig = torch.tensor([pairs[i][0] for i in idx])
        target = torch.tensor([pairs[i][1] for i in idx])
        bases = [None] if key_basis is None else [None, key_basis.double()]
        attn = swapped_attention(q, k, orig, target, bases, m, scaling, softcap)
        for j, (i, r) in enumerate(zip(idx, batch, strict=True)):
            n = r.query + 1
            before.append(attn[0, j, :n].float())
            if key_basis is not None:
                after.append(attn[1, j, :n].float())
            if names:
                a = attribute(q[j], k[j, :n], dict(query_bases), priority=names,
                              scaling=scaling)  # fmt: skip
                parts.append(a.parts.float())
                logit.append(a.total.float())
            else:
                logit.append((k[j, :n] @ q[j] * scaling).float())
            info["prompts"].append(
                {
                    "record": int(r.index),
                    "line": r.record.line,
                    "tokens": [tokenizer.decode([t]) for t in r.input_ids[:n]],
                    "query": int(r.query),
                    "positives": [int(p) for p in r.positives],
                    "negatives": [int(p) for p in r.negatives],
                    "orig": int(pairs[i][0]),
                    "target": int(pairs[i][1]),
                    "offset": offset,
                    "length": n,
                }
            )
            offset += n
    tensors: dict[str, torch.Tensor] = {}
    if before:
        tensors["attn_before"] = torch.cat(before)
        tensors["logit"] = torch.cat(logit)
        if after:
            tensors["attn_after"] = torch.cat(after)
        if parts:
            tensors["parts"] = torch.cat(parts, dim=1)
    return info, tensors


def _captured(model, tokenizer, resolved, chosen, layer, head, batch_size, spec, batches):
    """``(indices, q [B, D], k [B, S, D], mask [B, S], scaling, softcap)`` per batch of the
    chosen records, in the frame: from the swaps' captured batches, or one forward each."""
    if batches is not None:
        where = {i: (b, j) for b in batches for j, i in enumerate(b.rows)}
        missing = [i for i in chosen if i not in where]
        if missing:
            raise ValueError(f"token view: records {missing[:3]} are not in the captured batches")
        wanted = set(chosen)
        for b in batches:
            rows = [j for j, i in enumerate(b.rows) if i in wanted]
            if rows:
                yield ([b.rows[j] for j in rows], b.query[rows].double(),
                       b.keys[rows].double(), b.mask[rows], b.scaling, b.softcap)  # fmt: skip
        return
    for b0 in range(0, len(chosen), batch_size):
        idx = chosen[b0 : b0 + batch_size]
        batch = [resolved[i] for i in idx]
        ids, mask = tokenize_batch(tokenizer, [r.text for r in batch], "left")
        cap = capture_layer_input(
            model, ids, mask, layer, head, query_positions=[r.query for r in batch],
            answer_tokens=torch.zeros(len(batch), 1, dtype=torch.long),
            keep_hidden=False,
        )  # fmt: skip
        q, k, m = cap.query.cpu().double(), cap.keys.cpu().double(), cap.mask.cpu()
        if spec is not None:  # --frame query: q' = R(p_q)ᵀq, k' = R(p_q)ᵀk (logits unchanged)
            from ..core.rotary import rotate

            pq = torch.tensor([r.query for r in batch])
            q = rotate(q, pq, spec, inverse=True)
            k = rotate(k, pq[:, None], spec, inverse=True)
        yield idx, q, k, m, cap.scaling, cap.softcap
