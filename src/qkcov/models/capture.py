"""Capture queries and keys inside the real forward pass via ``AttentionInterface``.

While a hook session is open the model's attention implementation is switched to
``qkcov_<base>`` (``base`` = what the model used before, e.g. ``sdpa`` or ``eager``). That
function is registered once with ``AttentionInterface`` (and the masking interface, reusing
``base``'s mask builder), delegates every call to ``base`` and, for hooked layers, hands the
call's tensors to a hook first:

- ``query [B, H, S, D]``: after q-projection, QK-norm and rotary embedding;
- ``key [B, H_kv, S, D]``: after k-projection, QK-norm and rotary, *before* ``repeat_kv``.
  Query head ``h`` reads kv head ``h // (H // H_kv)``.

Capture gathers only the requested rows, so no ``[B, H, S, D]`` tensor outlives its layer.
Positions are given per example in unpadded token coordinates (``-1`` = last real token)
and every forward gets ``position_ids = cumsum(mask) - 1`` (clamped at 0), so results do not
depend on padding side, batch size or batch-mates.

Pre-RoPE capture (``pre_rope=True``) takes q/k just before the rotary embedding: the
``q_proj``/``k_proj`` output (biases included; Llama, Mistral, Qwen2, Gemma-2) followed by
the layer's own ``q_norm``/``k_norm`` where the architecture has QK-norm (Qwen3, Gemma-3).
Models without rotary embeddings (GPT-2: learned absolute positions) give the same tensors
either way.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .heads import check_heads, check_layers
from .loading import input_device, model_info
from .positions import encode

__all__ = [
    "QKSites",
    "CapturedQK",
    "LayerCall",
    "HookSession",
    "attention_hooks",
    "attention_modules",
    "capture_qk",
    "capture_prompts",
    "tokenize_batch",
    "position_ids_from_mask",
    "padded_forward",
    "resolve_positions",
]

_PREFIX = "qkcov_"


# --------------------------------------------------------------------------- inputs
@dataclass
class QKSites:
    """Which positions to capture, per example (ragged), in unpadded token coordinates.

    Negative positions count from the end (``-1`` = last real token). ``None`` skips that
    side (e.g. queries only).
    """

    query_positions: list[list[int]] | None
    key_positions: list[list[int]] | None

    def __len__(self) -> int:
        side = self.query_positions if self.query_positions is not None else self.key_positions
        return len(side or [])

    def subset(self, start: int, stop: int) -> QKSites:
        cut = lambda x: None if x is None else x[start:stop]  # noqa: E731
        return QKSites(cut(self.query_positions), cut(self.key_positions))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` position ids ``cumsum(mask) - 1`` clamped at 0 (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def padded_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
) -> Any:
    """``model(...)`` on a padded batch ``[B, S]`` with ``position_ids`` from the mask and no
    cache, so a prompt's result does not depend on padding side or batch-mates."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )


def tokenize_batch(
    tokenizer: Any,
    texts: Sequence[str],
    padding_side: str = "left",
    *,
    add_special_tokens: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode each text on its own (same ids as :func:`qkcov.models.positions.encode`) and pad.

    Returns ``input_ids [B, S_max]`` and ``attention_mask [B, S_max]`` (1 = real token).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if isinstance(texts, str) or not len(texts):
        raise ValueError("tokenize_batch needs a non-empty list of strings")
    ids = [encode(tokenizer, t, add_special_tokens=add_special_tokens)[0] for t in texts]
    if any(not x for x in ids):
        raise ValueError("an input text encodes to zero tokens")
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for b, x in enumerate(ids):
        sl = slice(width - len(x), width) if padding_side == "left" else slice(0, len(x))
        input_ids[b, sl] = torch.tensor(x, dtype=torch.long)
        mask[b, sl] = 1
    return input_ids, mask


def resolve_positions(
    positions: Sequence[Sequence[int]], attention_mask: torch.Tensor, what: str = "position"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map ragged unpadded positions to padded coordinates.

    Returns ``(example [N], padded_pos [N], unpadded_pos [N])`` (long, unpadded made
    non-negative). Raises ``ValueError`` for empty lists or positions beyond a sequence.
    """
    B = attention_mask.shape[0]
    if len(positions) != B:
        raise ValueError(f"{what}s given for {len(positions)} examples but the batch has {B}")
    ex, padded, unpadded = [], [], []
    for b, pos in enumerate(positions):
        pos = list(pos)
        if not pos:
            raise ValueError(f"empty {what} list for example {b}")
        real = attention_mask[b].nonzero().flatten().tolist()
        n = len(real)
        for p in pos:
            if isinstance(p, bool) or not isinstance(p, int):
                p = int(p)
            if not -n <= p < n:
                raise ValueError(
                    f"{what} {p} is beyond example {b}, which has {n} tokens (valid: {-n}..{n - 1})"
                )
            p = p % n
            ex.append(b)
            padded.append(real[p])
            unpadded.append(p)
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=attention_mask.device)  # noqa: E731
    return as_t(ex), as_t(padded), as_t(unpadded)


# --------------------------------------------------------------------------- hook plumbing
@dataclass
class LayerCall:
    """One attention call as the hook sees it (shapes for batch B, sequence S)."""

    module: nn.Module
    layer: int
    query: torch.Tensor  # [B, H, S_q, D] post-RoPE
    key: torch.Tensor  # [B, H_kv, S_k, D] post-RoPE, before repeat_kv
    value: torch.Tensor  # [B, H_kv, S_k, D_v]
    attention_mask: torch.Tensor | None  # as built by the model (4-D bool/additive float, or None)
    kwargs: dict[str, Any]
    delegate: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    pre_query: torch.Tensor | None = None  # [B, H, S, D] pre-RoPE (only with pre_rope=True)
    pre_key: torch.Tensor | None = None  # [B, H_kv, S, D]

    @property
    def n_heads(self) -> int:
        return self.query.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def scaling(self) -> float:
        s = self.kwargs.get("scaling")
        return float(s) if s is not None else self.query.shape[-1] ** -0.5

    @property
    def softcap(self) -> float | None:
        return self.kwargs.get("softcap")

    @property
    def sliding_window(self) -> int | None:
        return self.kwargs.get("sliding_window")

    def run(self, query=None, key=None, value=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model's own attention (optionally on replaced tensors)."""
        return self.delegate(
            self.module,
            self.query if query is None else query,
            self.key if key is None else key,
            self.value if value is None else value,
            self.attention_mask,
            **self.kwargs,
        )

    def mask(self) -> torch.Tensor:
        """Mask broadcastable to ``[B, H, S_q, S_k]``: bool (True = attend) or additive float.

        Uses the model's mask (it already holds padding, causality and any sliding window);
        when the model passed none (sdpa's causal fast path) builds causal + window.
        """
        m = self.attention_mask
        if m is not None:
            return m[..., : self.key.shape[-2]]
        sq, sk = self.query.shape[-2], self.key.shape[-2]
        qi = torch.arange(sk - sq, sk, device=self.query.device)[:, None]
        ki = torch.arange(sk, device=self.query.device)[None, :]
        allowed = ki <= qi
        if self.sliding_window:
            allowed &= ki > qi - self.sliding_window
        return allowed[None, None]


HookFn = Callable[[LayerCall], "tuple[torch.Tensor, torch.Tensor | None] | None"]


def _delegate_for(module: nn.Module, base: str) -> Callable:
    if base == "eager":  # eager lives in each modeling file (Gemma-2's soft-caps, etc.)
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


_ACTIVE: list[HookSession] = []


def _make_impl(base: str) -> Callable:
    def qkcov_attention(module, query, key, value, attention_mask, **kwargs):
        delegate = _delegate_for(module, base)
        for session in reversed(_ACTIVE):
            if id(module) in session.module_ids:
                return session.dispatch(module, query, key, value, attention_mask, delegate, kwargs)
        return delegate(module, query, key, value, attention_mask, **kwargs)

    qkcov_attention.__name__ = f"qkcov_{base}_attention"
    return qkcov_attention


def _register(base: str) -> str:
    name = _PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, _make_impl(base))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base)
        if mask_fn is None:
            raise ValueError(
                f"attention implementation {base!r} has no mask builder; use sdpa or eager"
            )
        AttentionMaskInterface.register(name, mask_fn)
    return name


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """``{layer_idx: attention module}`` for the self-attention modules of ``model``."""
    out: dict[int, nn.Module] = {}
    for _, m in model.named_modules():
        if isinstance(getattr(m, "layer_idx", None), int) and "Attention" in type(m).__name__:
            out.setdefault(m.layer_idx, m)
    return out


@dataclass
class HookSession:
    """State of one :func:`attention_hooks` block; ``called`` = layers whose attention ran."""

    hooks: dict[int, HookFn]
    module_ids: set[int]
    called: set[int] = field(default_factory=set)
    pre: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def dispatch(self, module, query, key, value, attention_mask, delegate, kwargs):
        layer = module.layer_idx
        self.called.add(layer)
        hook = self.hooks.get(layer)
        if hook is None:
            return delegate(module, query, key, value, attention_mask, **kwargs)
        call = LayerCall(module, layer, query, key, value, attention_mask, kwargs, delegate)
        pre = self.pre.pop(layer, None)
        if pre is not None:
            call.pre_query = _pre_rope(module, "q", pre["q"], query.shape[-1])
            call.pre_key = _pre_rope(module, "k", pre["k"], key.shape[-1])
        out = hook(call)
        return call.run() if out is None else out

    def check_called(self, model: nn.Module, layers: Sequence[int]) -> None:
        missing = sorted(set(layers) - self.called)
        if missing:
            raise ValueError(
                f"{type(model).__name__}: attention of layer(s) {missing} did not go through "
                "transformers' AttentionInterface, so q/k cannot be captured for this model class"
            )


def _pre_rope(attn: nn.Module, side: str, proj: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``{q,k}_proj`` output ``[B, S, H*D]`` -> pre-RoPE ``[B, H, S, D]`` (QK-norm applied)."""
    B, S = proj.shape[:2]
    norm = getattr(attn, f"{side}_norm", None)
    weight = getattr(norm, "weight", None)
    if norm is not None and weight is not None and weight.numel() == proj.shape[-1]:
        proj = norm(proj)  # norm over all heads (OLMo-2 style), before the head split
        norm = None
    x = proj.reshape(B, S, -1, head_dim)
    if norm is not None:
        x = norm(x)  # per-head QK-norm (Qwen3, Gemma-3): acts on the last dim only
    return x.transpose(1, 2)


def _pre_rope_hooks(
    session: HookSession, mods: dict[int, nn.Module], layers: Sequence[int]
) -> list:
    handles = []
    for layer in layers:
        attn = mods[layer]
        if hasattr(attn, "q_proj") and hasattr(attn, "k_proj"):
            qm, km = attn.q_proj, attn.k_proj
        elif hasattr(attn, "c_attn"):  # GPT-2: no rotary, pre-RoPE == post-RoPE
            continue
        else:
            raise ValueError(f"pre-RoPE capture is not supported for {type(attn).__name__}")

        def save(side: str, layer: int = layer):
            def fn(_m, _inp, out):
                session.pre.setdefault(layer, {})[side] = out

            return fn

        handles += [qm.register_forward_hook(save("q")), km.register_forward_hook(save("k"))]
    return handles


@contextlib.contextmanager
def attention_hooks(
    model: nn.Module,
    hooks: dict[int, HookFn],
    *,
    base: str | None = None,
    pre_rope: bool = False,
) -> Iterator[HookSession]:
    """Route ``model``'s attention through hooks ``{layer: fn(LayerCall) -> None | (out, w)}``.

    A hook returning ``None`` lets the model's own attention run; returning
    ``(attn_output [B, S, H, D], attn_weights | None)`` replaces it. ``base`` picks the
    implementation delegated to (default: the model's current one). The implementation is
    restored on exit.
    """
    config = model.config
    current = config._attn_implementation
    base = base or (current[len(_PREFIX) :] if current.startswith(_PREFIX) else current)
    if not type(model)._can_set_attn_implementation():
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers' "
            "AttentionInterface; q/k capture is not possible for this model class"
        )
    name = _register(base)
    mods = attention_modules(model)
    session = HookSession(dict(hooks), {id(m) for m in mods.values()})
    handles = _pre_rope_hooks(session, mods, list(hooks)) if pre_rope else []
    model.set_attn_implementation(name)
    _ACTIVE.append(session)
    try:
        yield session
    finally:
        _ACTIVE.remove(session)
        for h in handles:
            h.remove()
        model.set_attn_implementation(current)


# --------------------------------------------------------------------------- capture
class _StopForward(Exception):
    """Raised inside the deepest hooked layer to end a capture-only forward pass early."""


@dataclass
class CapturedQK:
    """Captured rows of one layer for the selected heads.

    ``q [N_q, H_sel, D]`` and ``k [N_k, H_sel, D]`` (k already mapped to the query heads
    through GQA); ``q_index``/``k_index [N, 2]`` = (example, unpadded position), rows in the
    order the sites were given. ``scaling``/``softcap``/``sliding_window`` are what the model
    passed to its attention, so ``softmax(softcap(scaling * q·k) + mask)`` is its attention.
    """

    layer: int
    heads: list[int]
    q: torch.Tensor | None
    k: torch.Tensor | None
    q_index: torch.Tensor | None
    k_index: torch.Tensor | None
    scaling: float
    softcap: float | None = None
    sliding_window: int | None = None
    pre_rope: bool = False

    @staticmethod
    def concat(parts: Sequence[CapturedQK]) -> CapturedQK:
        """Stack captures of the same layer/heads from several batches (row order kept)."""
        first = parts[0]
        cat = lambda name: (  # noqa: E731
            None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])
        )
        return CapturedQK(
            first.layer, first.heads, cat("q"), cat("k"), cat("q_index"), cat("k_index"),
            first.scaling, first.softcap, first.sliding_window, first.pre_rope,
        )  # fmt: skip

    def select(self, heads: Sequence[int], device: Any = None) -> CapturedQK:
        """The rows of ``heads`` only (a subset of ``self.heads``, in the order given), on
        ``device`` (default: where they are): the same values a capture of these heads alone
        gives (a copy, no arithmetic)."""
        missing = sorted(set(heads) - set(self.heads))
        if missing:
            raise ValueError(f"layer {self.layer}: heads {missing} were not captured")
        j = [self.heads.index(h) for h in heads]
        pick = lambda t: None if t is None else t[:, j].to(device or t.device)  # noqa: E731
        move = lambda t: None if t is None else t.to(device or t.device)  # noqa: E731
        return CapturedQK(
            self.layer, list(heads), pick(self.q), pick(self.k), move(self.q_index),
            move(self.k_index), self.scaling, self.softcap, self.sliding_window, self.pre_rope,
        )  # fmt: skip


def _sites_tensors(sites: QKSites, mask: torch.Tensor, offset: int):
    out = {}
    for side, pos in (("q", sites.query_positions), ("k", sites.key_positions)):
        if pos is None:
            out[side] = None
            continue
        ex, padded, unpadded = resolve_positions(
            pos, mask, "query position" if side == "q" else "key position"
        )
        out[side] = (ex, padded, torch.stack([ex + offset, unpadded], dim=1))
    if out["q"] is None and out["k"] is None:
        raise ValueError("QKSites has neither query nor key positions")
    return out


def capture_qk(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sites: QKSites,
    layers: int | Sequence[int],
    heads: int | Sequence[int] | None = None,
    *,
    pre_rope: bool = False,
    on_capture: Callable[[int, CapturedQK], None] | None = None,
    example_offset: int = 0,
    stop_early: bool = True,
    on_call: Callable[[LayerCall], None] | None = None,
) -> dict[int, CapturedQK]:
    """One forward pass capturing q/k of ``heads`` (default all) at ``sites`` in ``layers``.

    ``input_ids``/``attention_mask``: ``[B, S]`` (any padding side). With ``on_capture``,
    each layer's :class:`CapturedQK` is handed to it inside the forward pass and not kept
    (returns ``{}``). ``example_offset`` is added to the example column of the indices.
    ``stop_early`` ends the forward pass right after the deepest requested layer (the
    later layers and the LM head cannot change what is captured). ``on_call(call)`` sees each
    requested layer's :class:`LayerCall` first, in the same forward (e.g. the head scan's
    attention rows, :func:`qkcov.engine.scan.scan_capture`).
    """
    info = model_info(model)
    layers = check_layers(layers, info.n_layers)
    head_list = check_heads(heads, info.n_heads)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S], got {list(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {list(attention_mask.shape)} != input_ids {list(input_ids.shape)}"
        )
    device = input_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    idx = _sites_tensors(sites, attention_mask, example_offset)
    hq = torch.tensor(head_list, dtype=torch.long, device=device)
    results: dict[int, CapturedQK] = {}

    last_layer = max(layers)

    def hook(call: LayerCall) -> None:
        if on_call is not None:
            on_call(call)
        qsrc = call.pre_query if pre_rope and call.pre_query is not None else call.query
        ksrc = call.pre_key if pre_rope and call.pre_key is not None else call.key
        q = k = q_index = k_index = None
        if idx["q"] is not None:
            ex, pos, q_index = idx["q"]
            q = qsrc[ex[:, None], hq[None, :], pos[:, None]]  # [N_q, H_sel, D]
        if idx["k"] is not None:
            ex, pos, k_index = idx["k"]
            k = ksrc[ex[:, None], (hq // call.group_size)[None, :], pos[:, None]]  # [N_k, H_sel, D]
        rec = CapturedQK(
            call.layer, head_list, q, k, q_index, k_index,
            call.scaling, call.softcap, call.sliding_window, pre_rope,
        )  # fmt: skip
        if on_capture is not None:
            on_capture(call.layer, rec)
        else:
            results[call.layer] = rec
        if stop_early and call.layer == last_layer:
            raise _StopForward  # nothing after the deepest requested layer is used

    with (
        torch.no_grad(),
        attention_hooks(model, dict.fromkeys(layers, hook), pre_rope=pre_rope) as s,
        contextlib.suppress(_StopForward),
    ):
        padded_forward(model, input_ids, attention_mask, logits_to_keep=1)
    s.check_called(model, layers)
    return results


def capture_prompts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    sites: QKSites,
    layers: int | Sequence[int],
    heads: int | Sequence[int] | None = None,
    *,
    batch_size: int = 8,
    padding_side: str = "left",
    pre_rope: bool = False,
    on_capture: Callable[[int, CapturedQK], None] | None = None,
    add_special_tokens: bool | None = None,
    progress: bool = True,
    stop_early: bool = True,
    batches: Sequence[range] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[int, CapturedQK]:
    """:func:`capture_qk` over many prompts in batches (tqdm progress bar).

    ``sites`` has one entry per text; example indices in the results are global (index into
    ``texts``). Returns per-layer captures concatenated over batches (``{}`` with
    ``on_capture``). ``batches`` runs only these index ranges (default: consecutive batches
    of ``batch_size`` covering every text; e.g. one rank's shard), and ``on_batch(i)`` is
    called after the ``i``-th of them is done (checkpointing).
    """
    if len(sites) != len(texts):
        raise ValueError(f"sites cover {len(sites)} examples but there are {len(texts)} texts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    parts: dict[int, list[CapturedQK]] = {}
    if batches is None:
        batches = [
            range(s, min(s + batch_size, len(texts))) for s in range(0, len(texts), batch_size)
        ]
    for b in batches:
        if len(b) == 0 or b.step != 1 or b.start < 0 or b.stop > len(texts):
            raise ValueError(
                f"batches must be non-empty contiguous ranges inside [0, {len(texts)}), got {b}"
            )
    for i, batch in enumerate(tqdm(batches, desc="capture", unit="batch", disable=not progress)):
        start, stop = batch.start, batch.stop
        ids, mask = tokenize_batch(
            tokenizer, texts[start:stop], padding_side, add_special_tokens=add_special_tokens
        )
        out = capture_qk(
            model, ids, mask, sites.subset(start, stop), layers, heads,
            pre_rope=pre_rope, on_capture=on_capture, example_offset=start, stop_early=stop_early,
        )  # fmt: skip
        for layer, rec in out.items():
            parts.setdefault(layer, []).append(rec)
        if on_batch is not None:
            on_batch(i)
    return {layer: CapturedQK.concat(p) for layer, p in parts.items()}
