"""Real-model engine: loading, q/k capture through ``AttentionInterface``, positions,
in-forward interventions and parity verification."""

from .capture import CapturedQK, QKSites, capture_prompts, capture_qk, tokenize_batch
from .heads import parse_heads
from .intervene import HeadEditResult, KeySwap, edit_head_forward, swap_keys_forward
from .loading import DEFAULT_MODEL, PRESETS, LoadedModel, format_prompt, load_model
from .positions import TokenSpan, find_span
from .verify import verify_parity

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "LoadedModel",
    "load_model",
    "format_prompt",
    "QKSites",
    "CapturedQK",
    "capture_qk",
    "capture_prompts",
    "tokenize_batch",
    "TokenSpan",
    "find_span",
    "parse_heads",
    "KeySwap",
    "HeadEditResult",
    "edit_head_forward",
    "swap_keys_forward",
    "verify_parity",
]
