"""Edit one head's queries/keys inside the real forward pass (batched).

The hook runs the model's own attention for the whole layer unchanged, then recomputes
only the edited head ``h`` from its (edited) query/key and its kv head's values and writes
that head's output back. Other heads — including the other query heads sharing ``h``'s kv
head under GQA — see the original keys and are bit-for-bit unchanged. Edits act on
post-RoPE q/k (what the dot product sees), in padded coordinates internally; all positions
in this API are unpadded (``-1`` = last real token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.intervention import attention_weights, swap_in_subspace
from .capture import LayerCall, attention_hooks, padded_forward, resolve_positions
from .heads import check_heads, check_layers
from .loading import model_info

__all__ = [
    "KeySwap",
    "HeadEditResult",
    "edit_head_forward",
    "swap_keys_forward",
    "last_token_logits",
]

# edit(q_h [B, S, D], k_h [B, S, D]) -> (q_h, k_h); padded coordinates, may edit in place.
EditFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class KeySwap:
    """Swap keys at unpadded positions ``pos_a``/``pos_b`` inside ``span(basis [D, r])``."""

    pos_a: int
    pos_b: int
    basis: torch.Tensor


@dataclass
class HeadEditResult:
    """Outcome of one edited forward pass over a batch of B prompts.

    ``attention [B, S]``: the edited head's attention at each example's query position,
    indexed by *unpadded* key position (zeros past an example's length).
    ``logits [B, V]``: next-token logits at each example's last real token.
    ``layer_output [B, S, H, D_v]``: the edited layer's attention output (padded
    coordinates), only when requested.
    """

    attention: torch.Tensor
    logits: torch.Tensor
    layer_output: torch.Tensor | None = None


def _unpad(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` padded key axis -> unpadded (real tokens first, zeros after)."""
    out = torch.zeros_like(rows)
    for b in range(rows.shape[0]):
        real = mask[b].nonzero().flatten()
        out[b, : real.numel()] = rows[b, real]
    return out


def last_token_logits(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, S, V]`` -> ``[B, V]`` at each example's last real token."""
    last = _last_index(attention_mask)
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    S = mask.shape[1]
    idx = torch.arange(S, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, -1).amax(dim=1)


def _forward_logits(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    last = _last_index(attention_mask)
    keep, inverse = torch.unique(last, return_inverse=True)  # usually one column (left padding)
    out = padded_forward(model, input_ids, attention_mask, logits_to_keep=keep)
    return out.logits[torch.arange(input_ids.shape[0], device=input_ids.device), inverse]


def edit_head_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    head: int,
    edit: EditFn | None,
    *,
    query_positions: int | Sequence[int] = -1,
    return_layer_output: bool = False,
) -> HeadEditResult:
    """One forward with ``edit`` applied to head ``head``'s q/k at ``layer``.

    ``edit(q_h [B, S, D], k_h [B, S, D])`` receives clones in padded coordinates (see
    :func:`resolve_positions`) and returns the edited pair; ``None`` = no edit (baseline).
    ``query_positions``: one unpadded position per example (or one for all).
    """
    info = model_info(model)
    layer = check_layers(layer, info.n_layers)[0]
    head = check_heads(head, info.n_heads)[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    B = input_ids.shape[0]
    qpos = [query_positions] * B if isinstance(query_positions, int) else list(query_positions)
    ex, q_padded, _ = resolve_positions([[p] for p in qpos], attention_mask, "query position")
    store: dict[str, torch.Tensor] = {}

    def hook(call: LayerCall):
        out, w = call.run()  # every head as the model computes it
        kv = head // call.group_size
        q_h, k_h = call.query[:, head].clone(), call.key[:, kv].clone()  # [B, S, D]
        if edit is not None:
            q_h, k_h = edit(q_h, k_h)
        a = attention_weights(q_h[:, None], k_h[:, None], call.mask(), call.scaling, call.softcap)
        a = torch.nan_to_num(a[:, 0], nan=0.0).to(call.value.dtype)  # [B, S_q, S_k]; pad rows -> 0
        o_h = a @ call.value[:, kv]  # [B, S_q, D_v]
        out = out.clone()
        out[:, :, head] = o_h.to(out.dtype)
        if w is not None:
            w = w.clone()
            w[:, head] = a.to(w.dtype)
        store["attention"] = a[ex, q_padded]  # [B, S_k]
        if return_layer_output:
            store["layer_output"] = out
        return out, w

    with torch.no_grad(), attention_hooks(model, {layer: hook}) as session:
        logits = _forward_logits(model, input_ids, attention_mask)
    session.check_called(model, [layer])
    return HeadEditResult(
        attention=_unpad(store["attention"], attention_mask),
        logits=logits,
        layer_output=store.get("layer_output"),
    )


def swap_keys_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    head: int,
    swaps: Sequence[KeySwap | None],
    *,
    query_positions: int | Sequence[int] = -1,
    return_layer_output: bool = False,
) -> HeadEditResult:
    """Batched in-forward key swap: example ``b`` swaps ``swaps[b]`` (``None`` = no edit).

    For each swap, ``k_a += V(Vᵀk_b − Vᵀk_a)`` and ``k_b += V(Vᵀk_a − Vᵀk_b)`` on head
    ``head``'s post-RoPE keys (see :func:`qkcov.core.intervention.swap_in_subspace`).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    B = input_ids.shape[0]
    if len(swaps) != B:
        raise ValueError(f"got {len(swaps)} swap specs for a batch of {B} prompts")
    rows = [b for b, s in enumerate(swaps) if s is not None]
    d = model_info(model).head_dim
    for b in rows:
        V = swaps[b].basis
        if V.ndim != 2 or V.shape[0] != d:
            raise ValueError(
                f"swap basis of example {b} must be [head_dim={d}, r], got {list(V.shape)}"
            )
    mask = attention_mask.to(next(model.parameters()).device)
    sub = mask[rows] if rows else mask[:0]
    _, pa, _ = (
        resolve_positions([[swaps[b].pos_a] for b in rows], sub, "swap position")
        if rows
        else (0, [], 0)
    )
    _, pb, _ = (
        resolve_positions([[swaps[b].pos_b] for b in rows], sub, "swap position")
        if rows
        else (0, [], 0)
    )

    def edit(q_h: torch.Tensor, k_h: torch.Tensor):
        for i, b in enumerate(rows):
            a, c = int(pa[i]), int(pb[i])
            k_h[b, a], k_h[b, c] = swap_in_subspace(k_h[b, a], k_h[b, c], swaps[b].basis.to(k_h))
        return q_h, k_h

    return edit_head_forward(
        model, input_ids, attention_mask, layer, head, edit if rows else None,
        query_positions=query_positions, return_layer_output=return_layer_output,
    )  # fmt: skip
