"""Reference for the swap engine: the pre-rewrite ``qkcov.engine.swaps.run_swaps``.

One full forward per condition and random draw per batch through ``swap_keys_forward``,
keeping full-vocabulary float64 log-probs. Kept out of the package; the tests check the
fast engine against it and ``benchmarks/swap_speed.py`` times it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from qkcov.core.intervention import swap_metrics
from qkcov.core.subspace import random_orthonormal
from qkcov.models.capture import tokenize_batch
from qkcov.models.intervene import KeySwap, swap_keys_forward
from qkcov.models.loading import model_info


def _metrics(
    before, after, lp_before, lp_after, orig, target, candidates, tok_o, tok_t
) -> dict[str, float]:
    m = swap_metrics(before, after, orig, target, candidates)
    rows = torch.arange(before.shape[0])
    margin0 = lp_before[rows, tok_t] - lp_before[rows, tok_o]
    margin1 = lp_after[rows, tok_t] - lp_after[rows, tok_o]
    m["logprob_shift"] = float((margin1 - margin0).mean())
    return m


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


def _run_swaps_reference(
    model: torch.nn.Module,
    tokenizer: Any,
    resolved: Sequence[Any],
    layer: int,
    head: int,
    pairs: Sequence[tuple[int, int] | None],
    bases: Mapping[str, torch.Tensor],
    *,
    n_random: int = 10,
    seed: int = 0,
    batch_size: int = 8,
    padding_side: str = "left",
    progress: bool = True,
) -> dict[str, Any]:
    """The pre-rewrite ``run_swaps``: one full forward per condition and draw per batch.

    Args:
        bases: condition name → key-side basis ``[D, r]`` (orthonormal columns).
        n_random: random orthonormal bases of each condition's rank (same draws for every
            record, seeded) — the equal-rank baseline.

    Returns ``{"n", "ranks", "null", "conditions": {name: metrics}, "random": {name:
    {metric: {"mean", "std", "draws"}}}, "ceiling": metrics}`` where metrics are
    :func:`qkcov.core.intervention.swap_metrics` plus ``logprob_shift`` (change of
    ``log p(target's answer token) − log p(orig's answer token)`` at the next token).
    """
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    if len(pairs) != len(resolved):
        raise ValueError(f"got {len(pairs)} pairs for {len(resolved)} records")
    D = model_info(model).head_dim
    for name, b in bases.items():
        if b.ndim != 2 or b.shape[0] != D or b.shape[1] < 1:
            raise ValueError(f"basis {name!r} must be [head_dim={D}, r>=1], got {list(b.shape)}")
    keep = [i for i, p in enumerate(pairs) if p is not None]
    if not keep:
        raise ValueError("run_swaps: no record has both a positive and a negative key")
    ranks = {name: int(b.shape[1]) for name, b in bases.items()}
    random_bases = {
        name: [random_orthonormal(D, r, seed=seed * 1000 + 17 * d + r) for d in range(n_random)]
        for name, r in ranks.items()
    }
    conditions: list[tuple[str, int | None, torch.Tensor | None]] = [("null", None, None)]
    conditions += [(name, None, b.double()) for name, b in bases.items()]
    conditions += [(name, d, rb) for name, rbs in random_bases.items() for d, rb in enumerate(rbs)]
    conditions.append(("ceiling", None, torch.eye(D, dtype=torch.float64)))

    S = max(len(resolved[i].input_ids) for i in keep)
    collected: dict[tuple[str, int | None], list[tuple[torch.Tensor, torch.Tensor]]] = {
        c[:2]: [] for c in conditions
    }
    orig_all, target_all, cand_all, tok_o_all, tok_t_all = [], [], [], [], []
    total = len(range(0, len(keep), batch_size)) * len(conditions)
    bar = tqdm(total=total, desc=f"swaps L{layer}H{head}", unit="fwd", disable=not progress)
    for start in range(0, len(keep), batch_size):
        idx = keep[start : start + batch_size]
        batch = [resolved[i] for i in idx]
        ids, mask = tokenize_batch(tokenizer, [r.text for r in batch], padding_side)
        qpos = [r.query for r in batch]
        orig = torch.tensor([pairs[i][0] for i in idx])
        target = torch.tensor([pairs[i][1] for i in idx])
        cand = torch.zeros(len(batch), S, dtype=torch.bool)
        for b, r in enumerate(batch):
            cand[b, r.key_positions] = True
        orig_all.append(orig)
        target_all.append(target)
        cand_all.append(cand)
        tok_o_all.append(
            torch.tensor([r.answer_token(int(o)) for r, o in zip(batch, orig, strict=True)])
        )
        tok_t_all.append(
            torch.tensor([r.answer_token(int(t)) for r, t in zip(batch, target, strict=True)])
        )
        for name, draw, basis in conditions:
            swaps = (
                [None] * len(batch)
                if basis is None
                else [KeySwap(int(o), int(t), basis) for o, t in zip(orig, target, strict=True)]
            )
            res = swap_keys_forward(model, ids, mask, layer, head, swaps, query_positions=qpos)
            attn = torch.zeros(len(batch), S)
            attn[:, : res.attention.shape[1]] = res.attention[:, :S].float().cpu()
            logp = torch.log_softmax(res.logits.double().cpu(), dim=-1)
            collected[(name, draw)].append((attn, logp))
            bar.update(1)
    bar.close()
    orig, target = torch.cat(orig_all), torch.cat(target_all)
    cand, tok_o, tok_t = torch.cat(cand_all), torch.cat(tok_o_all), torch.cat(tok_t_all)

    def cat(key):
        parts = collected[key]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    a0, lp0 = cat(("null", None))

    def metrics(key) -> dict[str, float]:
        a1, lp1 = cat(key)
        return _metrics(a0, a1, lp0, lp1, orig, target, cand, tok_o, tok_t)

    return {
        "n": len(keep),
        "ranks": ranks,
        "n_random": n_random,
        "null": metrics(("null", None)),
        "conditions": {name: metrics((name, None)) for name in bases},
        "random": {
            name: _summarise([metrics((name, d)) for d in range(n_random)]) for name in bases
        },
        "ceiling": metrics(("ceiling", None)),
    }
