"""Tiny random-weight models and a char-level tokenizer (no download) for tests and demos.

Every builder returns a float32 model in eval mode with hidden size 64 and 2–4 layers whose
attention goes through transformers' ``AttentionInterface``. Weights are drawn with a larger
init range than usual so attention is far from uniform and the architecture-specific
features (soft-capping, sliding windows) actually change the weights.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import torch
from tokenizers import Regex, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Split
from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["TINY_ARCHS", "tiny_tokenizer", "tiny_model", "TINY_CHAT_TEMPLATE"]

_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
_CHARS = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Char-level fast tokenizer (one token per character, offsets supported, ~103 ids).

    No special tokens are added on encode; it has a tiny chat template for ``format_prompt``.
    """
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + _CHARS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Split(Regex(r"(?m)[\s\S]"), behavior="isolated")
    backend.add_special_tokens(_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        chat_template=TINY_CHAT_TEMPLATE,
    )


_V = len(_SPECIALS) + len(_CHARS)
_COMMON = dict(
    vocab_size=_V,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    max_position_embeddings=256,
    initializer_range=0.25,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM, LlamaConfig(**_COMMON, num_hidden_layers=2, num_key_value_heads=2)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**_COMMON, num_hidden_layers=2, num_key_value_heads=2, sliding_window=7)
    return MistralForCausalLM, cfg


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM, Qwen2Config(**_COMMON, num_hidden_layers=2, num_key_value_heads=2)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**_COMMON, num_hidden_layers=2, num_key_value_heads=2, head_dim=16)
    return Qwen3ForCausalLM, cfg


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        **_COMMON,
        num_hidden_layers=2,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=1.5,  # small so the cap really bends the logits
        final_logit_softcapping=30.0,
        sliding_window=6,
    )
    return Gemma2ForCausalLM, cfg


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        **_COMMON,
        num_hidden_layers=3,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=5,  # shorter than the test prompts so the window matters
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM, cfg


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=_V,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        initializer_range=0.25,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel, cfg


TINY_ARCHS: dict[str, Callable[[], tuple[type, object]]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gpt2": _gpt2,
}


def tiny_model(
    arch: str,
    *,
    seed: int = 0,
    attn_implementation: str | None = None,
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """Random-weight float32 model of ``arch`` (one of :data:`TINY_ARCHS`), in eval mode.

    Default attention is ``sdpa``, or ``eager`` when the config soft-caps attention logits
    (sdpa cannot). ``vocab_size`` (>= the tokenizer's ~103 ids) enlarges the embedding and
    LM head, e.g. to measure what scales with the vocabulary.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(
            f"unknown tiny architecture {arch!r}; expected one of {sorted(TINY_ARCHS)}"
        )
    cls, cfg = TINY_ARCHS[arch]()
    if vocab_size is not None:
        if vocab_size < _V:
            raise ValueError(
                f"vocab_size must be >= {_V} (the tiny tokenizer's ids), got {vocab_size}"
            )
        cfg.vocab_size = vocab_size
    if attn_implementation is None:
        attn_implementation = "eager" if getattr(cfg, "attn_logit_softcapping", None) else "sdpa"
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32).eval()
    return model
