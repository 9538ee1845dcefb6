"""Parity check: softmax recomputed from captured q/k == the model's own eager attention.

For a batch of prompts of different lengths, padded left and right, every layer and head:
q/k of every real token are captured through the public :func:`capture_qk` path (model's
default implementation, usually sdpa), the attention is recomputed per example in
unpadded coordinates from the captured ``scaling``/``softcap``/``sliding_window`` and a
causal mask, and compared with the weights the model returns under ``eager`` with
``output_attentions=True`` (real query rows; the mass an eager row puts on pad columns is
part of the difference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.intervention import attention_weights
from .capture import QKSites, capture_qk, padded_forward, tokenize_batch
from .loading import LoadedModel, model_info

__all__ = ["DEFAULT_PROMPTS", "TOLERANCE", "verify_parity", "causal_mask"]

TOLERANCE = 1e-5

DEFAULT_PROMPTS = (
    "The apple is in Box A, the pear is in Box B. Which box is the pear in? Box",
    "List: dog, car, banana, France, cat. What are the animals in the list?",
    "Hi!",
    "A short one about keys and queries.",
)


def causal_mask(n: int, sliding_window: int | None = None, device=None) -> torch.Tensor:
    """Bool ``[n, n]``: query i may attend key j iff ``j <= i`` (and ``j > i - window``)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    allowed = j <= i
    if sliding_window:
        allowed &= j > i - sliding_window
    return allowed


def _eager_attentions(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    current = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = padded_forward(model, ids, mask, output_attentions=True)
    finally:
        model.set_attn_implementation(current)
    if not out.attentions or out.attentions[0] is None:
        raise ValueError(f"{type(model).__name__} returned no attention weights under eager")
    return out.attentions  # n_layers x [B, H, S, S]


def verify_parity(
    loaded_or_model: LoadedModel | nn.Module,
    tokenizer: Any = None,
    prompts: Sequence[str] | None = None,
    *,
    padding_sides: Sequence[str] = ("left", "right"),
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Max |recomputed − eager| over all layers, heads and real query rows.

    Returns a JSON-ready dict: ``model``, ``architecture``, ``n_layers``, ``n_heads``,
    ``n_kv_heads``, ``n_prompts``, ``max_abs_diff``, ``max_abs_diff_by_side``,
    ``max_abs_diff_by_layer``, ``tolerance`` and ``passed`` (``max_abs_diff <= tolerance``).
    """
    if isinstance(loaded_or_model, LoadedModel):
        model, tokenizer, name = (
            loaded_or_model.model,
            loaded_or_model.tokenizer,
            loaded_or_model.name,
        )
    else:
        model, name = loaded_or_model, type(loaded_or_model).__name__
    if tokenizer is None:
        raise ValueError("verify_parity needs a tokenizer")
    prompts = list(prompts or DEFAULT_PROMPTS)
    if len(prompts) < 2:
        raise ValueError("verify_parity needs at least two prompts (batch > 1)")
    info = model_info(model)
    layers = list(range(info.n_layers))
    by_side: dict[str, float] = {}
    by_layer = [0.0] * info.n_layers
    for side in padding_sides:
        ids, mask = tokenize_batch(tokenizer, prompts, side)
        device = next(model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        lengths = mask.sum(1).tolist()
        every = [list(range(n)) for n in lengths]
        caps = capture_qk(model, ids, mask, QKSites(every, every), layers)
        eager = _eager_attentions(model, ids, mask)
        worst = 0.0
        for layer in layers:
            cap = caps[layer]
            start = 0
            for b, n in enumerate(lengths):
                q = cap.q[start : start + n].transpose(0, 1).double()  # [H, n, D]
                k = cap.k[start : start + n].transpose(0, 1).double()
                start += n
                w = attention_weights(
                    q, k, causal_mask(n, cap.sliding_window, q.device), cap.scaling, cap.softcap
                )  # [H, n, n]
                real = mask[b].nonzero().flatten()
                ref = eager[layer][b][:, real].double()  # [H, n, S] (real query rows)
                full = torch.zeros_like(ref)
                full[:, :, real] = w  # pad columns must get zero weight
                diff = float((full - ref).abs().max())
                by_layer[layer] = max(by_layer[layer], diff)
                worst = max(worst, diff)
        by_side[side] = worst
    overall = max(by_side.values())
    return {
        "model": name,
        "architecture": info.architecture,
        "n_layers": info.n_layers,
        "n_heads": info.n_heads,
        "n_kv_heads": info.n_kv_heads,
        "n_prompts": len(prompts),
        "max_abs_diff": overall,
        "max_abs_diff_by_side": by_side,
        "max_abs_diff_by_layer": by_layer,
        "tolerance": tolerance,
        "passed": bool(overall <= tolerance),
    }
