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
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.causal import centroid_patch
from ..core.intervention import capped_softmax, swap_metrics_per_prompt, swapped_attention
from ..core.rotary import RotarySpec, rotate
from ..core.subspace import random_orthonormal
from ..models.capture import tokenize_batch
from ..models.intervene import (
    KeySwap,
    answer_logprobs,
    can_resume,
    capture_layer_inputs,
    swap_keys_forward,
    token_ranks,
)
from ..models.loading import model_info

__all__ = ["swap_pairs", "swap_targets", "run_swaps", "capture_swap_base", "SwapBase", "METRICS"]

METRICS = ("delta_p", "flip_items", "flip_all", "logprob_shift")

# rows (conditions × prompts) per resumed forward; larger batches amortise per-call overhead
_SUFFIX_ROWS = 64


def swap_targets(resolved: Sequence[Any], seed: int = 0) -> list[int | None]:
    """Per record the swap's ``target``: a random negative key (``None`` without both sides).

    The draws do not depend on the head, so every studied head swaps the same targets."""
    rng = random.Random(seed)
    return [rng.choice(r.negatives) if r.positives and r.negatives else None for r in resolved]


def swap_pairs(
    resolved: Sequence[Any], rows_for_head: torch.Tensor, seed: int = 0
) -> list[tuple[int, int] | None]:
    """Per record ``(orig, target)`` key positions, or ``None`` without both sides.

    ``rows_for_head [n, S]``: each record's query-row attention of the studied head
    (unpadded), e.g. ``attention_rows(...)[:, layer, head]``; ``orig`` is its most-attended
    positive key, ``target`` :func:`swap_targets`.
    """
    if rows_for_head.shape[0] != len(resolved):
        raise ValueError(
            f"rows_for_head has {rows_for_head.shape[0]} rows for {len(resolved)} records"
        )
    pairs: list[tuple[int, int] | None] = []
    for i, (r, t) in enumerate(zip(resolved, swap_targets(resolved, seed), strict=True)):
        if t is None:
            pairs.append(None)
            continue
        pos = torch.tensor(r.positives)
        pairs.append((int(pos[rows_for_head[i, pos].argmax()]), t))
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


def _tokens(batch: Sequence[Any], pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``[B, 3]``: orig's, target's and the record's answer token (orig's without one)."""
    return torch.tensor(
        [
            [r.answer_token(o), r.answer_token(t), r.answer_token(o) if r.answer_id is None else r.answer_id]
            for r, (o, t) in zip(batch, pairs, strict=True)
        ]
    )  # fmt: skip


def _batch(ids, mask, batch, pairs, cap, logits, spec) -> _Batch:
    """A head's view of one captured batch: its swap pairs, answer log-probs, q/k in frame."""
    orig = torch.tensor([p[0] for p in pairs])
    target = torch.tensor([p[1] for p in pairs])
    tokens = _tokens(batch, pairs)
    cap.answer_logprobs = answer_logprobs(logits, tokens)
    cap.answer_ranks = token_ranks(logits, tokens)
    has_answer = torch.tensor([r.answer_id is not None for r in batch])
    qpos = [r.query for r in batch]
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


def _capture(
    model, tokenizer, batch, pairs, layer, head, *, resume, padding_side, spec=None
) -> _Batch:
    ids, mask = tokenize_batch(tokenizer, [r.text for r in batch], padding_side)
    caps, logits = capture_layer_inputs(
        model, ids, mask, [(layer, head)], query_positions=[r.query for r in batch],
        keep_hidden=resume,
    )  # fmt: skip
    return _batch(ids, mask, batch, pairs, next(iter(caps.values())), logits, spec)


@dataclass
class SwapBase:
    """The swaps' unedited state, shared by every studied head: ONE forward per batch of the
    swap records (those with a positive and a negative key), seen from all heads at once.

    ``keep``: indices (into the records passed) of the swap records, in batch order;
    ``pairs[head]``: per record ``(orig, target)`` or ``None`` (``orig`` = the head's
    most-attended positive key in this very forward); ``batches[head]``: that head's
    :class:`_Batch` per batch, ready for :func:`run_swaps` (``base=``) and the token view.
    Holds each batch's hidden state entering every studied layer (one copy per layer).
    """

    keep: list[int]
    pairs: dict[tuple[int, int], list[tuple[int, int] | None]]
    batches: dict[tuple[int, int], list[_Batch]]
    resume: dict[int, bool]
    mine: list[int] = field(default_factory=list)  # this rank's batch indices (``batches``)
    views: dict[tuple[int, int], list[View]] = field(default_factory=dict)  # every batch
    dist: Any = None


@dataclass
class View:
    """What the token view reads of one captured batch (every rank holds every batch's):
    ``rows`` (record indices), ``query [B, D]`` / ``keys [B, S, D]`` in the bases' frame,
    ``mask [B, S]`` (additive, unpadded), ``scaling``, ``softcap``."""

    rows: list[int]
    query: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor
    scaling: float
    softcap: float | None


def capture_swap_base(
    model: torch.nn.Module,
    tokenizer: Any,
    resolved: Sequence[Any],
    heads: Sequence[tuple[int, int]],
    *,
    seed: int = 0,
    batch_size: int = 8,
    padding_side: str = "left",
    specs: Mapping[int, RotarySpec | None] | None = None,
    progress: bool = True,
    dist: Any = None,
) -> SwapBase:
    """:class:`SwapBase` of ``heads`` on ``resolved`` (targets: :func:`swap_targets` with
    ``seed``; ``specs``: layer → rotary spec for query-frame bases, see :func:`run_swaps`).

    ``dist`` (torchrun): each rank forwards its whole batches (batch ``b`` on rank
    ``b % world``, as :func:`qkcov.engine.distributed.shard_batches`); :func:`run_swaps` then
    measures those and gathers the per-batch results, so every rank returns the one-process
    result. The pairs and the token view's :class:`View` of every batch are gathered here."""
    from .distributed import gather_objects, shard_batches

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    heads = [(int(l), int(h)) for l, h in heads]
    targets = swap_targets(resolved, seed)
    keep = [i for i, t in enumerate(targets) if t is not None]
    layers = sorted({l for l, _ in heads})
    resume_all = all(can_resume(model, l) for l in layers)
    pairs: dict[tuple[int, int], list[tuple[int, int] | None]] = {
        h: [None] * len(resolved) for h in heads
    }
    batches: dict[tuple[int, int], list[_Batch]] = {h: [] for h in heads}
    shards = shard_batches(len(keep), batch_size, dist)
    for shard in tqdm(shards, desc="swap base", unit="fwd", disable=not progress):
        idx = [keep[j] for j in shard]
        batch = [resolved[i] for i in idx]
        ids, mask = tokenize_batch(tokenizer, [r.text for r in batch], padding_side)
        caps, logits = capture_layer_inputs(
            model, ids, mask, heads, query_positions=[r.query for r in batch],
            keep_hidden=resume_all,
        )  # fmt: skip
        for h in heads:
            cap = caps[h]
            q, k = cap.query.cpu().double(), cap.keys.cpu().double()
            scores = (k @ q[:, :, None])[..., 0] * cap.scaling
            row = capped_softmax(scores, cap.mask.cpu(), cap.softcap)  # [B, S] unpadded
            hp = []
            for j, (i, r) in enumerate(zip(idx, batch, strict=True)):
                pos = torch.tensor(r.positives)
                hp.append((int(pos[row[j, pos].argmax()]), int(targets[i])))
                pairs[h][i] = hp[-1]
            b = _batch(ids, mask, batch, hp, cap, logits, (specs or {}).get(h[0]))
            b.rows = idx
            batches[h].append(b)
        del logits
    mine = [shard.start // batch_size for shard in shards]
    views = {
        h: [(bi, View(b.rows, b.query, b.keys, b.cap.mask.cpu(), b.cap.scaling, b.cap.softcap))
            for bi, b in zip(mine, batches[h], strict=True)]
        for h in heads
    }  # fmt: skip
    if dist is not None and dist.enabled:
        own = {h: {i: p for i, p in enumerate(pairs[h]) if p is not None} for h in heads}
        parts = gather_objects((own, views), dist)
        views = {h: [v for _, vs in parts for v in vs[h]] for h in heads}
        for h in heads:  # every rank's pairs, placed by record
            got = {i: p for ps, _ in parts for i, p in ps[h].items()}
            pairs[h] = [got.get(i) for i in range(len(resolved))]
    views = {h: [v for _, v in sorted(vs, key=lambda x: x[0])] for h, vs in views.items()}
    return SwapBase(keep, pairs, batches, {l: resume_all for l in layers}, mine, views, dist)


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
    # a full-rank basis (a condition of rank D or any of its random draws) swaps the whole
    # key: the same edit as the ceiling, so it reuses the ceiling's pass
    D = b.query.shape[-1]
    ceiling = ("ceiling", None)
    same = {
        c: ceiling
        for c in downstream
        if ceiling in downstream and c != ceiling and int(basis_of[c].shape[1]) == D
    }
    downstream = [c for c in downstream if c not in same]
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
    for c, c_same in same.items():
        out[c]["logprob_shift"] = out[c_same]["logprob_shift"].clone()
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
    base: SwapBase | None = None,
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
        base: the shared unedited forward (:func:`capture_swap_base` over the same
            ``resolved`` with this head; ``pairs`` must be ``base.pairs[(layer, head)]``):
            no forward of its own, only the downstream passes.

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

    prepared: list[_Batch] = []
    if base is not None:
        key = (model_info(model).n_layers + layer if layer < 0 else layer, head)
        if key not in base.batches or base.keep != keep:
            raise ValueError(
                f"run_swaps: the shared base holds no batches of head {key} for these pairs"
            )
        prepared = base.batches[key]
        if [b.rows for b in prepared] != [
            keep[bi * batch_size : (bi + 1) * batch_size] for bi in base.mine
        ]:
            raise ValueError("run_swaps: the shared base was captured with another batch_size")
    resume = base.resume[key[0]] if base is not None else can_resume(model, layer)
    dist = base.dist if base is not None else None
    basis_of, downstream = plan(bases, extra=False)
    starts = list(range(0, len(keep), batch_size))
    mine = base.mine if base is not None else list(range(len(starts)))  # this rank's batches
    chunk = max(1, _SUFFIX_ROWS // batch_size)
    n_chunks = -(-len(downstream) // chunk)
    bar = tqdm(total=len(mine) * ((not prepared) + n_chunks), desc=f"swaps L{layer}H{head}",
               unit="fwd", disable=not progress)  # fmt: skip
    kept: list[_Batch] = []

    def extras(b: _Batch, off: Mapping[str, Sequence[torch.Tensor]] | None,
               pt: Mapping[str, Patch] | None) -> tuple[dict, dict]:  # fmt: skip
        fam_b: dict[str, dict[str, torch.Tensor]] = {}
        pat_b: dict[str, dict[str, torch.Tensor]] = {}
        names = [n for n, draws in (off or {}).items() if len(draws)]
        if names:  # every family's draws in one offline recomputation
            m = _offline(b, [x.double() for n in names for x in off[n]])
            start = 0
            for name in names:
                k = len(off[name])
                fam_b[name] = {key: v[start : start + k] for key, v in m.items()}
                start += k
        for name, (basis, mu_p, mu_n) in (pt or {}).items():
            cap = b.cap
            if mu_p.ndim == 3:  # per-record centroids [P, len(resolved), D]
                mu_p, mu_n = mu_p[:, b.rows], mu_n[:, b.rows]
            pat_b[name] = centroid_patch(b.query, b.keys, b.orig, b.target, basis, mu_p,
                                         mu_n, cap.mask.cpu(), cap.scaling, cap.softcap)  # fmt: skip
        return fam_b, pat_b

    results: list[tuple[int, dict[str, Any]]] = []  # (batch index, what the batch measured)
    for j, bi in enumerate(mine):
        idx = keep[starts[bi] : starts[bi] + batch_size]
        if prepared:
            b = prepared[j]
        else:
            b = _capture(model, tokenizer, [resolved[i] for i in idx], [pairs[i] for i in idx],
                         layer, head, resume=resume, padding_side=padding_side, spec=spec)  # fmt: skip
            b.rows = idx
            bar.update(1)
        ranks_b = None
        if b.has_answer.any() and b.cap.answer_ranks is not None:
            ranks_b = b.cap.answer_ranks[b.has_answer, 2]
        state = _swap_batch(model, b, layer, head, basis_of, downstream, resume=resume,
                            chunk=chunk, bar=bar)  # fmt: skip
        fam_b, pat_b = extras(b, offline, patches)
        results.append((bi, {"per": state, "fam": fam_b, "pat": pat_b, "ranks": ranks_b}))
        if late is not None:
            kept.append(b)
    bar.close()

    per, fam, pat, ranks = _merged(_gathered(results, dist), basis_of)
    out = _assemble(per, fam, pat, bases, n_random, n_down, len(keep), ranks)
    if late is not None:
        more = late(out) or {}  # the same on every rank: it sees the gathered result
        lb = dict(more.get("bases") or {})
        _check_bases(lb, D)
        clash = set(lb) & set(bases)
        if clash:
            raise ValueError(f"late conditions {sorted(clash)} already exist")
        basis2, down2 = plan(lb, extra=True)
        down2 = [c for c in down2 if c[1] is None]  # random draws: attention side only
        bar2 = tqdm(total=0, disable=True)
        results = []
        for bi, b in zip(mine, kept, strict=True):
            state = (
                _swap_batch(
                    model, b, layer, head, basis2, down2, resume=resume, chunk=chunk, bar=bar2
                )  # fmt: skip
                if basis2
                else {}
            )
            fam_b, pat_b = extras(b, more.get("offline"), more.get("patches"))
            results.append((bi, {"per": state, "fam": fam_b, "pat": pat_b, "ranks": None}))
        kept.clear()
        per2, fam, pat, _ = _merged(_gathered(results, dist), basis2)
        out2 = _assemble(per2, fam, pat, lb, n_random, n_down, len(keep), [])
        for key in ("ranks", "conditions", "random", "per_prompt", "offline", "patches"):
            out[key].update(out2[key])
    return out


def _gathered(results: list[tuple[int, dict[str, Any]]], dist: Any) -> list[dict[str, Any]]:
    """Every rank's per-batch results, in batch order (one process: its own)."""
    if dist is not None and dist.enabled:
        from .distributed import gather_objects

        # thousands of small tensors: sent as numpy arrays (pickling a torch tensor costs
        # ~0.5 ms each, which made the gather cost as much as the swaps themselves)
        parts = gather_objects(_as(results, lambda t: t.numpy()), dist)
        results = [r for part in parts for r in _as(part, torch.from_numpy)]
    return [r for _, r in sorted(results, key=lambda x: x[0])]


def _as(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with every tensor (or numpy array) ``x`` replaced by ``fn(x)``."""
    import numpy as np

    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _as(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as(v, fn) for v in obj)
    return obj


def _merged(results: Sequence[dict[str, Any]], basis_of: Mapping[Cond, Any]) -> tuple:
    """Per-batch results (in batch order) as the lists :func:`_assemble` concatenates."""
    per: dict[Cond, dict[str, list[torch.Tensor]]] = {c: {} for c in basis_of}
    fam: dict[str, dict[str, list[torch.Tensor]]] = {}
    pat: dict[str, dict[str, list[torch.Tensor]]] = {}
    ranks: list[torch.Tensor] = []
    for r in results:
        for c, m in r["per"].items():
            for key, v in m.items():
                per[c].setdefault(key, []).append(v)
        for into, part in ((fam, r["fam"]), (pat, r["pat"])):
            for name, m in part.items():
                for key, v in m.items():
                    into.setdefault(name, {}).setdefault(key, []).append(v)
        if r["ranks"] is not None:
            ranks.append(r["ranks"])
    return per, fam, pat, ranks


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
