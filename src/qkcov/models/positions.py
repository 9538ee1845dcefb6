"""Token positions of strings inside a prompt, via fast-tokenizer character offsets.

Positions are unpadded token indices of the prompt encoded on its own with
:func:`encode` (the same ids :func:`qkcov.models.capture.tokenize_batch` produces).
With GPT-2-style byte-level BPE (SmolLM2, Llama-3, Qwen) a leading space belongs to the
next word's token, e.g. ``" apple"``: the span of ``"apple"`` is that one token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TokenSpan", "encode", "find_span", "find_spans", "token_at_char"]


@dataclass(frozen=True)
class TokenSpan:
    """Tokens ``first..last`` (inclusive) cover characters ``[char_start, char_end)``."""

    first: int
    last: int
    char_start: int
    char_end: int


def _wants_special(tokenizer: Any, text: str, add_special_tokens: bool | None) -> bool:
    if add_special_tokens is not None:
        return add_special_tokens
    # Auto: a chat-templated prompt already starts with BOS; do not add a second one.
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def encode(
    tokenizer: Any, text: str, *, add_special_tokens: bool | None = None
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and ``(char_start, char_end)`` offsets of ``text``.

    ``add_special_tokens=None`` adds the tokenizer's specials unless ``text`` already begins
    with its BOS string. Special tokens the tokenizer inserts get offset ``(0, 0)``.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets need one"
        )
    enc = tokenizer(
        text,
        add_special_tokens=_wants_special(tokenizer, text, add_special_tokens),
        return_offsets_mapping=True,
    )
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def token_at_char(offsets: list[tuple[int, int]], char: int) -> int:
    """Index of the token whose offsets cover character ``char`` (``ValueError`` if none)."""
    for i, (a, b) in enumerate(offsets):
        if a <= char < b:
            return i
    raise ValueError(f"no token covers character {char}")


def _occurrences(text: str, sub: str, start_char: int) -> list[int]:
    out, i = [], text.find(sub, start_char)
    while i >= 0:
        out.append(i)
        i = text.find(sub, i + 1)
    return out


def find_span(
    tokenizer: Any,
    text: str,
    substring: str,
    occurrence: int | str = 0,
    start_char: int | None = None,
    *,
    add_special_tokens: bool | None = None,
    offsets: list[tuple[int, int]] | None = None,
) -> TokenSpan:
    """Tokens covering ``substring`` in ``text`` (``first`` covers its first character,
    ``last`` its last).

    ``occurrence``: 0-based index among matches at or after ``start_char``, negative from
    the end, or ``"last"``. Pass precomputed ``offsets`` (from :func:`encode`) to avoid
    re-tokenising. Raises ``ValueError`` naming the substring when it is not in the text.
    """
    if not substring:
        raise ValueError("substring to find is empty")
    hits = _occurrences(text, substring, start_char or 0)
    if not hits:
        where = f" after character {start_char}" if start_char else ""
        raise ValueError(f"{substring!r} not found in the prompt{where}: {text[:200]!r}")
    if occurrence == "last":
        occurrence = -1
    if not isinstance(occurrence, int) or not -len(hits) <= occurrence < len(hits):
        raise ValueError(
            f"occurrence {occurrence!r} of {substring!r}: the prompt has {len(hits)} occurrence(s)"
        )
    c0 = hits[occurrence]
    c1 = c0 + len(substring)
    if offsets is None:
        offsets = encode(tokenizer, text, add_special_tokens=add_special_tokens)[1]
    return TokenSpan(token_at_char(offsets, c0), token_at_char(offsets, c1 - 1), c0, c1)


def find_spans(
    tokenizer: Any,
    text: str,
    substrings: list[str],
    *,
    add_special_tokens: bool | None = None,
    in_order: bool = True,
) -> list[TokenSpan]:
    """Spans of several substrings (tokenising once). ``in_order``: each is searched after
    the end of the previous one, so repeated words resolve left to right."""
    offsets = encode(tokenizer, text, add_special_tokens=add_special_tokens)[1]
    spans, cursor = [], 0
    for sub in substrings:
        span = find_span(tokenizer, text, sub, 0, cursor if in_order else None, offsets=offsets)
        spans.append(span)
        cursor = span.char_end if in_order else 0
    return spans
