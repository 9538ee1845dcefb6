"""Apply an exported :class:`qkcov.export.Subspace` to a Hugging Face model during your own
forward passes: swap, ablate (project out) or steer inside it, for its one head.

Each is a context manager; every forward inside the block edits the head's post-RoPE keys
(or queries) through the same code as qkcov's own swaps
(:func:`qkcov.models.intervene.edited_head_call`): the layer's attention runs as the model
computes it, and only the subspace's head is recomputed from its edited q/k. Other heads,
including the query heads sharing its kv head under GQA, are unchanged.

>>> with swap(model, sub, pos_a=3, pos_b=7) as edit:     # doctest: +SKIP
...     out = model(input_ids, attention_mask=mask, use_cache=False)
>>> edit.attention          # [B, S_q, S_k] the head's edited attention (last forward)

Positions index the sequence as passed to the model (with left padding, count the padding;
negative = from the end); one per example or one for all. The subspace is checked against
the model (layer count, heads, head dimension) before any forward. Meant for full forwards
(``use_cache=False``): with a KV cache, only the current call's keys are edited.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.intervention import swap_in_subspace
from .capture import LayerCall, attention_hooks
from .intervene import EditFn, edited_head_call

__all__ = ["HeadEdit", "edit_head", "swap", "ablate", "steer"]

Positions = int | Sequence[int] | None


@dataclass
class HeadEdit:
    """Handle of an edit block: ``attention [B, S_q, S_k]`` of the edited head in the last
    forward, ``calls`` = forwards that went through the edit."""

    layer: int
    head: int
    attention: torch.Tensor | None = None
    calls: int = 0
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def edit_head(model: nn.Module, layer: int, head: int, edit: EditFn) -> Iterator[HeadEdit]:
    """Apply ``edit(q_h [B, S, D], k_h [B, S, D]) -> (q_h, k_h)`` to head ``head`` of
    ``layer`` in every forward inside the block (post-RoPE, sequence coordinates)."""
    handle = HeadEdit(layer, head)

    def hook(call: LayerCall):
        out, w, a = edited_head_call(call, head, edit)
        handle.attention, handle.calls = a.detach(), handle.calls + 1
        return out, w

    with attention_hooks(model, {layer: hook}):  # gradients flow unless the caller disables them
        yield handle


def _checked(model: nn.Module, subspace) -> None:
    subspace.check_model(model)
    if subspace.rank == 0:
        raise ValueError(
            f"subspace {subspace.name} {subspace.feature!r} has rank 0: nothing to edit"
        )


def _per_example(pos: Positions, B: int, S: int, what: str) -> list[int]:
    ps = [pos] * B if isinstance(pos, int) else list(pos)
    if len(ps) != B:
        raise ValueError(f"{what}: got {len(ps)} positions for a batch of {B}")
    out = []
    for p in ps:
        if not -S <= int(p) < S:
            raise ValueError(f"{what} {p} is outside the sequence of length {S}")
        out.append(int(p) % S)
    return out


def _rows(pos: Positions, S: int, what: str) -> torch.Tensor | list[int]:
    if pos is None:
        return slice(None)  # type: ignore[return-value]
    ps = [pos] if isinstance(pos, int) else list(pos)
    for p in ps:
        if not -S <= int(p) < S:
            raise ValueError(f"{what} {p} is outside the sequence of length {S}")
    return [int(p) % S for p in ps]


@contextlib.contextmanager
def swap(model: nn.Module, subspace, pos_a: Positions, pos_b: Positions) -> Iterator[HeadEdit]:
    """Swap the keys at ``pos_a`` and ``pos_b`` inside the key subspace
    (``k_a += V(Vᵀk_b − Vᵀk_a)``, and back), qkcov's causal test."""
    _checked(model, subspace)

    def edit(q_h: torch.Tensor, k_h: torch.Tensor):
        B, S = k_h.shape[:2]
        V = subspace.key_basis.to(k_h)
        pa = _per_example(pos_a, B, S, "pos_a")
        pb = _per_example(pos_b, B, S, "pos_b")
        for b in range(B):
            k_h[b, pa[b]], k_h[b, pb[b]] = swap_in_subspace(k_h[b, pa[b]], k_h[b, pb[b]], V)
        return q_h, k_h

    with edit_head(model, subspace.layer, subspace.head, edit) as handle:
        yield handle


def _sides(side: str) -> tuple[bool, bool]:
    if side not in ("key", "query", "both"):
        raise ValueError(f"side must be 'key', 'query' or 'both', got {side!r}")
    return side in ("query", "both"), side in ("key", "both")


@contextlib.contextmanager
def ablate(
    model: nn.Module, subspace, positions: Positions = None, *, side: str = "key"
) -> Iterator[HeadEdit]:
    """Project the subspace out of the head's keys (``side="query"``: queries; ``"both"``)
    at ``positions`` (``None``: all): ``x ← x − B Bᵀ x``."""
    _checked(model, subspace)
    on_q, on_k = _sides(side)

    def project_out(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        rows = _rows(positions, x.shape[1], "position")
        B_ = basis.to(x)
        x[:, rows] = x[:, rows] - (x[:, rows] @ B_) @ B_.T
        return x

    def edit(q_h: torch.Tensor, k_h: torch.Tensor):
        if on_q:
            q_h = project_out(q_h, subspace.query_basis)
        if on_k:
            k_h = project_out(k_h, subspace.key_basis)
        return q_h, k_h

    with edit_head(model, subspace.layer, subspace.head, edit) as handle:
        yield handle


@contextlib.contextmanager
def steer(
    model: nn.Module,
    subspace,
    coords: torch.Tensor | Sequence[float],
    positions: Positions = None,
    *,
    side: str = "key",
    mode: str = "add",
) -> Iterator[HeadEdit]:
    """Move the head's keys (or queries) inside the subspace at ``positions``: ``mode="add"``
    adds ``B c`` (``coords c [rank]``); ``mode="set"`` replaces the coordinates:
    ``x ← x − B Bᵀ x + B c``."""
    _checked(model, subspace)
    on_q, on_k = _sides(side)
    if side == "both":
        raise ValueError("steer: side must be 'key' or 'query'")
    if mode not in ("add", "set"):
        raise ValueError(f"mode must be 'add' or 'set', got {mode!r}")
    c = torch.as_tensor(coords, dtype=torch.float64).flatten()
    if c.numel() != subspace.rank:
        raise ValueError(
            f"coords must have the subspace's rank {subspace.rank} entries, got {c.numel()}"
        )

    def move(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        rows = _rows(positions, x.shape[1], "position")
        B_ = basis.to(x)
        shift = B_ @ c.to(x)
        if mode == "set":
            x[:, rows] = x[:, rows] - (x[:, rows] @ B_) @ B_.T
        x[:, rows] = x[:, rows] + shift
        return x

    def edit(q_h: torch.Tensor, k_h: torch.Tensor):
        if on_q:
            q_h = move(q_h, subspace.query_basis)
        if on_k:
            k_h = move(k_h, subspace.key_basis)
        return q_h, k_h

    with edit_head(model, subspace.layer, subspace.head, edit) as handle:
        yield handle
