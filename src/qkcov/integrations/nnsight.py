"""nnsight recipes for an exported subspace: call these inside a ``trace``.

>>> from nnsight import NNsight                                            # doctest: +SKIP
>>> nm = NNsight(model)               # an HF model (eager attention to read the pattern)
>>> with nm.trace(ids):
...     swap(nm, sub, pos_a=3, pos_b=7)
...     pattern = attention(nm, sub).output[1].save()     # [B, H, S, S]

They edit the output of the attention module's ``apply_rotary_pos_emb`` call (post-RoPE
q/k, ``[batch, head, pos, d_head]``) through nnsight's ``.source``. Under GQA a key edit
acts on the subspace head's kv head (every query head sharing it).
"""

from __future__ import annotations

from typing import Any

from ._edits import checked, kv_head, project_out, swap_rows

__all__ = ["attention", "swap", "ablate"]


def attention(nn_model: Any, subspace) -> Any:
    """The envoy of the subspace layer's attention module (found by its ``layer_idx``)."""
    from ..models.capture import attention_modules

    module = attention_modules(nn_model._module)[subspace.layer]
    path = next(n for n, m in nn_model._module.named_modules() if m is module)
    env = nn_model
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def _site(nn_model: Any, subspace) -> Any:
    return attention(nn_model, subspace).source.apply_rotary_pos_emb_0


def swap(nn_model: Any, subspace, pos_a, pos_b) -> None:
    """Swap the keys at ``pos_a``/``pos_b`` inside the key subspace (in a trace)."""
    checked(subspace, nn_model._module)
    site = _site(nn_model, subspace)
    q, k = site.output
    k = k.clone()
    kv = kv_head(subspace)
    k[:, kv] = swap_rows(k[:, kv], subspace.key_basis, pos_a, pos_b)
    site.output = (q, k)


def ablate(nn_model: Any, subspace, side: str = "key") -> None:
    """Project the key (or query) subspace out at every position (in a trace)."""
    checked(subspace, nn_model._module)
    site = _site(nn_model, subspace)
    q, k = site.output
    if side == "key":
        k = k.clone()
        kv = kv_head(subspace)
        k[:, kv] = project_out(k[:, kv], subspace.key_basis)
    else:
        q = q.clone()
        q[:, subspace.head] = project_out(q[:, subspace.head], subspace.query_basis)
    site.output = (q, k)
