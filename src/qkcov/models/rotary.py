"""Each architecture's rotary layout, read from the loaded model (never guessed).

:func:`rotary_spec` returns the :class:`~qkcov.core.rotary.RotarySpec` of one layer: the
layout (``half`` / ``interleaved``) from the table :data:`ROTARY_LAYOUTS` keyed by the
config's ``model_type``, and the pair frequencies from the model's own rotary module (its
``inv_freq`` buffer, which already holds ``rope_theta`` and any static ``rope_scaling``:
linear, llama3, yarn; Gemma-3 keeps one per layer type, local and global). The rotary
dimension is ``2·len(inv_freq)`` (partial rotary: Phi, StableLM, GPT-NeoX, GLM).

Refused by name, with one line: models without rotary embeddings (GPT-2: learned absolute
positions), a ``model_type`` missing from the table, and rope types whose frequencies
change with the sequence length (``dynamic``, ``longrope``).

:func:`to_query_frame` rotates captured post-RoPE rows into their query's frame
(``R(p_q)ᵀ x``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.rotary import RotarySpec, rotate
from .capture import CapturedQK

__all__ = [
    "ROTARY_LAYOUTS",
    "NO_ROTARY",
    "FRAMES",
    "rotary_spec",
    "rotary_specs",
    "check_query_frame",
    "check_frame_config",
    "to_query_frame",
]

FRAMES = ("post", "query")

# model_type -> layout (how transformers' apply_rotary_pos_emb pairs the dimensions)
ROTARY_LAYOUTS: dict[str, str] = {
    **dict.fromkeys(
        (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
            "gemma2", "gemma3", "gemma3_text", "olmo", "olmo2", "granite", "phi", "phi3",
            "stablelm", "gpt_neox", "smollm3",
        ),
        "half",
    ),
    **dict.fromkeys(("cohere", "glm"), "interleaved"),
}  # fmt: skip
# model types with position information other than rotary (learned absolute, ALiBi, none)
NO_ROTARY = ("gpt2", "gpt_bigcode", "gpt_neo", "opt", "bloom", "falcon_mamba", "mpt")
_VARIABLE_ROPE = ("dynamic", "longrope")


def _config(model: nn.Module) -> Any:
    cfg = model.config
    text = getattr(cfg, "text_config", None)
    known = getattr(cfg, "model_type", None) in ROTARY_LAYOUTS
    return text if text is not None and not known else cfg


def _refuse(mtype: str) -> None:
    if mtype in NO_ROTARY:
        raise ValueError(
            f"--frame query needs rotary position embeddings, and {mtype} has none (its "
            "positions are not rotations of q and k); use --frame post"
        )
    if mtype not in ROTARY_LAYOUTS:
        raise ValueError(
            f"--frame query: qkcov does not know the rotary layout of model type {mtype!r} "
            f"(known: {', '.join(sorted(ROTARY_LAYOUTS))}); use --frame post"
        )


def check_frame_config(name_or_path: str, trust_remote_code: bool = False) -> None:
    """Refuse ``--frame query`` from a local model's ``config.json`` alone, before the
    weights load (what cannot be read this way is checked on the loaded model)."""
    from pathlib import Path

    if not (Path(name_or_path) / "config.json").is_file():
        return
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(
            name_or_path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError):
        return  # the loader names the problem
    text = getattr(cfg, "text_config", None)
    mtype = str(getattr(cfg, "model_type", ""))
    if text is not None and mtype not in ROTARY_LAYOUTS:
        mtype = str(getattr(text, "model_type", mtype))
    _refuse(mtype)


def _rotary_module(model: nn.Module) -> nn.Module | None:
    for _, m in model.named_modules():
        if type(m).__name__.endswith("RotaryEmbedding"):
            return m
    return None


def check_query_frame(model: nn.Module) -> None:
    """``ValueError`` (one line) unless ``model`` has a rotary layout qkcov knows."""
    rotary_specs(model, [0])


def rotary_spec(model: nn.Module, layer: int) -> RotarySpec:
    """The rotary layout and frequencies of ``layer`` (see the module docstring)."""
    return rotary_specs(model, [layer])[layer]


def rotary_specs(model: nn.Module, layers: Sequence[int]) -> dict[int, RotarySpec]:
    """:func:`rotary_spec` of several layers (``{layer: spec}``)."""
    from .loading import model_info

    cfg = _config(model)
    mtype = str(getattr(cfg, "model_type", "") or type(model).__name__)
    _refuse(mtype)
    layout = ROTARY_LAYOUTS[mtype]
    rot = _rotary_module(model)
    if rot is None:
        raise ValueError(
            f"--frame query: {type(model).__name__} ({mtype}) has no rotary embedding module"
        )
    rope_type = getattr(rot, "rope_type", "default")
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    bad = sorted({t for t in types if t in _VARIABLE_ROPE})
    if bad:
        raise ValueError(
            f"--frame query: rope type {bad[0]!r} of {mtype} changes its frequencies with the "
            "sequence length, so one rotation per position does not exist; use --frame post"
        )
    D = model_info(model).head_dim
    layer_types = getattr(cfg, "layer_types", None)
    out = {}
    for layer in layers:
        freq = None
        if layer_types is not None and layer < len(layer_types):
            freq = getattr(rot, f"{layer_types[layer]}_inv_freq", None)
        if freq is None:
            freq = getattr(rot, "inv_freq", None)
        if freq is None:
            raise ValueError(
                f"--frame query: cannot read the rotary frequencies of {mtype} layer {layer}"
            )
        try:
            out[layer] = RotarySpec(D, freq.detach().double().cpu(), layout)
        except ValueError as err:
            raise ValueError(f"--frame query: {mtype} layer {layer}: {err}") from None
    return out


def _query_positions(cap: CapturedQK) -> dict[int, int]:
    ex = cap.q_index[:, 0].tolist()
    pos = cap.q_index[:, 1].tolist()
    out: dict[int, int] = {}
    for e, p in zip(ex, pos, strict=True):
        if out.setdefault(int(e), int(p)) != int(p):
            raise ValueError(f"the query frame needs one query per prompt; example {e} has several")
    return out


def to_query_frame(cap: CapturedQK, spec: RotarySpec) -> CapturedQK:
    """``cap`` with every row rotated into its prompt's query frame: ``q' = R(p_q)ᵀ q``
    (the pre-RoPE query, up to the rope's attention scaling) and ``k' = R(p_q)ᵀ k =
    R(p_k − p_q) k_pre``; every logit ``q'·k'`` equals ``q·k``. Needs the query rows."""
    if cap.q is None or cap.q_index is None:
        raise ValueError("the query frame needs the captured query rows")
    qpos = _query_positions(cap)
    pq = cap.q_index[:, 1].to(cap.q.device)
    q = rotate(cap.q.double(), pq[:, None], spec, inverse=True)
    k = cap.k
    if k is not None:
        pk = torch.tensor([qpos[int(e)] for e in cap.k_index[:, 0].tolist()], device=k.device)
        k = rotate(k.double(), pk[:, None], spec, inverse=True)
    return CapturedQK(
        cap.layer, cap.heads, q, k, cap.q_index, cap.k_index,
        cap.scaling, cap.softcap, cap.sliding_window, cap.pre_rope,
    )  # fmt: skip
