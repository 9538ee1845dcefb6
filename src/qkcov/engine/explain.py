"""One forward over a corpus explains every head (``qkcov explain``; model-bound).

:func:`tokenize_corpus` cuts documents into token sequences (≤ ``max_len`` tokens);
:func:`plan_corpus` evaluates every hypothesis on every sequence (tokens only) and counts its
positive / negative pairs per query–key offset bin over the whole corpus, so the pair weights
of ΔC (offset-matched negatives) are known before the forward; :func:`explain_heads` runs the
model once per batch through :func:`qkcov.models.capture.attention_hooks` and, inside each
selected layer's attention call, adds that layer's post-RoPE q/k to
:class:`qkcov.core.explain.LayerSums` — nothing per token outlives its layer. The forward ends
after the deepest selected layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.explain import (
    HeadExplanation,
    LayerSums,
    count_pairs,
    explain_head,
    n_bins,
    offset_bins,
    pair_weights,
)
from ..models.capture import LayerCall, _StopForward, attention_hooks, padded_forward
from ..models.heads import format_head
from ..models.loading import input_device, model_info
from ..models.positions import encode
from ..models.verify import causal_mask
from ..tasks.hypotheses import Hypothesis, TokenSeq, token_seq
from .distributed import Dist, all_reduce_sum, broadcast_object, gather_objects, shard_batches

__all__ = ["tokenize_corpus", "CorpusPlan", "plan_corpus", "explain_heads", "attention_example"]


def tokenize_corpus(tokenizer: Any, texts: Sequence[str], max_len: int = 128) -> list[TokenSeq]:
    """Documents → token sequences of at most ``max_len`` tokens (a longer document is cut
    into consecutive pieces; pieces shorter than 2 tokens are dropped)."""
    seqs: list[TokenSeq] = []
    for d, text in enumerate(texts):
        ids, offsets = encode(tokenizer, text)
        for s in range(0, len(ids), max_len):
            piece = slice(s, min(s + max_len, len(ids)))
            if piece.stop - piece.start >= 2:
                seqs.append(token_seq(text, ids[piece], offsets[piece], doc=d, start=s))
    return seqs


@dataclass
class CorpusPlan:
    """Sequences, hypotheses, their pair masks (causal) and corpus-wide pair counts."""

    seqs: list[TokenSeq]
    hypotheses: list[Hypothesis]
    masks: list[torch.Tensor]  # per sequence [N, S, S] bool, key <= query
    pos_counts: torch.Tensor  # [N, n_bins]
    neg_counts: torch.Tensor  # [N, n_bins]

    def hyp_allowed(self, allowed: torch.Tensor) -> torch.Tensor:
        """``allowed [..., S, S]`` → ``[..., N, S, S]``: the first key only where the
        hypothesis takes it (``first_key``)."""
        keep = torch.tensor([h.first_key for h in self.hypotheses])
        first = torch.zeros(allowed.shape[-1], dtype=torch.bool)
        first[0] = True
        ok = ~first[None, :] | keep[:, None]  # [N, S]
        return allowed.unsqueeze(-3) & ok[:, None, :]

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hypotheses]

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)

    def batch(self, idx: Sequence[int], pad_id: int = 0) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids, attention_mask [B, S]``, ``pos [B, N, S, S]``,
        ``weights [B, N, S, S]`` and ``allowed [B, S, S]`` of sequences ``idx``."""
        S = max(len(self.seqs[i]) for i in idx)
        B, N = len(idx), len(self.hypotheses)
        ids = torch.full((B, S), pad_id, dtype=torch.long)
        mask = torch.zeros(B, S, dtype=torch.long)
        pos = torch.zeros(B, N, S, S, dtype=torch.bool)
        allowed = torch.zeros(B, S, S, dtype=torch.bool)
        causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
        for b, i in enumerate(idx):
            n = len(self.seqs[i])
            ids[b, :n] = torch.tensor(self.seqs[i].ids)
            mask[b, :n] = 1
            pos[b, :, :n, :n] = self.masks[i]
            allowed[b, :n, :n] = causal[:n, :n]
        bins = offset_bins(S).expand(B, S, S)
        w = pair_weights(pos, self.hyp_allowed(allowed), bins, self.pos_counts,
                         self.neg_counts, [h.positional for h in self.hypotheses])  # fmt: skip
        return {"input_ids": ids, "attention_mask": mask, "pos": pos, "weights": w,
                "allowed": allowed}  # fmt: skip


def plan_corpus(seqs: Sequence[TokenSeq], hypotheses: Sequence[Hypothesis]) -> CorpusPlan:
    """Evaluate every hypothesis on every sequence; one line for an empty corpus, a corpus of
    one repeated token, or a hypothesis that raises."""
    seqs = list(seqs)
    if not seqs or sum(len(s) for s in seqs) < 2:
        raise ValueError("the corpus is empty: expected text with at least 2 tokens")
    distinct = {t for s in seqs for t in s.ids}
    if len(distinct) < 2:
        raise ValueError(
            f"the corpus is one repeated token (id {next(iter(distinct))}): every hypothesis "
            "would hold everywhere or nowhere; give varied text"
        )
    N = len(hypotheses)
    masks: list[torch.Tensor] = []
    pc = torch.zeros(N, n_bins(), dtype=torch.float64)
    nc = torch.zeros_like(pc)
    plan = CorpusPlan(seqs, list(hypotheses), masks, pc, nc)
    for s in seqs:
        n = len(s)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        allowed = plan.hyp_allowed(causal)  # [N, n, n]
        m = torch.stack([h.mask(s) for h in hypotheses]) & allowed
        masks.append(m)
        p, q = count_pairs(m, allowed, offset_bins(n))
        pc += p
        nc += q
    return plan


def _windowed(allowed: torch.Tensor, window: int | None) -> torch.Tensor:
    """``allowed [..., S, S]`` inside a layer's sliding window (the model's own mask: query
    ``i`` sees key ``j`` iff ``i − window < j ≤ i``); unchanged for a full-attention layer.
    ΔC keeps every causal pair: q·k of a pair outside the window is still a q·k."""
    if not window or allowed.shape[-1] <= window:
        return allowed
    return allowed & causal_mask(allowed.shape[-1], window, allowed.device)


def explain_heads(
    model: torch.nn.Module,
    plan: CorpusPlan,
    heads: Sequence[tuple[int, int]],
    *,
    batch_size: int = 8,
    energy: float = 0.9,
    max_rank: int = 8,
    progress: bool = True,
    pad_id: int = 0,
    dist: Dist | None = None,
) -> tuple[list[HeadExplanation], dict[int, LayerSums]]:
    """One forward per batch over the corpus; every selected head explained.

    Returns the explanations (in ``heads`` order) and the per-layer running sums.
    ``dist`` (under ``torchrun``): this rank runs its whole batches of the one-process
    batching (:func:`qkcov.engine.distributed.shard_batches`) and the sums are added over
    ranks (:func:`reduce_sums`), so every rank returns the one-process result.
    """
    info = model_info(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    sums = {
        layer: LayerSums(hs, len(plan.hypotheses), info.head_dim) for layer, hs in by_layer.items()
    }
    device = input_device(model)
    last = max(by_layer)
    order = sorted(range(len(plan.seqs)), key=lambda i: len(plan.seqs[i]))
    # this rank's whole batches (all of them in one process): each is a one-process batch
    batches = [[order[i] for i in r] for r in shard_batches(len(order), batch_size, dist)]
    show = progress and (dist is None or dist.is_main)
    for idx in tqdm(batches, desc="explain", unit="batch", disable=not show):
        bt = plan.batch(idx, pad_id)
        pos, w, allowed = (bt[k].to(device) for k in ("pos", "weights", "allowed"))

        def hook(call: LayerCall, pos=pos, w=w, allowed=allowed) -> None:
            acc = sums[call.layer]
            hq = torch.tensor(acc.heads, device=call.query.device)
            q = call.query[:, hq]
            k = call.key[:, hq // call.group_size]
            acc.update(q, k, pos, w, _windowed(allowed, call.sliding_window), call.scaling,
                       call.softcap)  # fmt: skip
            if call.layer == last:
                raise _StopForward  # nothing after the deepest selected layer is used

        with (
            torch.no_grad(),
            attention_hooks(model, dict.fromkeys(by_layer, hook)) as session,
            contextlib.suppress(_StopForward),
        ):
            padded_forward(
                model, bt["input_ids"].to(device), bt["attention_mask"].to(device),
                logits_to_keep=1,
            )  # fmt: skip
        session.check_called(model, sorted(by_layer))
    reduce_sums(sums, bool(batches), dist)
    out = []
    for layer, head in heads:
        acc = sums[layer]
        out.append(
            explain_head(
                acc,
                acc.heads.index(head),
                plan.names,
                layer=layer,
                name=format_head(layer, head),
                energy=energy,
                max_rank=max_rank,
                relational=[h.name for h in plan.hypotheses if h.relational],
                gate=[h.name for h in plan.hypotheses if h.first_key],
            )  # fmt: skip
        )
    return out, sums


def reduce_sums(sums: dict[int, LayerSums], ran: bool, dist: Dist | None = None) -> None:
    """Add every rank's :class:`LayerSums` (in place): every ``torch.Tensor`` field of the
    dataclass, whatever fields it has, layer by layer (one collective per layer; the flat
    buffer is one layer's sums, not the whole model's). A field that is not a tensor (the
    layer's ``scaling``, set by each update) is taken from the first rank that ran a batch
    (``ran``). One process: nothing to do."""
    if dist is None or not dist.enabled:
        return
    for layer in sorted(sums):
        acc = sums[layer]
        tensors = [getattr(acc, f.name) for f in dataclasses.fields(acc)]
        all_reduce_sum([t for t in tensors if isinstance(t, torch.Tensor)], dist)
    src = gather_objects(ran, dist).index(True)  # the corpus is never empty: some rank ran
    other = {
        layer: {
            f.name: getattr(acc, f.name)
            for f in dataclasses.fields(acc)
            if not f.init and not isinstance(getattr(acc, f.name), torch.Tensor)
        }
        for layer, acc in sums.items()
    }
    for layer, values in broadcast_object(other, dist, src=src).items():
        for name, value in values.items():
            setattr(sums[layer], name, value)


def attention_example(
    model: torch.nn.Module, seq: TokenSeq, heads: Sequence[tuple[int, int]], query: int = -1
) -> dict[str, list[float]]:
    """Attention of one query row of ``seq`` for every head in ``heads`` (the atlas' token
    view): ``{"L3H4": [a_0, ..., a_q]}``, from the model's own attention implementation
    recomputed exactly in the hook (``softmax(softcap(scaling q·kᵀ) + mask)``)."""
    from ..core.intervention import attention_weights

    device = input_device(model)
    n = len(seq)
    qi = query % n
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    rows: dict[str, list[float]] = {}

    def hook(call: LayerCall) -> None:
        hs = by_layer[call.layer]
        hq = torch.tensor(hs, device=call.query.device)
        q = call.query[0, hq, qi : qi + 1].float()  # [h, 1, D]
        k = call.key[0, hq // call.group_size, : qi + 1].float()  # [h, q+1, D]
        mask = _windowed(torch.ones(qi + 1, qi + 1, dtype=torch.bool, device=q.device),
                         call.sliding_window)[qi]  # fmt: skip
        a = attention_weights(q, k, mask[None, None], call.scaling, call.softcap)[:, 0]
        for j, h in enumerate(hs):
            rows[format_head(call.layer, h)] = [round(float(x), 5) for x in a[j]]

    ids = torch.tensor([seq.ids], device=device)
    with torch.no_grad(), attention_hooks(model, dict.fromkeys(by_layer, hook)):
        padded_forward(model, ids, torch.ones_like(ids), logits_to_keep=1)
    return rows
