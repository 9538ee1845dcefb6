"""Edit one head's queries/keys inside the real forward pass (batched).

The hook runs the model's own attention for the whole layer unchanged, then recomputes
only the edited head ``h`` from its (edited) query/key and its kv head's values and writes
that head's output back. Other heads — including the other query heads sharing ``h``'s kv
head under GQA — see the original keys and are bit-for-bit unchanged. Edits act on
post-RoPE q/k (what the dot product sees), in padded coordinates internally; all positions
in this API are unpadded (``-1`` = last real token).

Resuming: :func:`capture_layer_input` runs one unedited forward and keeps the hidden state
entering layer ``L`` (plus the studied head's query row, keys and mask row there); passing
it as ``hidden_in`` to :func:`edit_head_forward` / :func:`swap_keys_forward` skips layers
``0..L-1`` (each is replaced for that call by a stub returning the cached state), so the
model's own forward still builds the masks, position embeddings, final norm, LM head and
logit soft-cap for layers ``L..end``. Works for any model whose decoder layers are the
parents of their attention modules and are called in order with the hidden state first
(Llama, Mistral, Qwen2/3, Gemma-2/3, GPT-2); :func:`can_resume` says whether it applies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.intervention import attention_weights, swap_in_subspace
from .capture import LayerCall, attention_hooks, padded_forward, resolve_positions
from .heads import check_heads, check_layers
from .loading import input_device, model_info

__all__ = [
    "KeySwap",
    "HeadEditResult",
    "edited_head_call",
    "edit_head_forward",
    "swap_keys_forward",
    "last_token_logits",
    "LayerInput",
    "capture_layer_input",
    "can_resume",
    "answer_logprobs",
    "capture_layer_inputs",
    "token_ranks",
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


def answer_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits [B, V])`` (float64) at ``tokens [B, T]`` -> ``[B, T]``."""
    if logits.ndim != 2 or tokens.ndim != 2 or tokens.shape[0] != logits.shape[0]:
        raise ValueError(
            f"logits must be [B, V] and tokens [B, T], got {list(logits.shape)} and "
            f"{list(tokens.shape)}"
        )
    tokens = tokens.to(logits.device).long()
    out = []
    for r in range(0, logits.shape[0], 8):  # float64 copies of 8 rows at a time
        x = logits[r : r + 8].double()
        out.append(x.gather(1, tokens[r : r + 8]) - torch.logsumexp(x, dim=-1, keepdim=True))
    return torch.cat(out).cpu()


def _decoder_layers(model: nn.Module, upto: int) -> list[nn.Module] | None:
    """Decoder layers ``0..upto`` (the parents of the attention modules), or ``None``."""
    names = {}
    for name, m in model.named_modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and "Attention" in type(m).__name__ and "." in name:
            names.setdefault(idx, name.rsplit(".", 1)[0])
    if any(i not in names for i in range(upto + 1)):
        return None
    layers = [model.get_submodule(names[i]) for i in range(upto + 1)]
    return layers if len({id(m) for m in layers}) == len(layers) else None


def can_resume(model: nn.Module, layer: int) -> bool:
    """Whether ``hidden_in`` (skip the layers before ``layer``) is supported for ``model``."""
    return _decoder_layers(model, layer % model_info(model).n_layers) is not None


@contextlib.contextmanager
def _resume_at(model: nn.Module, layer: int, hidden: torch.Tensor) -> Iterator[list[bool]]:
    """Replace decoder layers ``0..layer-1`` by stubs handing ``hidden`` to layer ``layer``."""
    layers = _decoder_layers(model, layer)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__}: cannot locate its decoder layers, so it cannot resume "
            f"from layer {layer}; run the full forward (hidden_in=None)"
        )
    seen = [False]

    def stub(*args, **kwargs):
        seen[0] = True
        return hidden

    saved = [m.__dict__.get("forward") for m in layers[:layer]]
    try:
        for m in layers[:layer]:
            m.forward = stub
        yield seen
    finally:
        for m, f in zip(layers[:layer], saved, strict=True):
            del m.forward
            if f is not None:
                m.forward = f


def _forward_logits(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    last = _last_index(attention_mask)
    keep, inverse = torch.unique(last, return_inverse=True)  # usually one column (left padding)
    out = padded_forward(model, input_ids, attention_mask, logits_to_keep=keep)
    return out.logits[torch.arange(input_ids.shape[0], device=input_ids.device), inverse]


def _checked_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    head: int,
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """Range-checked ``(layer, head)`` and the inputs on the model's input device (the
    embedding's, also for models dispatched with ``device_map``)."""
    info = model_info(model)
    layer = check_layers(layer, info.n_layers)[0]
    head = check_heads(head, info.n_heads)[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device = input_device(model)
    return layer, head, input_ids.to(device), attention_mask.to(device)


def edited_head_call(
    call: LayerCall, head: int, edit: EditFn | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The layer's attention with head ``head`` recomputed from ``edit(q_h, k_h)`` (the other
    heads as the model computes them): ``(attn_output, attn_weights | None, a [B, S_q, S_k])``."""
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
    return out, w, a


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
    hidden_in: torch.Tensor | None = None,
) -> HeadEditResult:
    """One forward with ``edit`` applied to head ``head``'s q/k at ``layer``.

    ``edit(q_h [B, S, D], k_h [B, S, D])`` receives clones in padded coordinates (see
    :func:`resolve_positions`) and returns the edited pair; ``None`` = no edit (baseline).
    ``query_positions``: one unpadded position per example (or one for all).
    ``hidden_in [B, S, d_model]``: the hidden state entering ``layer`` from an unedited
    forward of the same ``input_ids``/``attention_mask`` (:attr:`LayerInput.hidden`); the
    layers before ``layer`` are then skipped.
    """
    layer, head, input_ids, attention_mask = _checked_inputs(
        model, input_ids, attention_mask, layer, head
    )
    device = input_ids.device
    B = input_ids.shape[0]
    qpos = [query_positions] * B if isinstance(query_positions, int) else list(query_positions)
    ex, q_padded, _ = resolve_positions([[p] for p in qpos], attention_mask, "query position")
    store: dict[str, torch.Tensor] = {}

    def hook(call: LayerCall):
        out, w, a = edited_head_call(call, head, edit)
        store["attention"] = a[ex, q_padded]  # [B, S_k]
        if return_layer_output:
            store["layer_output"] = out
        return out, w

    if hidden_in is not None and hidden_in.shape[:2] != input_ids.shape:
        raise ValueError(
            f"hidden_in must be [B, S, d_model] for input_ids {list(input_ids.shape)}, "
            f"got {list(hidden_in.shape)}"
        )
    resume = (
        _resume_at(model, layer, hidden_in.to(device))
        if hidden_in is not None and layer > 0
        else contextlib.nullcontext([True])
    )
    with torch.no_grad(), resume as seen, attention_hooks(model, {layer: hook}) as session:
        logits = _forward_logits(model, input_ids, attention_mask)
    session.check_called(model, [layer])
    if not seen[0]:
        raise ValueError(f"{type(model).__name__}: the layer stubs were not called on resume")
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
    hidden_in: torch.Tensor | None = None,
) -> HeadEditResult:
    """Batched in-forward key swap: example ``b`` swaps ``swaps[b]`` (``None`` = no edit).

    For each swap, ``k_a += V(Vᵀk_b − Vᵀk_a)`` and ``k_b += V(Vᵀk_a − Vᵀk_b)`` on head
    ``head``'s post-RoPE keys (see :func:`qkcov.core.intervention.swap_in_subspace`).
    ``hidden_in``: resume at ``layer`` (see :func:`edit_head_forward`).
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
    mask = attention_mask.to(input_device(model))
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
        hidden_in=hidden_in,
    )  # fmt: skip


@dataclass
class LayerInput:
    """One unedited forward of a batch of B prompts (padded width S), seen from head ``head``.

    ``hidden [B, S, d_model]``: hidden state entering ``layer`` (padded coordinates; feed it
    back as ``hidden_in``). ``query [B, D]``: the head's post-RoPE query at each example's
    query position. ``keys [B, S, D]``: the post-RoPE keys of its kv head and ``mask [B, S]``
    (float64 additive: 0 = may attend, -inf = not) the model's mask row at that query, both
    in *unpadded* key coordinates (padding slots masked). ``softmax(softcap(scaling·q·kᵀ) +
    mask)`` is the model's attention row. ``answer_logprobs [B, T]``: next-token log-probs
    (float64) of the requested answer tokens at each example's last real token;
    ``answer_ranks [B, T]``: their ranks among the next-token logits (0 = the model's top-1).
    """

    layer: int
    head: int
    hidden: torch.Tensor
    query: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor
    scaling: float
    softcap: float | None
    answer_logprobs: torch.Tensor
    answer_ranks: torch.Tensor | None = None


def capture_layer_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    heads: Sequence[tuple[int, int]],
    *,
    query_positions: int | Sequence[int] = -1,
    keep_hidden: bool = True,
) -> tuple[dict[tuple[int, int], LayerInput], torch.Tensor]:
    """ONE unedited forward seen from several heads (any layers): per head a
    :class:`LayerInput` without answer log-probs (``answer_logprobs`` empty; see
    :func:`answer_logprobs` / :func:`token_ranks` on the returned logits), and the next-token
    logits ``[B, V]`` at each example's last real token (on the model's device; the caller
    keeps only what it needs of them). Heads on the same layer share one ``hidden`` tensor.
    ``keep_hidden=False`` skips the layer-input copies (full-forward fallback).
    """
    if not heads:
        raise ValueError("capture_layer_inputs: no heads")
    info = model_info(model)
    heads = [(check_layers(l, info.n_layers)[0], check_heads(h, info.n_heads)[0]) for l, h in heads]
    _, _, input_ids, attention_mask = _checked_inputs(
        model, input_ids, attention_mask, heads[0][0], heads[0][1]
    )
    device = input_ids.device
    B, S = input_ids.shape
    qpos = [query_positions] * B if isinstance(query_positions, int) else list(query_positions)
    ex, q_padded, _ = resolve_positions([[p] for p in qpos], attention_mask, "query position")
    layers = sorted({l for l, _ in heads})
    store: dict[int, dict[str, Any]] = {l: {} for l in layers}

    def hook_for(layer: int) -> Callable[[LayerCall], None]:
        def hook(call: LayerCall) -> None:
            st = store[layer]
            m = call.mask()
            for l, head in heads:
                if l != layer:
                    continue
                kv = head // call.group_size
                row = m[
                    ex if m.shape[0] > 1 else torch.zeros_like(ex), 0 if m.shape[1] == 1 else head
                ]
                row = row[torch.arange(B, device=device), q_padded]  # [B, S]
                if row.dtype == torch.bool:
                    row = torch.zeros(row.shape, dtype=torch.float64, device=device).masked_fill(
                        ~row, float("-inf")
                    )
                st[head] = (call.query[ex, head, q_padded], call.key[:, kv], row.double())
            st["scaling"], st["softcap"] = call.scaling, call.softcap

        return hook

    handles = []
    if keep_hidden:
        decoder = _decoder_layers(model, layers[-1])
        if decoder is None:
            raise ValueError(
                f"{type(model).__name__}: cannot locate its decoder layers; use keep_hidden=False"
            )
        for layer in layers:

            def pre(_m, args, kwargs, layer=layer):
                store[layer]["hidden"] = args[0] if args else kwargs["hidden_states"]

            handles.append(decoder[layer].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad(), attention_hooks(model, {l: hook_for(l) for l in layers}) as session:
            logits = _forward_logits(model, input_ids, attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    session.check_called(model, layers)
    if keep_hidden and any("hidden" not in store[l] for l in layers):
        raise ValueError(f"{type(model).__name__}: a decoder layer in {layers} was not called")
    real = [attention_mask[b].nonzero().flatten() for b in range(B)]
    out: dict[tuple[int, int], LayerInput] = {}
    for layer, head in heads:
        query, padded_keys, padded_mask = store[layer][head]
        # padded -> unpadded key coordinates; padding slots stay masked
        keys = torch.zeros_like(padded_keys)
        mask = torch.full((B, S), float("-inf"), dtype=torch.float64, device=device)
        for b in range(B):
            keys[b, : real[b].numel()] = padded_keys[b, real[b]]
            mask[b, : real[b].numel()] = padded_mask[b, real[b]]
        out[(layer, head)] = LayerInput(
            layer=layer,
            head=head,
            hidden=store[layer]["hidden"] if keep_hidden else torch.empty(0),
            query=query,
            keys=keys,
            mask=mask,
            scaling=float(store[layer]["scaling"]),
            softcap=store[layer]["softcap"],
            answer_logprobs=torch.empty(B, 0, dtype=torch.float64),
        )
    return out, logits


def capture_layer_input(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    head: int,
    *,
    query_positions: int | Sequence[int] = -1,
    answer_tokens: torch.Tensor,
    keep_hidden: bool = True,
) -> LayerInput:
    """One unedited forward keeping what offline swaps and resumed forwards need (one head of
    :func:`capture_layer_inputs`).

    ``answer_tokens [B, T]``: token ids whose next-token log-probs are kept (the logits
    themselves are not). ``keep_hidden=False`` skips the layer-input copy (full-forward
    fallback).
    """
    B = input_ids.shape[0]
    if answer_tokens.ndim != 2 or answer_tokens.shape[0] != B:
        raise ValueError(f"answer_tokens must be [B={B}, T], got {list(answer_tokens.shape)}")
    caps, logits = capture_layer_inputs(
        model, input_ids, attention_mask, [(layer, head)], query_positions=query_positions,
        keep_hidden=keep_hidden,
    )  # fmt: skip
    cap = next(iter(caps.values()))
    cap.answer_logprobs = answer_logprobs(logits, answer_tokens)
    cap.answer_ranks = token_ranks(logits, answer_tokens)
    return cap


def token_ranks(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Rank of each of ``tokens [B, T]`` among ``logits [B, V]`` (0 = the argmax), on CPU."""
    at = logits.gather(1, tokens.to(logits.device).long())  # [B, T]
    return torch.stack([(logits > at[:, j : j + 1]).sum(1) for j in range(at.shape[1])], 1).cpu()
