"""Head scan: which heads attend from the query to the positive keys (METHOD §4).

:func:`attention_rows` computes, inside the attention hook of every layer, each record's
query-row attention for every head (``softmax(softcap(scaling·q·kᵀ) + mask)`` with the
model's own mask, i.e. exactly the model's attention) and keeps only that row. :func:`scan_heads`
ranks heads by mean attention on positive vs negative keys with bootstrap intervals.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.intervention import attention_weights
from ..models.capture import (
    CapturedQK,
    LayerCall,
    QKSites,
    _StopForward,
    attention_hooks,
    capture_qk,
    padded_forward,
    tokenize_batch,
)
from ..models.heads import format_head, parse_heads
from ..models.loading import input_device, model_info
from .distributed import Dist, gather_objects, shard_batches

__all__ = [
    "attention_rows",
    "ScanCapture",
    "scan_capture",
    "one_pass_bytes",
    "scan_heads",
    "select_heads",
    "check_heads_spec",
    "scan_matrix",
]


def query_row_attention(call: LayerCall, rows_b: torch.Tensor, q_pad: torch.Tensor) -> torch.Tensor:
    """Attention of batch rows ``rows_b`` from their (padded) query positions ``q_pad`` over
    the whole padded sequence, every head: ``[len(rows_b), H, S]`` float32, computed as the
    model does (``softmax(softcap(scaling·q·kᵀ) + mask)`` with the model's own mask)."""
    q = call.query[rows_b, :, q_pad][:, :, None]  # [B', H, 1, D]
    k = call.key[rows_b].repeat_interleave(call.group_size, dim=1)  # [B', H, S, D]
    m = call.mask()
    m = m[rows_b if m.shape[0] > 1 else torch.zeros_like(rows_b), :, q_pad][
        :, :, None
    ]  # [B', 1|H, 1, S]
    a = attention_weights(q.float(), k.float(), m, call.scaling, call.softcap)  # [B', H, 1, S]
    return a[:, :, 0]


def attention_rows(
    model: torch.nn.Module,
    tokenizer: Any,
    resolved: Sequence[Any],
    *,
    batch_size: int = 8,
    padding_side: str = "left",
    progress: bool = True,
    dist: Dist | None = None,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """Query-row attention of every head: ``[n_records, L, H, S_max]`` (float32).

    ``layers``: compute only these layers' rows (the others stay zero) and end each forward
    after the deepest of them (explicit ``--heads`` need no all-head scan).

    Row ``[i, l, h]`` is record i's attention from its query token over its own tokens in
    unpadded coordinates (zeros past its length). One forward pass per batch. ``dist``: each
    rank runs its whole batches and the rows are gathered, so every rank returns the full
    one-process tensor.
    """
    if not resolved:
        raise ValueError("attention_rows: no records")
    info = model_info(model)
    device = input_device(model)
    s_max = max(len(r.input_ids) for r in resolved)
    out = torch.zeros(len(resolved), info.n_layers, info.n_heads, s_max)
    batches = shard_batches(len(resolved), batch_size, dist)
    for rng in tqdm(batches, desc="head scan", unit="batch", disable=not progress):
        start = rng.start
        batch = resolved[rng.start : rng.stop]
        ids, mask = tokenize_batch(tokenizer, [r.text for r in batch], padding_side)
        ids, mask = ids.to(device), mask.to(device)
        B, S = ids.shape
        real = mask.bool()
        lengths = real.sum(1)
        # padded index of each record's query and of its k-th real token
        offset = (S - lengths) if padding_side == "left" else torch.zeros_like(lengths)
        q_pad = offset + torch.tensor([r.query for r in batch], device=device)
        rows_b = torch.arange(B, device=device)
        store: dict[int, torch.Tensor] = {}  # layer -> [B, H, S] query-row attention

        def hook(call: LayerCall, q_pad=q_pad, rows_b=rows_b, store=store) -> None:
            store[call.layer] = query_row_attention(call, rows_b, q_pad)

        want = sorted(set(range(info.n_layers) if layers is None else layers))
        last = want[-1]

        def stop_after(call: LayerCall, last=last) -> None:
            hook(call)
            if layers is not None and call.layer == last:
                raise _StopForward  # nothing after the deepest requested layer is used

        hooks = dict.fromkeys(want, stop_after)
        with (
            torch.no_grad(),
            attention_hooks(model, hooks) as session,
            contextlib.suppress(_StopForward),
        ):
            padded_forward(model, ids, mask, logits_to_keep=1)
        session.check_called(model, want)
        stacked = torch.stack([store[l] for l in want], dim=1).cpu()  # [B, L', H, S]
        for b in range(B):
            n = int(lengths[b])
            o = int(offset[b])
            out[start + b, want, :, :n] = stacked[b, :, :, o : o + n]
    if dist is not None and dist.enabled:
        mine = torch.tensor([i for rng in batches for i in rng], dtype=torch.long)
        for idx, rows in gather_objects((mine, out[mine]), dist):
            out[idx] = rows
    return out


@dataclass
class ScanCapture:
    """One forward over the build records serving ``--heads auto`` whole (no scan forward).

    ``rows``: the scan records' query-row attention, ``[n_scan, L, H, S_max]`` as
    :func:`attention_rows` returns it for them (gathered over ranks); ``captures[i][b]``: the
    ``b``-th of this rank's batches (:func:`shard_batches`) of the ``i``-th record list,
    ``{layer: CapturedQK}`` with every head's q at each record's query and k at its key sites
    (where the forward ran). :func:`qkcov.engine.contrast.run_contrast` folds the chosen
    heads' rows of ``captures[i]`` (``captured=``) exactly as a forward of those heads would.
    """

    rows: torch.Tensor
    captures: list[list[dict[int, CapturedQK]]]


def one_pass_bytes(model: torch.nn.Module, resolved: Sequence[Any]) -> int:
    """Bytes :func:`scan_capture` keeps for ``resolved``: records × (1 query + their keys)
    × layers × heads × head_dim × the model's element size (the rows are apart)."""
    info = model_info(model)
    size = next(model.parameters()).element_size()
    sites = sum(1 + len(r.keys) for r in resolved)
    return sites * info.n_layers * info.n_heads * info.head_dim * size


def scan_capture(
    model: torch.nn.Module,
    tokenizer: Any,
    resolved: Sequence[Any],
    lists: Sequence[Sequence[int]],
    scan_idx: Sequence[int],
    *,
    batch_size: int = 8,
    progress: bool = True,
    dist: Dist | None = None,
) -> ScanCapture:
    """The head scan's rows and every head's q/k in ONE forward per batch (see
    :class:`ScanCapture`).

    ``lists``: positions in ``resolved``, one list per later ΔC pass (a feature's build
    records), each batched exactly as :func:`~qkcov.engine.contrast.run_contrast` batches it
    (``batch_size``, left padding, this rank's :func:`shard_batches`), so the captured rows
    are the ones its own forward would capture. ``scan_idx``: the scan records (each in one
    of ``lists``); their query rows are computed inside the same forward, in the attention
    hook of every layer.
    """
    if not scan_idx:
        raise ValueError("scan_capture: no scan records")
    info = model_info(model)
    device = input_device(model)
    at = {int(i): j for j, i in enumerate(scan_idx)}
    if len(at) != len(scan_idx) or not set(at) <= {int(i) for ids in lists for i in ids}:
        raise ValueError("scan_capture: scan records must be distinct and in the record lists")
    s_max = max(len(resolved[i].input_ids) for i in scan_idx)
    rows = torch.zeros(len(scan_idx), info.n_layers, info.n_heads, s_max)
    layers = list(range(info.n_layers))
    shards = [shard_batches(len(ids), batch_size, dist) for ids in lists]
    mine: list[int] = []
    captures: list[list[dict[int, CapturedQK]]] = []
    bar = tqdm(total=sum(map(len, shards)), desc="head scan + capture", unit="batch",
               disable=not progress)  # fmt: skip
    for ids, batches in zip(lists, shards, strict=True):
        recs = [resolved[i] for i in ids]
        sites = QKSites([[r.query] for r in recs], [r.key_positions for r in recs])
        per: list[dict[int, CapturedQK]] = []
        for rng in batches:
            batch = recs[rng.start : rng.stop]
            tok, mask = tokenize_batch(tokenizer, [r.text for r in batch], "left")
            tok, mask = tok.to(device), mask.to(device)
            lengths = mask.sum(1)
            offset = tok.shape[1] - lengths
            sel = [b for b in range(len(batch)) if int(ids[rng.start + b]) in at]
            store: dict[int, torch.Tensor] = {}
            on_call = None
            if sel:
                rows_b = torch.tensor(sel, device=device)
                q_pad = offset[rows_b] + torch.tensor([batch[b].query for b in sel], device=device)

                def on_call(call: LayerCall, rows_b=rows_b, q_pad=q_pad, store=store) -> None:
                    store[call.layer] = query_row_attention(call, rows_b, q_pad)

            per.append(capture_qk(model, tok, mask, sites.subset(rng.start, rng.stop), layers,
                                  None, on_call=on_call, example_offset=rng.start))  # fmt: skip
            if sel:
                stacked = torch.stack([store[l] for l in layers], dim=1).cpu()  # [B', L, H, S]
                for j, b in enumerate(sel):
                    n, o, pos = int(lengths[b]), int(offset[b]), at[int(ids[rng.start + b])]
                    rows[pos, :, :, :n] = stacked[j, :, :, o : o + n]
                    mine.append(pos)
            bar.update()
        captures.append(per)
    bar.close()
    if dist is not None and dist.enabled:
        idx = torch.tensor(mine, dtype=torch.long)
        for i, part in gather_objects((idx, rows[idx]), dist):
            rows[i] = part
    return ScanCapture(rows, captures)


def _per_record(
    rows: torch.Tensor, resolved: Sequence[Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean attention on positives / negatives per record ``[n, L, H]`` and top-match ``[n, L, H]``,
    over records that have both sides."""
    pos, neg, top = [], [], []
    for i, r in enumerate(resolved):
        if not r.positives or not r.negatives:
            continue
        row = rows[i]  # [L, H, S]
        pos.append(row[..., r.positives].mean(-1))
        neg.append(row[..., r.negatives].mean(-1))
        keys = torch.tensor(r.key_positions)
        is_pos = torch.tensor([k.positive for k in r.keys])
        top.append(is_pos[row[..., keys].argmax(-1)].float())
    if not pos:
        raise ValueError("head scan needs records with both positive and negative keys")
    return torch.stack(pos).double(), torch.stack(neg).double(), torch.stack(top).double()


def scan_heads(
    rows: torch.Tensor,
    resolved: Sequence[Any],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> list[dict[str, Any]]:
    """Rank every head by how much more its query attends to positive than negative keys.

    Returns one dict per head, sorted by ``diff`` (descending): ``layer``, ``head``, ``name``,
    ``mean_pos``, ``mean_neg`` (mean attention per key), ``ratio``, ``diff``, ``diff_ci``
    (bootstrap over records), ``top_match`` (fraction of records whose most-attended key is
    positive).
    """
    pos, neg, top = _per_record(rows, resolved)
    n, L, H = pos.shape
    diff = pos - neg
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(n_boot, n, dtype=torch.float64)
    counts.scatter_add_(
        1,
        torch.randint(0, n, (n_boot, n), generator=gen),
        torch.ones(n_boot, n, dtype=torch.float64),
    )
    boot = (counts @ diff.reshape(n, -1) / n).reshape(n_boot, L, H)
    lo = torch.quantile(boot, (1 - ci) / 2, dim=0)
    hi = torch.quantile(boot, 1 - (1 - ci) / 2, dim=0)
    mp, mn, md, mt = pos.mean(0), neg.mean(0), diff.mean(0), top.mean(0)
    table = []
    for layer in range(L):
        for head in range(H):
            table.append(
                {
                    "layer": layer,
                    "head": head,
                    "name": format_head(layer, head),
                    "mean_pos": float(mp[layer, head]),
                    "mean_neg": float(mn[layer, head]),
                    "ratio": float(mp[layer, head] / max(float(mn[layer, head]), 1e-12)),
                    "diff": float(md[layer, head]),
                    "diff_ci": [float(lo[layer, head]), float(hi[layer, head])],
                    "top_match": float(mt[layer, head]),
                    "n_records": n,
                }
            )
    table.sort(key=lambda row: row["diff"], reverse=True)
    return table


def scan_matrix(scan: Sequence[dict[str, Any]], key: str = "diff") -> torch.Tensor:
    """A scan table back to a ``[L, H]`` matrix of ``key`` (for heatmaps)."""
    L = max(r["layer"] for r in scan) + 1
    H = max(r["head"] for r in scan) + 1
    m = torch.full((L, H), float("nan"))
    for r in scan:
        m[r["layer"], r["head"]] = r[key]
    return m


def check_heads_spec(spec: object) -> None:
    """Syntax check of a heads spec before any model is loaded (ranges are checked later):
    ``"auto"``, ``"auto:K"`` (K >= 1) or a list such as ``"L20H26,L16H19"``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"heads must be 'auto', 'auto:K' or a list like 'L20H26,L16H19', got {spec!r}"
        )
    s = spec.strip()
    if s.lower().startswith("auto"):
        m = re.fullmatch(r"(?i)auto(?::(\d+))?", s)
        if m is None or (m.group(1) is not None and int(m.group(1)) < 1):
            raise ValueError(
                f"heads spec {spec!r}: expected 'auto' or 'auto:K' with an integer K >= 1"
            )
        return
    try:
        parse_heads(s, sys.maxsize, sys.maxsize)
    except ValueError:
        raise ValueError(
            f"--heads {spec!r}: expected 'auto', 'auto:K' or heads like 'L20H26,L16H19'"
        ) from None


def check_auto_count(spec: str, n_layers: int, n_heads: int) -> None:
    """``auto:K`` asking for more heads than the model has: one line (not all of them)."""
    text = str(spec).strip().lower()
    if text.startswith("auto:") and text[5:].strip().isdigit():
        k, total = int(text[5:]), n_layers * n_heads
        if k > total:
            raise ValueError(
                f"--heads {spec}: the model has {total} heads ({n_layers} layers × {n_heads}); "
                f"use auto:K with K <= {total}"
            )


def select_heads(
    spec: str | Sequence[str],
    scan: Sequence[dict[str, Any]] | None,
    n_layers: int,
    n_heads: int,
    k: int = 3,
) -> list[tuple[int, int]]:
    """Heads to study: ``"auto"`` (or ``"auto:K"``) = the top-K heads of ``scan``; otherwise a
    head list such as ``"L20H26,L16H19"`` (validated against the model's shape)."""
    check_heads_spec(spec)
    if spec.strip().lower().startswith("auto"):
        check_auto_count(spec, n_layers, n_heads)
        if ":" in spec:
            k = int(spec.split(":")[1])
        if not scan:
            raise ValueError("heads 'auto' needs a head scan")
        return [(r["layer"], r["head"]) for r in scan[:k]]
    return parse_heads(spec, n_layers, n_heads)
