"""TransformerLens (``TransformerBridge``) hooks for an exported subspace.

>>> from transformer_lens.model_bridge import TransformerBridge            # doctest: +SKIP
>>> bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tok)
>>> logits = bridge.run_with_hooks(ids, fwd_hooks=swap_hooks(sub, pos_a=3, pos_b=7))

The hooks edit ``blocks.{layer}.attn.hook_rot_k`` / ``hook_rot_q`` (post-RoPE,
``[batch, pos, head, d_head]``). Under GQA a key edit acts on the subspace head's kv head,
i.e. on every query head sharing it (qkcov's own edit changes only the one head); the
subspace head's attention is the same either way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._edits import checked, kv_head, project_out, swap_rows

__all__ = ["swap_hooks", "ablate_hooks", "hook_name"]

Hook = tuple[str, Callable]


def hook_name(subspace, side: str = "key") -> str:
    return f"blocks.{subspace.layer}.attn.hook_rot_{'k' if side == 'key' else 'q'}"


def swap_hooks(subspace, pos_a, pos_b) -> list[Hook]:
    """``fwd_hooks`` swapping the keys at ``pos_a``/``pos_b`` inside the key subspace."""
    checked(subspace)
    kv = kv_head(subspace)

    def fn(k: torch.Tensor, hook) -> torch.Tensor:  # [B, S, H_kv, D]
        k = k.clone()
        k[:, :, kv] = swap_rows(k[:, :, kv], subspace.key_basis, pos_a, pos_b)
        return k

    return [(hook_name(subspace), fn)]


def ablate_hooks(subspace, side: str = "key") -> list[Hook]:
    """``fwd_hooks`` projecting the key (or query) subspace out at every position."""
    checked(subspace)
    idx = kv_head(subspace) if side == "key" else subspace.head
    basis = subspace.key_basis if side == "key" else subspace.query_basis

    def fn(x: torch.Tensor, hook) -> torch.Tensor:
        x = x.clone()
        x[:, :, idx] = project_out(x[:, :, idx], basis)
        return x

    return [(hook_name(subspace, side), fn)]
